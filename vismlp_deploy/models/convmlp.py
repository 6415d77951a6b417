"""ConvMLP (SHI-Labs, Li et al. 2021) with the official keys (format ``official-convmlp``).

Train form::

    tokenizer:  3 × (3x3 conv, no bias → BN → ReLU)  (first conv stride 2), max-pool 3x3/2
    conv stage: n × [x + (1x1 → BN → ReLU → 3x3 → BN → ReLU → 1x1 → BN → ReLU)(x)], 3x3/2 conv
    MLP stages (channels-last), each block:
        x = x + mlp1(LN1(x));  x = DW3x3(LN_c(x)) (no residual);  x = x + mlp2(LN2(x))
      3x3/2 conv between stages
    head: LN → mean over tokens → Linear

Exact folds of the deploy form:
- every BN directly follows its conv → one conv with bias (any padding: the affine acts on
  whole output channels);
- ``LN(x) = γ ⊙ x̂ + β`` feeding fc1: ``fc1(γ ⊙ x̂ + β) = (W·diag γ) x̂ + (b + W β)``; the LN
  stays as the parameter-free normalization ``x̂``;
- final LN → head through the token mean (linear, per channel);
- ``connect_norm`` → the zero-padded depthwise ``connect``: γ is a per-input-channel scale of
  a depthwise kernel (exact at every position), but β becomes ``DW(β·1)``, a per-position
  bias map that differs at the borders. With ``model.fixed_input_size = (H, W)`` set before
  ``reparameterize``, γ goes into the kernel and β into that bias map (exact at that size,
  other sizes rejected). Otherwise the LN is kept as it is: folding γ alone would still leave
  a per-channel affine (``x̂ + β/γ``) in the same place, i.e. nothing gained.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, UserError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import clone_conv, clone_linear, fuse_conv_bn
from .registry import StateDict, register_config, register_format


def _down(n: int) -> int:
    """Output length of a 3x3, stride 2, padding 1 conv or max-pool."""
    return (n - 1) // 2 + 1


def _plain_ln(ln: nn.LayerNorm) -> nn.LayerNorm:
    return nn.LayerNorm(ln.normalized_shape, ln.eps, elementwise_affine=False)


def _fold_conv_bn_seq(seq: nn.Sequential, ctx: ReparamContext, where: str) -> nn.Sequential:
    """(conv, BN, act)* -> (conv', act)*: each BN directly follows its conv."""
    mods, out = list(seq), []
    i = 0
    while i < len(mods):
        if isinstance(mods[i], nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
            out.append(fuse_conv_bn(mods[i], mods[i + 1]))
            ctx.folded("BatchNorm2d->Conv2d", f"{where}.{i}")
            i += 2
        else:
            out.append(mods[i])
            i += 1
    return nn.Sequential(*out)


# ----------------------------------------------------------------------------- train form
class ConvTokenizer(nn.Module):
    """x (N, 3, H, W) -> (N, channels, H/4, W/4); keys ``block.{0,3,6}`` convs, ``{1,4,7}`` BNs."""

    def __init__(self, channels: int):
        super().__init__()
        c2 = channels // 2
        self.block = nn.Sequential(
            nn.Conv2d(3, c2, 3, 2, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, 1, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        self.block = _fold_conv_bn_seq(self.block, ctx, "block")
        return self


class ConvStage(nn.Module):
    """Residual bottlenecks then a 3x3/2 conv: (N, c, H, W) -> (N, dim_out, H/2, W/2)."""

    def __init__(self, num_blocks: int, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.conv_blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(dim_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, 1, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, dim_in, 1, bias=False), nn.BatchNorm2d(dim_in), nn.ReLU(),
        ) for _ in range(num_blocks))
        self.downsample = nn.Conv2d(dim_in, dim_out, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.conv_blocks:
            x = x + block(x)
        return self.downsample(x)

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        for i, block in enumerate(self.conv_blocks):
            self.conv_blocks[i] = _fold_conv_bn_seq(block, ctx, f"conv_blocks.{i}")
        return self


class Mlp(nn.Module):
    """fc1 → GELU → fc2 over the last axis."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvMLPBlock(nn.Module):
    """One Conv-MLP block, channels-last: x (N, H, W, C) -> (N, H, W, C).

    ``connect_bias`` (1, C, H, W) exists only in a fixed-size deploy form.
    ``fixed_hw`` (token grid) is set by :attr:`ConvMLP.fixed_input_size`.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.channel_mlp1 = Mlp(dim, hidden)
        self.norm2 = nn.LayerNorm(dim)
        self.connect = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.connect_norm = nn.LayerNorm(dim)
        self.channel_mlp2 = Mlp(dim, hidden)
        self.register_parameter("connect_bias", None)
        self.fixed_hw: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.channel_mlp1(self.norm1(x))
        y = self.connect(self.connect_norm(x).permute(0, 3, 1, 2))
        if self.connect_bias is not None:
            if y.shape[-2:] != self.connect_bias.shape[-2:]:
                raise UserError(f"this deploy model was folded for a fixed input size (token grid "
                                f"{tuple(self.connect_bias.shape[-2:])}); got grid {tuple(y.shape[-2:])}")
            y = y + self.connect_bias
        x = y.permute(0, 2, 3, 1)
        return x + self.channel_mlp2(self.norm2(x))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        for norm, mlp in (("norm1", "channel_mlp1"), ("norm2", "channel_mlp2")):
            ln, fc1 = getattr(self, norm), getattr(self, mlp).fc1
            if ln.weight is None:
                continue
            w, b = T.fold_affine_before(fc1.weight, fc1.bias, ln.weight, ln.bias)
            getattr(self, mlp).fc1 = clone_linear(w, b)
            setattr(self, norm, _plain_ln(ln))
            ctx.folded("LayerNorm affine->Linear", f"{mlp}.fc1")
        ln = self.connect_norm
        if self.fixed_hw is None:
            ctx.left("connect_norm", "LayerNorm",
                     "its shift enters the zero-padded depthwise `connect` conv (border taps read 0, not "
                     "the shift): exact only as a fixed-size bias map (set fixed_input_size); folding the "
                     "scale alone would leave a per-channel affine in the same place")
        elif ln.weight is not None:
            w, _ = T.fold_affine_before(self.connect.weight, None, ln.weight, None, groups=self.connect.groups)
            bias_map = T.shift_bias_map(self.connect.weight,
                                        ln.bias if ln.bias is not None else torch.zeros_like(ln.weight),
                                        self.fixed_hw, groups=self.connect.groups, padding=self.connect.padding)
            self.connect = clone_conv(self.connect, w, None)
            self.connect_bias = nn.Parameter(bias_map.unsqueeze(0))
            self.connect_norm = _plain_ln(ln)
            ctx.folded("LayerNorm scale->DWConv2d", "connect")
            ctx.folded("LayerNorm shift->DWConv2d bias map", "connect")
        return self


class ConvDownsample(nn.Module):
    """3x3/2 conv on a channels-last map: (N, H, W, C) -> (N, H/2, W/2, C')."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.downsample = nn.Conv2d(dim_in, dim_out, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class BasicStage(nn.Module):
    def __init__(self, num_blocks: int, dim: int, dim_next: int | None, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(ConvMLPBlock(dim, int(dim * mlp_ratio)) for _ in range(num_blocks))
        self.downsample_mlp = ConvDownsample(dim, dim_next) if dim_next is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample_mlp(x)


class ConvMLP(nn.Module):
    """ConvMLP: x (N, 3, H, W) -> logits (N, num_classes), or (N, H/32, W/32, dims[-1]) without head.

    Set ``fixed_input_size = (H, W)`` before ``reparameterize`` to fold ``connect_norm``'s
    shift as border-exact bias maps (the deploy form then rejects other sizes).
    """

    def __init__(self, blocks: list[int], dims: list[int], mlp_ratios: list[float], channels: int = 64,
                 n_conv_blocks: int = 3, classifier_head: bool = True, num_classes: int = 1000):
        super().__init__()
        if not len(blocks) == len(dims) == len(mlp_ratios):
            raise ValueError("blocks, dims and mlp_ratios must have the same length")
        self.tokenizer = ConvTokenizer(channels)
        self.conv_stages = ConvStage(n_conv_blocks, channels, dims[0], dims[0])
        self.stages = nn.ModuleList(
            BasicStage(blocks[i], dims[i], dims[i + 1] if i + 1 < len(blocks) else None, mlp_ratios[i])
            for i in range(len(blocks)))
        self.norm = nn.LayerNorm(dims[-1]) if classifier_head else None
        self.head = nn.Linear(dims[-1], num_classes) if classifier_head else None
        self._fixed_input_size: tuple[int, int] | None = None

    @property
    def fixed_input_size(self) -> tuple[int, int] | None:
        return self._fixed_input_size

    @fixed_input_size.setter
    def fixed_input_size(self, size: tuple[int, int] | None) -> None:
        """Tell every block its token grid (None: size-agnostic deploy form)."""
        self._fixed_input_size = None if size is None else (int(size[0]), int(size[1]))
        grid = None if size is None else tuple(_down(_down(_down(int(n)))) for n in size)
        for stage in self.stages:
            for blk in stage.blocks:
                blk.fixed_hw = grid
            if grid is not None:
                grid = tuple(_down(n) for n in grid)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_stages(self.tokenizer(x)).permute(0, 2, 3, 1)
        for stage in self.stages:
            x = stage(x)
        if self.head is None:
            return x
        x = self.norm(x.flatten(1, 2))
        return self.head(x.mean(1))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        if self.head is not None and self.norm.weight is not None:
            w, b = T.fold_affine_before(self.head.weight, self.head.bias, self.norm.weight, self.norm.bias)
            self.head = clone_linear(w, b)
            self.norm = _plain_ln(self.norm)
            ctx.folded("LayerNorm affine->Linear (through the mean)", "head")
        return self


# --------------------------------------------------------------------------- format
_KEYS = ("blocks", "dims", "mlp_ratios", "channels", "n_conv_blocks", "classifier_head", "num_classes")


def _build(config: dict) -> ConvMLP:
    unknown = set(config) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown ConvMLP arguments {sorted(unknown)}")
    return ConvMLP(**config)


def _resize(config: dict, size: tuple[int, int]) -> dict:
    """Convolutional with a global mean: any size whose last stage still has a pixel, same config."""
    smallest = 2 ** (3 + len(config["blocks"]) - 1)  # tokenizer /4, conv stage /2, then /2 per stage
    if min(size) < smallest:
        raise ValueError(f"each side must be at least {smallest} pixels")
    return config


def _matches(sd: StateDict) -> bool:
    return "tokenizer.block.0.weight" in sd and "conv_stages.downsample.weight" in sd


def _count(sd: StateDict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _ratio(hidden: int, dim: int) -> int | float:
    """The mlp_ratio with int(dim * ratio) == hidden (an int when it divides)."""
    if hidden % dim == 0:
        return hidden // dim
    r = hidden / dim
    if int(dim * r) != hidden:
        raise CheckpointError(f"no mlp_ratio gives hidden width {hidden} for dim {dim}")
    return r


def _infer(sd: StateDict) -> dict:
    """Constructor arguments from key names and shapes."""
    try:
        channels = sd["tokenizer.block.6.weight"].shape[0]
        n_stages = _count(sd, r"stages\.(\d+)\.")
        blocks = [_count(sd, rf"stages\.{i}\.blocks\.(\d+)\.") for i in range(n_stages)]
        if not n_stages or min(blocks) == 0:
            raise CheckpointError("every ConvMLP stage needs at least one block")
        dims = [sd[f"stages.{i}.blocks.0.norm1.weight"].shape[0] for i in range(n_stages)]
        ratios = [_ratio(sd[f"stages.{i}.blocks.0.channel_mlp1.fc1.weight"].shape[0], dims[i]) for i in range(n_stages)]
    except KeyError as e:
        raise CheckpointError(f"not a ConvMLP state_dict (missing {e})") from None
    head = "head.weight" in sd
    cfg = {"blocks": blocks, "dims": dims, "mlp_ratios": ratios, "channels": channels,
           "n_conv_blocks": _count(sd, r"conv_stages\.conv_blocks\.(\d+)\."), "classifier_head": head}
    cfg["num_classes"] = sd["head.weight"].shape[0] if head else 1000
    return cfg


register_format(
    "official-convmlp", family="convmlp", build=_build, matches=_matches, infer_config=_infer,
    input_size=lambda c: (3, 224, 224), resize=_resize, description="ConvMLP, SHI-Labs Convolutional-MLPs keys",
)
register_config("convmlp_s", "official-convmlp", "ConvMLP-S (9.0M)", blocks=[2, 4, 2], dims=[128, 256, 512],
                mlp_ratios=[2, 2, 2], channels=64, n_conv_blocks=2, classifier_head=True, num_classes=1000)
register_config("convmlp_m", "official-convmlp", "ConvMLP-M (17.4M)", blocks=[3, 6, 3], dims=[128, 256, 512],
                mlp_ratios=[3, 3, 3], channels=64, n_conv_blocks=3, classifier_head=True, num_classes=1000)
register_config("convmlp_l", "official-convmlp", "ConvMLP-L (42.7M)", blocks=[4, 8, 3], dims=[192, 384, 768],
                mlp_ratios=[3, 3, 3], channels=96, n_conv_blocks=3, classifier_head=True, num_classes=1000)
