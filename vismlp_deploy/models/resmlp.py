"""ResMLP (Touvron et al. 2021): timm ``MlpMixer`` + ``ResBlock`` + ``Affine``, and the official deit code.

Internal key layout = timm's (``stem.proj``, ``blocks.i.{norm1,linear_tokens,ls1,norm2,
mlp_channels.fc1/fc2,ls2}``, ``norm``, ``head``; Affine alpha/beta (1, 1, C)). The official
deit keys are renamed onto it (``patch_embed.``→``stem.``, ``attn.``→``linear_tokens.``,
``mlp.``→``mlp_channels.``, ``gamma_i``→``lsi``, alpha/beta (C,)→(1, 1, C)).

Train block on x (B, N, C), N tokens (row-major), C channels::

    x = x + ls1 * T(alpha1 * x + beta1)          T: Linear(N, N) along the token axis
    x = x + ls2 * fc2(gelu(fc1(alpha2 * x + beta2)))

Deploy block (every fold exact, computed in float64)::

    x = x + s * (W @ x) + table                  s = ls1*alpha1 (C,), table (N, C)
    x = x + fc2'(gelu(fc1'(x)))                  Affine2 -> fc1' input, ls2 -> fc2' output

and the final Affine enters the head through the token mean. The module also holds the
pieces the Mixer family shares with it (timm builds both from one ``MlpMixer`` class).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import clone_linear, exporting
from .registry import StateDict, has_keys, register_config, register_format


# ------------------------------------------------------------------ shared pieces
def image_hw(img_size: int | list | tuple) -> tuple[int, int]:
    """timm's ``to_2tuple`` of ``img_size``."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def token_count(img_size: int | list | tuple, patch_size: int) -> int:
    """Tokens of a patch stem (the token linears are sized by it, so the input size is fixed)."""
    h, w = image_hw(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return (h // patch_size) * (w // patch_size)


class PatchStem(nn.Module):
    """Patch conv (kernel = stride = patch, with bias) then (B, C, H', W') -> (B, N, C), row-major tokens."""

    def __init__(self, in_chans: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ChannelMlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2 on the last axis (timm ``Mlp``: keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def fold_head_through_mean(model: nn.Module, ctx: ReparamContext, scale: Tensor, shift: Tensor, what: str) -> None:
    """``head(mean_tokens(s * x + t)) == head'(mean_tokens(x))``: the mean commutes with a per-channel affine.

    Replaces ``model.head`` (a Linear) by the folded Linear; scale/shift (C,).
    """
    w, b = T.fold_affine_before(model.head.weight, model.head.bias, scale, shift)
    model.head = clone_linear(w, b)
    ctx.folded(f"{what}->Linear (through the token mean)", "norm")


def square_grid(num_tokens: int, patch: int, what: str) -> int:
    """Image side of a square ``num_tokens`` grid (a non-square grid cannot be read from shapes)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise CheckpointError(f"{what}: {num_tokens} tokens is not a square grid; pass config with img_size")
    return side * patch


def need(sd: StateDict, key: str, fmt: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{fmt}: key {key!r} missing, cannot infer the config")
    return sd[key]


def count_blocks(sd: StateDict, probe: str) -> int:
    """Number of ``blocks.i.`` with ``blocks.i.<probe>`` present, checked to be 0..n-1."""
    idx = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(rf"blocks\.(\d+)\.{re.escape(probe)}", k)))
    if not idx or idx != list(range(len(idx))):
        raise CheckpointError(f"block indices {idx[:8]} are not 0..n-1 (probe blocks.i.{probe})")
    return len(idx)


def check_choice(config: dict, key: str, allowed: tuple, what: str) -> None:
    """Reject an upstream option this implementation does not reproduce (rather than ignore it)."""
    if key in config and config[key] not in allowed:
        raise ValueError(f"{what}: {key}={config[key]!r} is not supported (supported: {allowed})")


# ------------------------------------------------------------------ train form
class Affine(nn.Module):
    """timm's ``Affine``: ``alpha * x + beta`` with alpha/beta (1, 1, C) broadcast over (B, N, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.beta, self.alpha, x)


class ResBlock(nn.Module):
    """Cross-patch sublayer then cross-channel sublayer, each with a layer-scale (ls1, ls2: (C,))."""

    def __init__(self, dim: int, seq_len: int, mlp_ratio: float = 4, init_values: float = 1e-4):
        super().__init__()
        self.norm1 = Affine(dim)
        self.linear_tokens = nn.Linear(seq_len, seq_len)
        self.norm2 = Affine(dim)
        self.mlp_channels = ChannelMlp(dim, int(dim * mlp_ratio))
        self.ls1 = nn.Parameter(init_values * torch.ones(dim))
        self.ls2 = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1 * self.linear_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ls2 * self.mlp_channels(self.norm2(x))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        f64 = torch.float64
        a1, b1 = self.norm1.alpha.reshape(-1).to(f64), self.norm1.beta.reshape(-1).to(f64)
        ls1 = self.ls1.to(f64)
        w, bt = self.linear_tokens.weight.to(f64), self.linear_tokens.bias.to(f64)
        # T(a*x + b)[n, c] = a_c (W x)[n, c] + b_c * sum_m W[n, m] + bt[n]: alpha commutes
        # through W (it acts on channels, W on tokens) but stays per channel, the beta part
        # is a constant (N, C) table; ls1 scales both.
        scale = ls1 * a1
        table = ls1[None, :] * (w.sum(1)[:, None] * b1[None, :] + bt[:, None])
        ctx.folded("Affine->token-mix scale + bias table", "norm1")
        ctx.folded("LayerScale->token-mix scale + bias table", "ls1")
        ctx.left("linear_tokens", "per-channel scale + (N, C) bias table",
                 "alpha1*ls1 differs per channel while the token weight is shared by all channels: "
                 "one multiply-add stays after the token matmul (exact form, not a single linear)")
        fc1, fc2 = self.mlp_channels.fc1, self.mlp_channels.fc2
        w1, c1 = T.fold_affine_before(fc1.weight, fc1.bias, self.norm2.alpha.reshape(-1), self.norm2.beta.reshape(-1))
        ctx.folded("Affine->Linear", "norm2")
        w2, c2 = T.fold_affine_after(fc2.weight, fc2.bias, self.ls2, torch.zeros_like(self.ls2))
        ctx.folded("LayerScale->Linear", "ls2")
        dt = self.ls1.dtype
        return ResMLPDeployBlock(w.to(dt), scale.to(dt), table.to(dt), clone_linear(w1, c1), clone_linear(w2, c2))


class ResMLPDeployBlock(nn.Module):
    """``x + s * (W @ x) + table`` then ``x + fc2(gelu(fc1(x)))`` on (B, N, C).

    Exported, ``W @ x`` with W (N, N) on the left of (B, N, C) is a broadcast MatMul: no
    transposes, and the batch dimension stays symbolic in ONNX. In eager PyTorch the same
    product runs as ``Linear`` on the transposed view (a free view there; the broadcast
    matmul is B small GEMMs instead of one).
    """

    def __init__(self, token_weight: Tensor, token_scale: Tensor, token_bias: Tensor, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.token_weight = nn.Parameter(token_weight.detach().clone())  # (N, N)
        self.token_scale = nn.Parameter(token_scale.detach().clone())  # (C,)
        self.token_bias = nn.Parameter(token_bias.detach().clone())  # (N, C)
        self.fc1, self.act, self.fc2 = fc1, nn.GELU(), fc2

    def forward(self, x: Tensor) -> Tensor:
        if exporting():  # W from the left: no Transpose nodes in the graph
            mixed = torch.matmul(self.token_weight, x)
        else:  # eager: one GEMM over B*C rows on the transposed view, as the train form runs it
            mixed = F.linear(x.transpose(1, 2), self.token_weight).transpose(1, 2)
        x = x + self.token_scale * mixed + self.token_bias
        return x + self.fc2(self.act(self.fc1(x)))


class PatchMlpNet(nn.Module):
    """timm's ``MlpMixer`` skeleton, shared by ResMLP and MLP-Mixer: patch stem -> blocks -> a final
    per-channel norm -> token mean -> head. Input (B, in_chans, H, W) at the fixed size.

    A subclass names its final norm's affine (:meth:`final_affine`); the deploy form folds it into
    the head through the token mean (the mean commutes with a per-channel affine).
    """

    def __init__(self, patch_size: int, in_chans: int, num_classes: int, embed_dim: int, blocks: list[nn.Module],
                 norm: nn.Module):
        super().__init__()
        self.stem = PatchStem(in_chans, embed_dim, patch_size)
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean(1))

    def final_affine(self) -> tuple[Tensor, Tensor, str, nn.Module]:
        """(scale (C,), shift (C,), what it is, the norm without its affine)."""
        raise NotImplementedError

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        scale, shift, what, plain = self.final_affine()
        if isinstance(self.head, nn.Linear):
            fold_head_through_mean(self, ctx, scale, shift, what)
            self.norm = plain
        else:
            ctx.left("norm", what, f"no classifier head (num_classes=0) to fold the final {what} into")
        return self


class ResMLP(PatchMlpNet):
    """ResMLP: ResBlocks and a final Affine."""

    def __init__(self, img_size: int | tuple = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, mlp_ratio: float = 4, init_values: float = 1e-4):
        seq_len = token_count(img_size, patch_size)
        super().__init__(patch_size, in_chans, num_classes, embed_dim,
                         [ResBlock(embed_dim, seq_len, mlp_ratio, init_values) for _ in range(depth)],
                         Affine(embed_dim))

    def final_affine(self) -> tuple[Tensor, Tensor, str, nn.Module]:
        return self.norm.alpha.reshape(-1), self.norm.beta.reshape(-1), "Affine", nn.Identity()


# ------------------------------------------------------------------ formats
_INIT_VALUES = re.compile(r"ResBlock(?:\(init_values=([0-9.eE+-]+)\))?")


def _init_values(block_layer: str) -> float:
    m = _INIT_VALUES.fullmatch(str(block_layer))
    if not m:
        raise ValueError(f"block_layer {block_layer!r} is not ResBlock (a MixerBlock config is arch timm-mixer)")
    return float(m.group(1)) if m.group(1) else 1e-4


# timm builds ResMLP and Mixer with the same class, MlpMixer: these are its constructor arguments
TIMM_MLPMIXER_ARGS = {"num_classes", "img_size", "in_chans", "patch_size", "num_blocks", "embed_dim", "mlp_ratio",
              "block_layer", "norm_layer", "act_layer", "drop_rate", "proj_drop_rate", "drop_path_rate",
              "stem_norm", "global_pool", "nlhb", "timm_model_name"}


def check_timm_args(config: dict, fmt: str, **choices: tuple) -> None:
    """Refuse timm MlpMixer arguments this package does not model, instead of ignoring them."""
    unknown = set(config) - TIMM_MLPMIXER_ARGS
    if unknown:
        raise TypeError(f"unexpected {fmt} arguments {sorted(unknown)}")
    for key, allowed in {"act_layer": ("GELU",), "stem_norm": (False,), "global_pool": ("avg",), **choices}.items():
        check_choice(config, key, allowed, fmt)


def build_timm(config: dict) -> ResMLP:
    """timm ``MlpMixer(block_layer=ResBlock, norm_layer=Affine, ...)`` arguments -> model (drop rates: eval no-ops)."""
    check_timm_args(config, "timm-resmlp", norm_layer=("Affine",))
    mlp_ratio = config.get("mlp_ratio", 4)
    if isinstance(mlp_ratio, (list, tuple)):  # ResBlock takes a scalar ratio
        raise ValueError(f"timm-resmlp: mlp_ratio must be a number, got {mlp_ratio!r}")
    return ResMLP(config.get("img_size", 224), config.get("patch_size", 16), config.get("in_chans", 3),
                  config.get("num_classes", 1000), config.get("embed_dim", 512), config.get("num_blocks", 8),
                  mlp_ratio, _init_values(config.get("block_layer", "ResBlock")))


_DEIT_KEYS = {"img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "drop_rate",
              "Patch_layer", "act_layer", "drop_path_rate", "init_scale"}


def build_deit(config: dict) -> ResMLP:
    """facebookresearch/deit ``resmlp_models(...)`` arguments -> model (hidden width is always 4C upstream)."""
    unknown = set(config) - _DEIT_KEYS
    if unknown:
        raise TypeError(f"unexpected official-deit-resmlp arguments {sorted(unknown)}")
    check_choice(config, "Patch_layer", ("PatchEmbed",), "official-deit-resmlp")
    check_choice(config, "act_layer", ("GELU",), "official-deit-resmlp")
    return ResMLP(config.get("img_size", 224), config.get("patch_size", 16), config.get("in_chans", 3),
                  config.get("num_classes", 1000), config.get("embed_dim", 768), config.get("depth", 12),
                  4, config.get("init_scale", 1e-4))


_DEIT_RENAMES = ((r"^patch_embed\.", "stem."), (r"\.attn\.", ".linear_tokens."), (r"\.mlp\.", ".mlp_channels."),
                 (r"\.gamma_(\d)$", r".ls\1"))


def deit_to_timm_keys(sd: StateDict) -> dict[str, Tensor]:
    """Official deit keys -> timm/internal keys; Affine alpha/beta (C,) -> (1, 1, C)."""
    out = {}
    for k, v in sd.items():
        for pattern, new in _DEIT_RENAMES:
            k = re.sub(pattern, new, k)
        if k.endswith((".alpha", ".beta")) and v.dim() == 1:
            v = v.reshape(1, 1, -1)
        out[k] = v
    return out


def _common_shapes(sd: StateDict, fmt: str, stem: str, tokens: str, fc1: str, depth_probe: str) -> dict:
    w = need(sd, f"{stem}.weight", fmt)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"{fmt}: {stem}.weight has shape {tuple(w.shape)}, expected (C, in, p, p)")
    dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    n = int(need(sd, f"blocks.0.{tokens}.weight", fmt).shape[0])
    hidden = int(need(sd, f"blocks.0.{fc1}.weight", fmt).shape[0])
    head = sd.get("head.weight")
    return dict(dim=dim, in_chans=in_chans, patch=patch, img=square_grid(n, patch, fmt),
                depth=count_blocks(sd, depth_probe), hidden=hidden,
                num_classes=int(head.shape[0]) if head is not None else 0)


def infer_timm(sd: StateDict) -> dict:
    s = _common_shapes(sd, "timm-resmlp", "stem.proj", "linear_tokens", "mlp_channels.fc1", "ls1")
    ratio = s["hidden"] / s["dim"]
    return dict(num_classes=s["num_classes"], img_size=s["img"], in_chans=s["in_chans"], patch_size=s["patch"],
                num_blocks=s["depth"], embed_dim=s["dim"], mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
                block_layer="ResBlock", norm_layer="Affine")


def infer_deit(sd: StateDict) -> dict:
    s = _common_shapes(sd, "official-deit-resmlp", "patch_embed.proj", "attn", "mlp.fc1", "gamma_1")
    if s["hidden"] != 4 * s["dim"]:
        raise CheckpointError(f"official-deit-resmlp: MLP hidden {s['hidden']} != 4 x embed_dim {s['dim']}")
    return dict(img_size=s["img"], patch_size=s["patch"], in_chans=s["in_chans"], num_classes=s["num_classes"],
                embed_dim=s["dim"], depth=s["depth"])


def fixed_input_size(config: dict) -> tuple[int, int, int]:
    """(in_chans, H, W) of an ``img_size``/``in_chans`` config (these models take one size only)."""
    h, w = image_hw(config.get("img_size", 224))
    return config.get("in_chans", 3), h, w


def resize_img_size(config: dict, size: tuple[int, int]) -> dict:
    """``img_size`` at another size (the token-mixing weights then have another shape: a
    checkpoint made for one size does not load at another)."""
    patch = config.get("patch_size", 16)
    if size[0] % patch or size[1] % patch:
        raise ValueError(f"each side must be a multiple of the patch size {patch}")
    return {**config, "img_size": size[0] if size[0] == size[1] else list(size)}


register_format(
    "timm-resmlp", family="resmlp", build=build_timm, infer_config=infer_timm, input_size=fixed_input_size,
    resize=resize_img_size, matches=has_keys("stem.proj.weight", "blocks.0.linear_tokens.weight"),
    description="ResMLP, timm MlpMixer(block_layer=ResBlock, norm_layer=Affine) keys",
)
register_format(
    "official-deit-resmlp", family="resmlp", build=build_deit, infer_config=infer_deit, input_size=fixed_input_size,
    resize=resize_img_size, to_model_keys=deit_to_timm_keys,
    matches=has_keys("patch_embed.proj.weight", "blocks.0.attn.weight", "blocks.0.gamma_1"),
    description="ResMLP, facebookresearch/deit resmlp_models.py keys",
)

for _name, _patch, _depth, _dim, _init in (("resmlp_12", 16, 12, 384, None), ("resmlp_24", 16, 24, 384, 1e-5),
                                           ("resmlp_36", 16, 36, 384, 1e-6), ("resmlp_big_24", 8, 24, 768, 1e-6)):
    register_config(
        _name, "timm-resmlp", f"ResMLP, {_depth} blocks, dim {_dim}, patch {_patch}, 224px",
        num_classes=1000, img_size=224, in_chans=3, patch_size=_patch, num_blocks=_depth, embed_dim=_dim,
        mlp_ratio=4, block_layer="ResBlock" if _init is None else f"ResBlock(init_values={_init})", norm_layer="Affine",
    )
