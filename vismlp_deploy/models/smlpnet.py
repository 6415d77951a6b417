"""sMLPNet (microsoft SPACH ``smlp.py``, ``official-smlpnet``): train form with upstream keys, exact deploy form.

Train form (BN eps 1e-5, LN eps 1e-5, exact GELU; fixed input size ``image_size``):
    stage i: to_patch_embedding.i.0 (conv, no bias; p×p/p at stage 0, 2×2/2 after), then blocks
    block n: x = x + token_mix.n(x);  x = x + channel_mix.n(x)
    token_mix.n.0.conv_merge: BN -> GELU -> depthwise 3x3 (pad 1, no bias)
    token_mix.n.1:            BN -> GELU = a -> fuse(concat[a, proj_h(a), proh_w(a)])  (fuse: 1x1, 3C -> C)
        ``proj_h`` mixes along the WIDTH axis and ``proh_w`` (sic) along the HEIGHT axis:
        the upstream names are swapped relative to what the permutes do (H == W hides it).
    channel_mix.n: NHWC LayerNorm -> Linear -> GELU -> Linear
    head: batch_norm -> mean over H, W -> mlp_head.0

Deploy form (each step exact):
    token_mix.n.1.BN folds into the depthwise conv before it (BN directly follows the conv);
    the spatial projections keep their biases (a (C, H, W) bias map through ``fuse`` is exact at
    the fixed size but measured worse: one more ONNX node per block, +2.4M parameters) and stay
    1x1 convs on permuted views (measured faster on CPU than a permute-free matmul form);
    channel_mix LN γ/β -> the first Linear; head BN -> mlp_head through the mean.
    Left: token_mix.n.0.conv_merge.BN sits on the residual stream before a GELU; the skip
    path needs the un-normalised x and GELU blocks folding forward, so it stays (as an
    eval-mode BatchNorm2d). The LayerNorms keep their statistics (affine folded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError, UserError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import clone_linear, fuse_conv_bn
from .registry import CONFIGS, StateDict, register_config, register_format

LN_EPS = 1e-5


class ConvMerge(nn.Module):
    """BN -> GELU -> depthwise 3x3 (keys ``BN``, ``Conv``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(dim)
        self.Conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.Conv(F.gelu(self.BN(x)))


class DWConvStep(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv_merge = ConvMerge(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_merge(x)


class SparseMLP(nn.Module):
    """BN -> GELU -> fuse(concat[a, W-mix(a), H-mix(a)]), with the upstream permutes. x (N, C, S, S)."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.BN = nn.BatchNorm2d(dim)
        self.proj_h = nn.Conv2d(side, side, 1)
        self.proh_w = nn.Conv2d(side, side, 1)
        self.fuse = nn.Conv2d(3 * dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.gelu(self.BN(x))
        a_h = self.proj_h(a.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # W becomes the channel axis
        a_w = self.proh_w(a.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # H becomes the channel axis
        return self.fuse(torch.cat([a, a_h, a_w], 1))


class TokenMix(nn.Sequential):
    """``token_mix.n``: DWConvStep then SparseMLP (the residual is added by the network)."""

    def __init__(self, side: int, dim: int):
        super().__init__(DWConvStep(dim), SparseMLP(side, dim))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        merge, mlp = self[0].conv_merge, self[1]
        dw = fuse_conv_bn(merge.Conv, mlp.BN)
        ctx.folded("BatchNorm2d->Conv2d", "1.BN")
        ctx.left("bn", "BatchNorm2d", "0.conv_merge.BN: on the residual stream before GELU; the skip needs the "
                 "un-normalised input and GELU blocks a forward fold")
        # The projections keep their biases. Pushing them through ``fuse`` as a (C, H, W) bias
        # map is exact at the fixed size, but measured worse: one extra Add node per block in
        # ONNX (a conv bias is free inside the Conv node) and +2.4M parameters on smlpnet_t.
        return DeployTokenMix(merge.BN, dw, mlp.proj_h, mlp.proh_w, mlp.fuse)


class DeployTokenMix(nn.Module):
    """BN -> GELU -> DW 3x3 (+bias) -> GELU = a -> fuse(concat[a, W-mix(a), H-mix(a)]).

    The spatial mixes are 1x1 convs on permuted views (the upstream layout): on CPU this
    measured ~1-2% faster than the permute-free matmul form (``a @ Wh.T``, ``Ww @ a``),
    which is equally exact. x (N, C, S, S) -> same (S fixed).
    """

    def __init__(self, bn: nn.BatchNorm2d, dw: nn.Conv2d, w_mix: nn.Conv2d, h_mix: nn.Conv2d, fuse: nn.Conv2d):
        super().__init__()
        self.bn, self.dw, self.w_mix, self.h_mix, self.fuse = bn, dw, w_mix, h_mix, fuse

    def forward(self, x: Tensor) -> Tensor:
        a = F.gelu(self.dw(F.gelu(self.bn(x))))
        a_w = self.w_mix(a.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # mixes along W
        a_h = self.h_mix(a.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)  # mixes along H
        return self.fuse(torch.cat([a, a_w, a_h], 1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ToNHWC(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class ToNCHW(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


class ChannelMix(nn.Sequential):
    """``channel_mix.n``: NHWC -> LN (``.1``) -> FeedForward (``.2``) -> NCHW."""

    def __init__(self, dim: int, alpha: int):
        super().__init__(ToNHWC(), nn.LayerNorm(dim, eps=LN_EPS), FeedForward(dim, dim * alpha), ToNCHW())

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        ln, net = self[1], self[2].net
        w, b = T.fold_affine_before(net[0].weight, net[0].bias, ln.weight, ln.bias)
        ctx.folded("LayerNorm->Linear", "1")
        ctx.left("1", "LayerNorm(no affine)", "statistics computed at run time (affine folded into the next Linear)")
        return nn.Sequential(ToNHWC(), nn.LayerNorm(ln.normalized_shape, ln.eps, elementwise_affine=False),
                             clone_linear(w, b), nn.GELU(), net[3], ToNCHW())


class SMLPNet(nn.Module):
    """sMLPNet with the upstream constructor arguments. x (N, in_chans, image_size, image_size) -> logits."""

    def __init__(self, in_chans: int = 3, dim: int = 80, alpha: int = 3, num_classes: int = 1000,
                 patch_size: int = 4, image_size: int = 224, depths=(2, 8, 14, 2), dp_rate: float = 0.0):
        super().__init__()
        if image_size % (patch_size * 2 ** (len(depths) - 1)):
            raise ValueError(f"image_size {image_size} not divisible by patch_size·2^(stages-1)")
        self.image_size = image_size
        self.depths = list(depths)
        self.to_patch_embedding = nn.ModuleList()
        self.token_mix, self.channel_mix = nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(depths):
            c = dim * 2 ** i
            side = image_size // patch_size // 2 ** i
            stem = (nn.Conv2d(in_chans, c, patch_size, patch_size, bias=False) if i == 0
                    else nn.Conv2d(c // 2, c, 2, 2, bias=False))
            self.to_patch_embedding.append(nn.Sequential(stem))
            for _ in range(depth):
                self.token_mix.append(TokenMix(side, c))
                self.channel_mix.append(ChannelMix(c, alpha))
        c = dim * 2 ** (len(depths) - 1)
        self.batch_norm = nn.BatchNorm2d(c)
        self.mlp_head = nn.Sequential(nn.Linear(c, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise UserError(f"sMLPNet is fixed-size: input must be {self.image_size}x{self.image_size}, got "
                            f"{tuple(x.shape[-2:])}")
        n = 0
        for i, depth in enumerate(self.depths):
            x = self.to_patch_embedding[i](x)
            for _ in range(depth):
                x = x + self.token_mix[n](x)
                x = x + self.channel_mix[n](x)
                n += 1
        return self.mlp_head(self.batch_norm(x).mean(dim=(2, 3)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        # head(mean(s·x + t)) = head(s·mean(x) + t): the spatial mean commutes with the BN affine
        bn, head = self.batch_norm, self.mlp_head[0]
        s, t = T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        w, b = T.fold_affine_before(head.weight, head.bias, s, t)
        self.mlp_head = nn.Sequential(clone_linear(w, b))
        self.batch_norm = nn.Identity()
        ctx.folded("BatchNorm2d->Linear", "batch_norm")
        return self


# ---------------------------------------------------------------------------- format
def _build(config: dict) -> nn.Module:
    return SMLPNet(**config)


def _matches(sd: StateDict) -> bool:
    return "to_patch_embedding.0.0.weight" in sd and any(k.endswith(".proh_w.weight") for k in sd)


def _infer_config(sd: StateDict) -> dict:
    """Constructor arguments from shapes; ``dp_rate`` (training only) from the matching named config, else 0."""
    try:
        stem, head = sd["to_patch_embedding.0.0.weight"], sd["mlp_head.0.weight"]
        side0 = sd["token_mix.0.1.proj_h.weight"].shape[0]
        hidden = sd["channel_mix.0.2.net.0.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"sMLPNet checkpoint lacks {e}") from None
    dim, patch = stem.shape[0], stem.shape[-1]
    n_stages = sum(1 for k in sd if k.startswith("to_patch_embedding.") and k.endswith(".0.weight"))
    widths = [sd[f"token_mix.{n}.1.fuse.weight"].shape[0]
              for n in range(sum(1 for k in sd if k.endswith(".1.fuse.weight")))]
    depths = [sum(1 for c in widths if c == dim * 2 ** i) for i in range(n_stages)]
    if sum(depths) != len(widths):
        raise CheckpointError(f"sMLPNet stage widths {sorted(set(widths))} do not double from {dim}")
    cfg = dict(in_chans=stem.shape[1], dim=dim, alpha=hidden // dim, num_classes=head.shape[0], patch_size=patch,
               image_size=side0 * patch, depths=depths, dp_rate=0.0)
    for nc in CONFIGS.values():
        if nc.format == FORMAT and {**nc.config, "dp_rate": 0.0} == cfg:
            return dict(nc.config)
    return cfg


FORMAT = "official-smlpnet"
def _resize(config: dict, size: tuple[int, int]) -> dict:
    """``image_size`` at another size (the token-mixing weights are sized by it)."""
    step = config.get("patch_size", 4) * 2 ** (len(config.get("depths", (2, 8, 14, 2))) - 1)
    if size[0] != size[1] or size[0] % step:
        raise ValueError(f"sMLPNet takes square inputs whose side is a multiple of {step}")
    return {**config, "image_size": size[0]}


register_format(
    FORMAT, family="smlpnet", build=_build, resize=_resize, matches=_matches, infer_config=_infer_config,
    input_size=lambda c: (c.get("in_chans", 3), c.get("image_size", 224), c.get("image_size", 224)),
    description="sMLPNet (microsoft/SPACH smlp.py keys, incl. the 'proh_w' spelling); fixed input size",
)
for _name, _dim, _depths, _dp in (("smlpnet_t", 80, [2, 8, 14, 2], 0.0), ("smlpnet_s", 96, [2, 10, 24, 2], 0.2),
                                  ("smlpnet_b", 112, [2, 10, 24, 2], 0.3)):
    register_config(_name, FORMAT, f"sMLPNet-{_name[-1].upper()}, 224px (fixed size)", in_chans=3, dim=_dim, alpha=3,
                    num_classes=1000, patch_size=4, image_size=224, depths=_depths, dp_rate=_dp)
