"""AS-MLP (svip-lab, ``official-asmlp``): train form with the upstream keys, exact deploy form.

Train form (keys of the official ``as_mlp.py``; every norm is GroupNorm(1, C), eps 1e-5):
    patch_embed: proj (p×p/p conv) -> norm
    block:  x = x + AS(norm1(x));  x = x + fc2(GELU(fc1(norm2(x))))
    AS:     conv1 -> norm1 -> GELU -> [conv2_1(shiftW) -> GELU] + [conv2_2(shiftH) -> GELU] -> norm2 -> conv3
    merging: concat[x(0::2,0::2), x(1::2,0::2), x(0::2,1::2), x(1::2,1::2)] -> norm -> reduction
    head:   norm -> mean over H, W -> Linear

Deploy form (each step exact; a GN(1,C) affine ``s·n + t`` entering a 1x1 conv without padding
is ``W·diag(s)`` and ``b + W·t``):
    block norm1 -> conv1, AS norm2 -> conv3, block norm2 -> fc1, merging norm -> reduction,
    final norm -> head (the mean commutes with the per-channel affine).
    The shifts use pad + slice + concat (``reparam/shift.py``), no ``torch.roll``.
    Every GroupNorm(1, C) is emitted as InstanceNormalization of the (N, 1, C·H·W) view (the
    same statistic; see ``GroupNorm1``), not ONNX ``GroupNormalization``, which one TensorRT
    release mis-imports.
    Left in place (statistics are computed at run time, their affines cannot move):
    ``axial_shift.norm1`` keeps its affine (GELU follows it; before it are the statistics),
    ``patch_embed.norm`` keeps its affine (it feeds the residual stream, and the next
    GN(1, C) mixes all channels into one statistic, so a per-channel scale does not cancel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..reparam import transforms as T
from ..reparam.shift import shift_by_slicing
from ..reparam.walker import ReparamContext
from .layers import PointwiseMlp, clone_conv, clone_linear, exporting
from .registry import StateDict, register_config, register_format

GN_EPS = 1e-5


def roll_shift(x: Tensor, shift_size: int, dim: int) -> Tensor:
    """The upstream pure-PyTorch shift: zero pad, ``torch.roll`` each channel chunk, crop."""
    p = shift_size // 2
    h, w = x.shape[2:]
    x = F.pad(x, (p, p, p, p))
    chunks = torch.chunk(x, shift_size, 1)
    x = torch.cat([torch.roll(c, s, dim) for c, s in zip(chunks, range(-p, p + 1))], 1)
    return x[:, :, p:p + h, p:p + w]


class GroupNorm1(nn.Module):
    """GroupNorm(1, C), optional affine. x (N, C, H, W) -> same.

    Exported as InstanceNormalization of the (N, 1, C·H·W) view: with one channel, instance
    norm takes the mean and biased variance over all C·H·W values of a sample, which is
    exactly GroupNorm(1, C)'s statistic (same eps). That is 3 nodes (two Reshapes) instead of
    8 explicit reductions, avoids ONNX GroupNormalization (a TensorRT release mis-imports it),
    and its scale/bias are single numbers (LayerNormalization over (C, H, W) would need a
    C·H·W-sized scale). The affine, where kept, is a per-channel Mul/Add after the Reshape.
    Measured in ONNX Runtime on (8, 96, 56, 56): 1.3 ms against 6.7 ms for the explicit
    reductions. Eager PyTorch runs ``F.group_norm`` (PyTorch's fused kernel, same statistics).
    """

    def __init__(self, eps: float, weight: Tensor | None = None, bias: Tensor | None = None):
        super().__init__()
        self.eps = eps
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone().reshape(1, -1, 1, 1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if not exporting():  # eager: PyTorch's fused kernel computes the same statistics, faster
            w = None if self.weight is None else self.weight.reshape(-1)
            b = None if self.bias is None else self.bias.reshape(-1)
            return F.group_norm(x, 1, w, b, self.eps)
        y = F.instance_norm(x.flatten(1).unsqueeze(1), eps=self.eps).reshape(x.shape)
        if self.weight is not None:
            y = y * self.weight + self.bias
        return y


def _gn_into_conv(gn: nn.GroupNorm, conv: nn.Conv2d) -> nn.Conv2d:
    """GN(1,C)'s affine folded into the following 1x1 conv (exact: no padding, so no border)."""
    w, b = T.fold_affine_before(conv.weight, conv.bias, gn.weight, gn.bias, conv.groups, conv.padding)
    return clone_conv(conv, w, b)


def _stats(gn: nn.GroupNorm) -> GroupNorm1:
    return GroupNorm1(gn.eps)


class AxialShift(nn.Module):
    """The AS module (train form); shifts as in the upstream pure-PyTorch path."""

    def __init__(self, dim: int, shift_size: int, as_bias: bool = True):
        super().__init__()
        self.shift_size = shift_size
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.conv2_1 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.conv2_2 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.conv3 = nn.Conv2d(dim, dim, 1, bias=as_bias)
        self.norm1 = nn.GroupNorm(1, dim, eps=GN_EPS)
        self.norm2 = nn.GroupNorm(1, dim, eps=GN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        lr = F.gelu(self.conv2_1(roll_shift(x, self.shift_size, 3)))
        td = F.gelu(self.conv2_2(roll_shift(x, self.shift_size, 2)))
        return self.conv3(self.norm2(lr + td))


class AxialShiftedBlock(nn.Module):
    def __init__(self, dim: int, shift_size: int, mlp_ratio: float, as_bias: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim, eps=GN_EPS)
        self.axial_shift = AxialShift(dim, shift_size, as_bias)
        self.norm2 = nn.GroupNorm(1, dim, eps=GN_EPS)
        self.mlp = PointwiseMlp(dim, int(dim * mlp_ratio), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.axial_shift(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        a = self.axial_shift
        conv1 = _gn_into_conv(self.norm1, a.conv1)
        ctx.folded("GroupNorm->Conv2d", "norm1")
        conv3 = _gn_into_conv(a.norm2, a.conv3)
        ctx.folded("GroupNorm->Conv2d", "axial_shift.norm2")
        fc1 = _gn_into_conv(self.norm2, self.mlp.fc1)
        ctx.folded("GroupNorm->Conv2d", "norm2")
        inner = GroupNorm1(a.norm1.eps, a.norm1.weight, a.norm1.bias)
        ctx.left("axial_shift.norm1", "GroupNorm", "statistics computed at run time; its affine is followed by GELU "
                 "and preceded by the statistics, so it cannot move (emitted as one InstanceNormalization)")
        for what in ("norm1", "axial_shift.norm2", "norm2"):
            ctx.left(what, "GroupNorm(no affine)", "statistics computed at run time (affine folded)")
        return DeployBlock(_stats(self.norm1), conv1, inner, a.conv2_1, a.conv2_2, _stats(a.norm2), conv3,
                           _stats(self.norm2), fc1, self.mlp.fc2, a.shift_size)


class DeployBlock(nn.Module):
    """Deploy form of one AS-MLP block: normalise-only GNs, affines folded, slice-based shifts."""

    def __init__(self, norm1: GroupNorm1, conv1: nn.Conv2d, inner: GroupNorm1, conv2_1: nn.Conv2d,
                 conv2_2: nn.Conv2d, norm_as: GroupNorm1, conv3: nn.Conv2d, norm2: GroupNorm1,
                 fc1: nn.Conv2d, fc2: nn.Conv2d, shift_size: int):
        super().__init__()
        self.norm1, self.conv1, self.inner = norm1, conv1, inner
        self.conv2_1, self.conv2_2, self.norm_as, self.conv3 = conv2_1, conv2_2, norm_as, conv3
        self.norm2, self.fc1, self.fc2 = norm2, fc1, fc2
        self.shift_size = shift_size

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.inner(self.conv1(self.norm1(x))))
        lr = F.gelu(self.conv2_1(shift_by_slicing(y, self.shift_size, 3)))
        td = F.gelu(self.conv2_2(shift_by_slicing(y, self.shift_size, 2)))
        x = x + self.conv3(self.norm_as(lr + td))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def space_to_depth(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2) in AS-MLP's order [(0,0), (1,0), (0,1), (1,1)] (row, col)."""
    return torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Conv2d(4 * dim, 2 * dim, 1, bias=False)
        self.norm = nn.GroupNorm(1, 4 * dim, eps=GN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(space_to_depth(x)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        ctx.folded("GroupNorm->Conv2d", "norm")
        ctx.left("norm", "GroupNorm(no affine)", "statistics computed at run time (affine folded)")
        return DeployMerging(_stats(self.norm), _gn_into_conv(self.norm, self.reduction))


class DeployMerging(nn.Module):
    def __init__(self, norm: GroupNorm1, reduction: nn.Conv2d):
        super().__init__()
        self.norm, self.reduction = norm, reduction

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(self.norm(space_to_depth(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)
        self.norm = nn.GroupNorm(1, dim, eps=GN_EPS) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        if isinstance(self.norm, nn.GroupNorm):
            self.norm = GroupNorm1(self.norm.eps, self.norm.weight, self.norm.bias)
            ctx.left("norm", "GroupNorm", "feeds the residual stream; the next GroupNorm(1, C) pools all channels "
                     "into one statistic, so its per-channel affine does not cancel")
        return self


class BasicLayer(nn.Module):
    def __init__(self, dim: int, depth: int, shift_size: int, mlp_ratio: float, as_bias: bool, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(AxialShiftedBlock(dim, shift_size, mlp_ratio, as_bias) for _ in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class ASMLP(nn.Module):
    """AS-MLP with the upstream constructor arguments. x (N, 3, img, img) -> (N, num_classes)."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 96, depths=(2, 2, 6, 2), shift_size: int = 5, mlp_ratio: float = 4.0,
                 as_bias: bool = True, drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 patch_norm: bool = True):
        super().__init__()
        if img_size % (patch_size * 2 ** (len(depths) - 1)):
            raise ValueError(f"img_size {img_size} is not divisible by patch_size·2^(stages-1)")
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        n = len(depths)
        self.layers = nn.ModuleList(
            BasicLayer(embed_dim * 2 ** i, d, shift_size, mlp_ratio, as_bias, i < n - 1) for i, d in enumerate(depths))
        dim = embed_dim * 2 ** (n - 1)
        self.norm = nn.GroupNorm(1, dim, eps=GN_EPS)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=(2, 3)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        # head(mean(s·n + t)) = head(s·mean(n) + t): the mean over H, W commutes with the affine
        w, b = T.fold_affine_before(self.head.weight, self.head.bias, self.norm.weight, self.norm.bias)
        self.head = clone_linear(w, b)
        ctx.folded("GroupNorm->Linear", "norm")
        self.norm = GroupNorm1(self.norm.eps)
        ctx.left("norm", "GroupNorm(no affine)", "statistics computed at run time (affine folded into head)")
        return self


# ---------------------------------------------------------------------------- format
_DEFAULTS = dict(img_size=224, patch_size=4, in_chans=3, mlp_ratio=4.0, as_bias=True, drop_rate=0.0, patch_norm=True)


def _build(config: dict) -> nn.Module:
    return ASMLP(**config)


def _matches(sd: StateDict) -> bool:
    return "patch_embed.proj.weight" in sd and any(".axial_shift.conv2_1." in k for k in sd)


def _infer_config(sd: StateDict) -> dict:
    """Constructor arguments from shapes. ``shift_size`` is not in the weights: the named configs' 5.

    ``img_size`` is not in the weights either (the network is convolutional): 224, the
    named configs' size; drop rates do not matter at inference and come from the named
    config that matches, if any.
    """
    try:
        proj = sd["patch_embed.proj.weight"]
        head = sd["head.weight"]
    except KeyError as e:
        raise CheckpointError(f"AS-MLP checkpoint lacks {e}") from None
    depths = []
    while any(k.startswith(f"layers.{len(depths)}.blocks.") for k in sd):
        i = len(depths)
        depths.append(len({k.split(".")[3] for k in sd if k.startswith(f"layers.{i}.blocks.")}))
    if not depths:
        raise CheckpointError("AS-MLP checkpoint has no layers.*.blocks.*")
    embed = proj.shape[0]
    fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"]
    cfg = dict(_DEFAULTS, patch_size=proj.shape[-1], in_chans=proj.shape[1], num_classes=head.shape[0],
               embed_dim=embed, depths=depths, shift_size=5, mlp_ratio=fc1.shape[0] / embed,
               as_bias="layers.0.blocks.0.axial_shift.conv1.bias" in sd,
               patch_norm="patch_embed.norm.weight" in sd, drop_path_rate=0.0)
    if cfg["mlp_ratio"] == int(cfg["mlp_ratio"]):
        cfg["mlp_ratio"] = float(cfg["mlp_ratio"])
    from .registry import CONFIGS
    ignore = {"drop_rate", "drop_path_rate"}
    for nc in CONFIGS.values():
        if nc.format == FORMAT and {k: v for k, v in nc.config.items() if k not in ignore} == \
                {k: v for k, v in cfg.items() if k not in ignore}:
            return dict(nc.config)
    return cfg


def _input_size(config: dict) -> tuple[int, int, int]:
    return (config.get("in_chans", 3), config.get("img_size", 224), config.get("img_size", 224))


def _resize(config: dict, size: tuple[int, int]) -> dict:
    """Convolutional, so any square size the stages divide: only ``img_size`` changes."""
    h, w = size
    if h != w:
        raise ValueError("AS-MLP's img_size is one side (square inputs)")
    step = config.get("patch_size", 4) * 2 ** (len(config.get("depths", (2, 2, 6, 2))) - 1)
    if h % step:
        raise ValueError(f"the side must be a multiple of patch_size·2^(stages-1) = {step}")
    return {**config, "img_size": h}


FORMAT = "official-asmlp"
register_format(
    FORMAT, family="asmlp", build=_build, matches=_matches, resize=_resize,
    infer_config=_infer_config, input_size=_input_size, assumptions=lambda c: {
        "shift_size": ("assumed: not stored in the weights (every released "
                      "AS-MLP uses 5); pass --config '{\"shift_size\": N}' if yours differs"),
        "img_size": ("assumed: not stored in the weights; it sets the "
                    "export/proof input size only (the network is convolutional)")},
    description="AS-MLP (svip-lab/AS-MLP as_mlp.py keys); shift size is not stored in the weights (assumed 5)",
)
for _name, _dim, _depths, _dpr in (("asmlp_t", 96, [2, 2, 6, 2], 0.2), ("asmlp_s", 96, [2, 2, 18, 2], 0.3),
                                   ("asmlp_b", 128, [2, 2, 18, 2], 0.5)):
    register_config(_name, FORMAT, f"AS-MLP-{_name[-1].upper()}, 224px, shift 5", **dict(
        _DEFAULTS, num_classes=1000, embed_dim=_dim, depths=_depths, shift_size=5, drop_path_rate=_dpr))
