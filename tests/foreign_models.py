"""Models written by others, re-implemented independently in their authors' module structure.

timm cannot be imported here (its torchvision dependency is broken with this torch build), so
these classes reproduce the *structure* the generic graph pass meets on real foreign objects:
class and attribute names, ``nn.Sequential``/``Residual`` nesting, where the transposes sit,
einops layers, shape reads (``x.shape``) and ``torch._assert`` checks. No class here is known
to ``vismlp_deploy``: they reach the torch.fx pass, never a family file.

Namespaces (nested classes keep the upstream class names apart):

- :class:`Timm`: ``MlpMixer`` with ``MixerBlock`` (Mixer), ``ResBlock`` + ``Affine`` (ResMLP),
  ``SpatialGatingBlock`` + ``GatedMlp`` + ``SpatialGatingUnit`` (gMLP); ``ConvMixer`` with
  ``Residual`` and ``SelectAdaptivePool2d``. Each carries a ``pretrained_cfg`` dict like timm's.
- :class:`Deit`: facebookresearch/deit ``resmlp_models`` (``alpha * x + beta``, ``gamma_1``,
  a ``ModuleList`` loop, ``x.mean(1).reshape(B, 1, -1)[:, 0]``).
- :class:`Locuslab`: the official ConvMixer, one flat ``nn.Sequential``.
- :class:`Lucidrains`: einops ``MLPMixer`` (``Rearrange`` patches, ``Conv1d`` token mixing,
  ``Reduce`` mean) and ``ResMLP`` (``x * g + b`` affines, ``PreAffinePostLayerScale``).

:func:`randomize_foreign_` randomizes them (also the affines ``randomize_`` does not know by
name); :func:`fold_checked` folds one and checks it on fresh inputs; :func:`affine_census`
counts what a deploy model still computes per channel.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from einops.layers.torch import Rearrange, Reduce
from helpers import FP32_RTOL
from torch import nn

from vismlp_deploy.models.init import randomize_
from vismlp_deploy.reparam.graph import fold_graph, verify_equal
from vismlp_deploy.reparam.report import ReparamReport


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Timm:
    """timm's module structure (``timm.models.mlp_mixer``, ``timm.models.convmixer``, ``timm.layers``)."""

    class PatchEmbed(nn.Module):
        """Conv patches, NCHW -> NLC, optional norm; checks the input size like timm's ``strict_img_size``."""

        def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None):
            super().__init__()
            self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
            self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
            self.flatten = True
            self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)
            self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

        def forward(self, x):
            B, C, H, W = x.shape
            torch._assert(H == self.img_size[0], "input height does not match the model")
            torch._assert(W == self.img_size[1], "input width does not match the model")
            x = self.proj(x)
            if self.flatten:
                x = x.flatten(2).transpose(1, 2)
            return self.norm(x)

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
            super().__init__()
            hidden_features = hidden_features or in_features
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.norm = nn.Identity()
            self.fc2 = nn.Linear(hidden_features, out_features or in_features)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x):
            x = self.drop1(self.act(self.fc1(x)))
            return self.drop2(self.fc2(self.norm(x)))

    class GatedMlp(nn.Module):
        """fc1 -> act -> gate (halves the width) -> fc2."""

        def __init__(self, in_features, hidden_features, act_layer=nn.GELU, gate_layer=None, drop=0.0):
            super().__init__()
            self.fc1 = nn.Linear(in_features, hidden_features)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.gate = gate_layer(hidden_features)
            self.norm = nn.Identity()
            self.fc2 = nn.Linear(hidden_features // 2, in_features)
            self.drop2 = nn.Dropout(drop)

        def forward(self, x):
            x = self.gate(self.drop1(self.act(self.fc1(x))))
            return self.drop2(self.fc2(self.norm(x)))

    class MixerBlock(nn.Module):
        def __init__(self, dim, seq_len, mlp_ratio=(0.5, 4.0), norm_layer=partial(nn.LayerNorm, eps=1e-6)):
            super().__init__()
            tokens_dim, channels_dim = (int(r * dim) for r in mlp_ratio)
            self.norm1 = norm_layer(dim)
            self.mlp_tokens = Timm.Mlp(seq_len, tokens_dim)
            self.drop_path = nn.Identity()
            self.norm2 = norm_layer(dim)
            self.mlp_channels = Timm.Mlp(dim, channels_dim)

        def forward(self, x):
            x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
            return x + self.drop_path(self.mlp_channels(self.norm2(x)))

    class Affine(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones((1, 1, dim)))
            self.beta = nn.Parameter(torch.zeros((1, 1, dim)))

        def forward(self, x):
            return torch.addcmul(self.beta, self.alpha, x)

    class ResBlock(nn.Module):
        def __init__(self, dim, seq_len, mlp_ratio=4, norm_layer=None, init_values=1e-4):
            super().__init__()
            norm_layer = norm_layer or Timm.Affine
            self.norm1 = norm_layer(dim)
            self.linear_tokens = nn.Linear(seq_len, seq_len)
            self.drop_path = nn.Identity()
            self.norm2 = norm_layer(dim)
            self.mlp_channels = Timm.Mlp(dim, int(dim * mlp_ratio))
            self.ls1 = nn.Parameter(init_values * torch.ones(dim))
            self.ls2 = nn.Parameter(init_values * torch.ones(dim))

        def forward(self, x):
            x = x + self.drop_path(self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
            return x + self.drop_path(self.ls2 * self.mlp_channels(self.norm2(x)))

    class SpatialGatingUnit(nn.Module):
        def __init__(self, dim, seq_len, norm_layer=nn.LayerNorm):
            super().__init__()
            self.norm = norm_layer(dim // 2)
            self.proj = nn.Linear(seq_len, seq_len)

        def forward(self, x):
            u, v = x.chunk(2, dim=-1)
            v = self.proj(self.norm(v).transpose(-1, -2))
            return u * v.transpose(-1, -2)

    class SpatialGatingBlock(nn.Module):
        def __init__(self, dim, seq_len, mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
            super().__init__()
            self.norm = norm_layer(dim)
            sgu = partial(Timm.SpatialGatingUnit, seq_len=seq_len)
            self.mlp_channels = Timm.GatedMlp(dim, int(dim * mlp_ratio), gate_layer=sgu)
            self.drop_path = nn.Identity()

        def forward(self, x):
            return x + self.drop_path(self.mlp_channels(self.norm(x)))

    class MlpMixer(nn.Module):
        """The one timm class behind Mixer, ResMLP and gMLP (``block_layer`` picks which)."""

        def __init__(self, num_classes=1000, img_size=224, in_chans=3, patch_size=16, num_blocks=8, embed_dim=512,
                     mlp_ratio=(0.5, 4.0), block_layer=None, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                     drop_rate=0.0, global_pool="avg", **block_kw):
            super().__init__()
            block_layer = block_layer or Timm.MixerBlock
            self.num_classes, self.global_pool = num_classes, global_pool
            self.stem = Timm.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            self.blocks = nn.Sequential(*[
                block_layer(embed_dim, self.stem.num_patches, mlp_ratio, norm_layer=norm_layer, **block_kw)
                for _ in range(num_blocks)])
            self.norm = norm_layer(embed_dim)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            self.pretrained_cfg = {"input_size": (in_chans, *_pair(img_size)), "num_classes": num_classes,
                                   "fixed_input_size": True}

        def forward_features(self, x):
            return self.norm(self.blocks(self.stem(x)))

        def forward_head(self, x, pre_logits: bool = False):
            if self.global_pool == "avg":
                x = x.mean(dim=1)
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    class SelectAdaptivePool2d(nn.Module):
        def __init__(self, output_size=1, pool_type="avg", flatten=False):
            super().__init__()
            self.pool_type = pool_type
            self.pool = nn.AdaptiveAvgPool2d(output_size)
            self.flatten = nn.Flatten(1) if flatten else nn.Identity()

        def forward(self, x):
            return self.flatten(self.pool(x))

    class ConvMixer(nn.Module):
        def __init__(self, dim, depth, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000, global_pool="avg",
                     drop_rate=0.0, act_layer=nn.GELU):
            super().__init__()
            self.num_classes, self.num_features = num_classes, dim
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size), act_layer(), nn.BatchNorm2d(dim))
            self.blocks = nn.Sequential(*[nn.Sequential(
                Timm.Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), act_layer(), nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, kernel_size=1), act_layer(), nn.BatchNorm2d(dim)) for _ in range(depth)])
            self.pooling = Timm.SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
            self.pretrained_cfg = {"input_size": (in_chans, 224, 224), "num_classes": num_classes}

        def forward_features(self, x):
            return self.blocks(self.stem(x))

        def forward_head(self, x, pre_logits: bool = False):
            x = self.head_drop(self.pooling(x))
            return x if pre_logits else self.head(x)

        def forward(self, x):
            return self.forward_head(self.forward_features(x))


def timm_resmlp(img_size=32, patch_size=8, embed_dim=24, num_blocks=2, num_classes=10) -> nn.Module:
    """timm ``resmlp_*``: ``MlpMixer(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4)``."""
    return Timm.MlpMixer(num_classes, img_size, 3, patch_size, num_blocks, embed_dim, 4,
                         block_layer=Timm.ResBlock, norm_layer=Timm.Affine)


def timm_mixer(img_size=32, patch_size=8, embed_dim=24, num_blocks=2, num_classes=10) -> nn.Module:
    return Timm.MlpMixer(num_classes, img_size, 3, patch_size, num_blocks, embed_dim, (0.5, 4.0))


def timm_gmlp(img_size=32, patch_size=8, embed_dim=24, num_blocks=2, num_classes=10) -> nn.Module:
    """timm ``gmlp_*``: ``MlpMixer(block_layer=SpatialGatingBlock, mlp_ratio=6)``."""
    return Timm.MlpMixer(num_classes, img_size, 3, patch_size, num_blocks, embed_dim, 6,
                         block_layer=Timm.SpatialGatingBlock)


def timm_convmixer(dim=16, depth=2, kernel_size=5, patch_size=4, num_classes=10, act="GELU") -> nn.Module:
    return Timm.ConvMixer(dim, depth, kernel_size, patch_size, num_classes=num_classes,
                          act_layer={"GELU": nn.GELU, "ReLU": nn.ReLU}[act])


class Deit:
    """facebookresearch/deit ``resmlp_models.py`` structure."""

    class Affine(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(dim))
            self.beta = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return self.alpha * x + self.beta

    class Mlp(Timm.Mlp):
        pass

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim):
            super().__init__()
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class layers_scale_mlp_blocks(nn.Module):
        def __init__(self, dim, num_patches, init_values=1e-4):
            super().__init__()
            self.norm1 = Deit.Affine(dim)
            self.attn = nn.Linear(num_patches, num_patches)
            self.drop_path = nn.Identity()
            self.norm2 = Deit.Affine(dim)
            self.mlp = Deit.Mlp(dim, int(4.0 * dim))
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))

        def forward(self, x):
            x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x).transpose(1, 2)).transpose(1, 2))
            return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    class resmlp_models(nn.Module):
        def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12):
            super().__init__()
            self.patch_embed = Deit.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
            n = self.patch_embed.num_patches
            self.blocks = nn.ModuleList([Deit.layers_scale_mlp_blocks(embed_dim, n) for _ in range(depth)])
            self.norm = Deit.Affine(embed_dim)
            self.head = nn.Linear(embed_dim, num_classes)

        def forward_features(self, x):
            B = x.shape[0]
            x = self.patch_embed(x)
            for blk in self.blocks:
                x = blk(x)
            x = self.norm(x)
            x = x.mean(dim=1).reshape(B, 1, -1)
            return x[:, 0]

        def forward(self, x):
            return self.head(self.forward_features(x))


def deit_resmlp(img_size=32, patch_size=8, embed_dim=24, depth=2, num_classes=10) -> nn.Module:
    return Deit.resmlp_models(img_size, patch_size, 3, num_classes, embed_dim, depth)


class Locuslab:
    """locuslab/convmixer: the whole network is one flat ``nn.Sequential``."""

    class Residual(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x) + x

    @staticmethod
    def ConvMixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000, activation=nn.GELU):
        return nn.Sequential(
            nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), activation(), nn.BatchNorm2d(dim),
            *[nn.Sequential(
                Locuslab.Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), activation(), nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, kernel_size=1), activation(), nn.BatchNorm2d(dim)) for _ in range(depth)],
            nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


def locuslab_convmixer(dim=16, depth=2, kernel_size=5, patch_size=4, n_classes=10, act="GELU") -> nn.Module:
    return Locuslab.ConvMixer(dim, depth, kernel_size, patch_size, n_classes, {"GELU": nn.GELU, "ReLU": nn.ReLU}[act])


class Lucidrains:
    """lucidrains/mlp-mixer-pytorch and res-mlp-pytorch: einops layers in flat ``nn.Sequential``s."""

    class PreNormResidual(nn.Module):
        def __init__(self, dim, fn):
            super().__init__()
            self.fn = fn
            self.norm = nn.LayerNorm(dim)

        def forward(self, x):
            return self.fn(self.norm(x)) + x

    @staticmethod
    def FeedForward(dim, expansion_factor=4, dropout=0.0, dense=nn.Linear):
        inner = int(dim * expansion_factor)
        return nn.Sequential(dense(dim, inner), nn.GELU(), nn.Dropout(dropout), dense(inner, dim), nn.Dropout(dropout))

    @staticmethod
    def MLPMixer(*, image_size, channels, patch_size, dim, depth, num_classes, expansion_factor=4,
                 expansion_factor_token=0.5, dropout=0.0):
        num_patches = (image_size // patch_size) ** 2
        chan_first, chan_last = partial(nn.Conv1d, kernel_size=1), nn.Linear
        ff = Lucidrains.FeedForward
        return nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_size ** 2 * channels, dim),
            *[nn.Sequential(
                Lucidrains.PreNormResidual(dim, ff(num_patches, expansion_factor, dropout, chan_first)),
                Lucidrains.PreNormResidual(dim, ff(dim, expansion_factor_token, dropout, chan_last)),
            ) for _ in range(depth)],
            nn.LayerNorm(dim),
            Reduce("b n c -> b c", "mean"),
            nn.Linear(dim, num_classes))

    class Affine(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.g = nn.Parameter(torch.ones(1, 1, dim))
            self.b = nn.Parameter(torch.zeros(1, 1, dim))

        def forward(self, x):
            return x * self.g + self.b

    class PreAffinePostLayerScale(nn.Module):
        def __init__(self, dim, depth, fn):
            super().__init__()
            eps = 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6
            self.scale = nn.Parameter(torch.zeros(1, 1, dim).fill_(eps))
            self.affine = Lucidrains.Affine(dim)
            self.fn = fn

        def forward(self, x):
            return self.fn(self.affine(x)) * self.scale + x

    @staticmethod
    def ResMLP(*, dim, depth, num_classes, expansion_factor=4, patch_size=16, image_size=224):
        num_patches = (image_size // patch_size) ** 2

        def wrap(i, fn):
            return Lucidrains.PreAffinePostLayerScale(dim, i + 1, fn)
        return nn.Sequential(
            Rearrange("b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=patch_size, p2=patch_size),
            nn.Linear(patch_size ** 2 * 3, dim),
            *[nn.Sequential(
                wrap(i, nn.Conv1d(num_patches, num_patches, 1)),
                wrap(i, nn.Sequential(nn.Linear(dim, dim * expansion_factor), nn.GELU(),
                                      nn.Linear(dim * expansion_factor, dim))),
            ) for i in range(depth)],
            Lucidrains.Affine(dim),
            Reduce("b n c -> b c", "mean"),
            nn.Linear(dim, num_classes))


def lucidrains_mixer(image_size=32, patch_size=8, dim=24, depth=2, num_classes=10) -> nn.Module:
    return Lucidrains.MLPMixer(image_size=image_size, channels=3, patch_size=patch_size, dim=dim, depth=depth,
                               num_classes=num_classes)


def lucidrains_resmlp(image_size=32, patch_size=8, dim=24, depth=2, num_classes=10) -> nn.Module:
    return Lucidrains.ResMLP(dim=dim, depth=depth, num_classes=num_classes, patch_size=patch_size,
                             image_size=image_size)


# ------------------------------------------------------------------------------- init
@torch.no_grad()
def randomize_foreign_(model: nn.Module, seed: int = 0, signs: bool = False) -> nn.Module:
    """:func:`randomize_` plus every free parameter outside Linear/Conv/norm modules (lucidrains'
    ``g``, ``b``, ``scale``) drawn from U(0.5, 1.5), so that no affine stays an identity.
    ``signs``: BatchNorm/Affine scales get random signs too (negative gammas)."""
    randomize_(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for mod in model.modules():
        if isinstance(mod, _MIXERS + _NORMS + (nn.modules.batchnorm._BatchNorm,)):
            continue
        for p in mod.parameters(recurse=False):
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
    if signs:
        for mod in model.modules():
            w = getattr(mod, "weight", None) if isinstance(mod, nn.modules.batchnorm._BatchNorm) else \
                getattr(mod, "alpha", None)
            if w is not None:
                w.mul_(torch.randint(0, 2, w.shape, generator=g).to(w.dtype) * 2 - 1)
    return model


def fold_checked(model: nn.Module, x: torch.Tensor, seed: int = 1, signs: bool = False
                 ) -> tuple[nn.Module, ReparamReport]:
    """Randomize ``model``, fold it (``fold_graph`` checks fp32 and fp64 itself) and check the
    result again on other inputs of the same size."""
    randomize_foreign_(model, seed, signs).eval()
    out, rep = fold_graph(model, x)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for v in (x, x * 3 + 1):
            verify_equal(model, out, v, FP32_RTOL, exact=model64(v.double()))
    return out, rep


# ------------------------------------------------------------------------------- census
_MIXERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm)
# the family deploy blocks (ResMLPDeployBlock, MixerDeployBlock) hold their token-mixing Linear as raw
# parameters under these names: weights and biases of a linear, not per-channel affines
_RAW_LINEAR = {"token_weight", "token_w1", "token_b1", "token_w2", "token_b2"}


@dataclass(frozen=True)
class Census:
    """What a model still computes per channel outside its linears/convs.

    ``vectors``: per-channel parameters (one axis longer than 1) that are not a Linear/Conv
    weight or bias, a BatchNorm counting as two (its scale and shift); ``norm_affines``:
    BatchNorms and LayerNorm/GroupNorm modules that still hold an affine; ``tables``:
    parameters outside Linear/Conv/norms that vary along two or more axes (a bias table).
    """

    vectors: int
    norm_affines: int
    tables: int


def affine_census(model: nn.Module) -> Census:
    vectors = norms = tables = 0
    for mod in model.modules():
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, _MIXERS):
            continue
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            norms += 1
            vectors += 2
            continue
        if isinstance(mod, _NORMS) and own:
            norms += 1
        for name, p in own.items():
            if name in _RAW_LINEAR:
                continue
            long_axes = sum(s > 1 for s in p.shape)
            vectors += long_axes == 1
            tables += long_axes > 1
    return Census(vectors, norms, tables)
