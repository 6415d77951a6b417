"""MLP-Mixer (Tolstikhin et al. 2021), timm ``MlpMixer`` + ``MixerBlock`` keys (the official code is Flax).

Train block on x (B, N, C), N tokens (row-major), LayerNorm eps 1e-6, exact GELU::

    x = x + Tmlp(LN1(x)^T)^T        Tmlp: Linear(N, t) -> GELU -> Linear(t, N), t = int(r0*C)
    x = x + Cmlp(LN2(x))            Cmlp: Linear(C, c) -> GELU -> Linear(c, C), c = int(r1*C)

Deploy block (exact)::

    x = x + Tmlp(LN1(x)^T)^T                     token MLP unchanged (LN1 keeps its affine)
    x = x + fc2(gelu(fc1'(LN2'(x))))             LN2's gamma/beta -> fc1', LN2' without affine

LN1's affine stays: gamma/beta act per channel while W1 is shared by all channels, so they
could only move behind W1 as a per-channel scale + (t, C) bias table, which adds work.
The final LN's gamma/beta enter the head through the token mean.

Two exact lowerings of the same parameters, chosen at trace time (:func:`exporting`),
because the backends prefer opposite layouts (Mixer-B/16 block, batch 8, CPU):

- exported graph (ONNX / torch.export): the token MLP as MatMuls from the left,
  ``x + W2 @ gelu(W1 @ LN1(x) + b1) + b2``, no transposes (onnxruntime 17.4 vs 26.5 ms: the
  transposes become Transpose copies), and LN2' as an affine-free LayerNormalization
  (0.36 vs 0.46 ms).
- PyTorch eager: Linear on the transposed *views* as in the train form (a transpose is a
  free view there; 11.6 vs 13.1 ms for the left MatMuls), and LN2' through the affine
  LayerNorm kernel with gamma = 1 (exact: ``y * 1 == y``), which is the fast path (0.25 vs
  0.47 ms for ``weight=None``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import clone_linear, exporting
from .registry import StateDict, has_keys, register_config, register_format
from .resmlp import (
    ChannelMlp,
    PatchMlpNet,
    check_timm_args,
    count_blocks,
    fixed_input_size,
    need,
    resize_img_size,
    square_grid,
    token_count,
)

LN_EPS = 1e-6


class PlainLayerNorm(nn.LayerNorm):
    """LayerNorm without gamma/beta (they were folded into the next linear); (..., C) -> (..., C).

    Exported as an affine-free LayerNorm; in eager it passes gamma = 1, made per call (C
    floats, so no parameter, buffer or key is added): ``y * 1`` is exact and PyTorch's CPU
    kernel with a weight is about 2x faster than its ``weight=None`` path.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = None if exporting() else x.new_ones(self.normalized_shape)
        return F.layer_norm(x, self.normalized_shape, weight, None, self.eps)


def _plain_layernorm(ln: nn.LayerNorm) -> PlainLayerNorm:
    """The same normalisation without gamma/beta (they have been folded into the next linear)."""
    return PlainLayerNorm(ln.normalized_shape, ln.eps, elementwise_affine=False)


class MixerBlock(nn.Module):
    """Token-mixing MLP then channel-mixing MLP, each pre-LN and residual."""

    def __init__(self, dim: int, seq_len: int, mlp_ratio: tuple[float, float] = (0.5, 4.0)):
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp_tokens = ChannelMlp(seq_len, tokens_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp_channels = ChannelMlp(dim, channels_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        fc1, fc2 = self.mlp_channels.fc1, self.mlp_channels.fc2
        w1, b1 = T.fold_affine_before(fc1.weight, fc1.bias, self.norm2.weight, self.norm2.bias)
        ctx.folded("LayerNorm affine->Linear", "norm2")
        ctx.left("norm1", "LayerNorm affine",
                 "gamma1/beta1 vary per channel while the token fc1 is shared by all channels: they could "
                 "only move behind it as a per-channel scale + (t, C) bias table, which adds work; "
                 "kept inside the LayerNorm (one fused kernel / ONNX LayerNormalization)")
        return MixerDeployBlock(self.norm1, self.mlp_tokens.fc1, self.mlp_tokens.fc2,
                                _plain_layernorm(self.norm2), clone_linear(w1, b1), fc2)


class MixerDeployBlock(nn.Module):
    """Token MLP, then channel MLP with LN2's affine folded into fc1; x (B, N, C) -> (B, N, C).

    Both lowerings of the token MLP below are the train form's arithmetic; see the module
    docstring for why each backend gets its own.
    """

    def __init__(self, norm1: nn.LayerNorm, tok_fc1: nn.Linear, tok_fc2: nn.Linear,
                 norm2: PlainLayerNorm, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.norm1 = norm1
        self.token_w1 = nn.Parameter(tok_fc1.weight.detach().clone())  # (t, N)
        self.token_b1 = nn.Parameter(tok_fc1.bias.detach().clone())  # (t,)
        self.token_w2 = nn.Parameter(tok_fc2.weight.detach().clone())  # (N, t)
        self.token_b2 = nn.Parameter(tok_fc2.bias.detach().clone())  # (N,)
        self.act = nn.GELU()
        self.norm2, self.fc1, self.fc2 = norm2, fc1, fc2

    def token_mix(self, x: Tensor) -> Tensor:
        """``W2 @ gelu(W1 @ LN1(x) + b1) + b2`` on (B, N, C)."""
        y = self.norm1(x)
        if exporting():  # broadcast MatMuls from the left, biases as columns: no Transpose nodes
            h = self.act(torch.matmul(self.token_w1, y) + self.token_b1[:, None])
            return torch.matmul(self.token_w2, h) + self.token_b2[:, None]
        h = self.act(F.linear(y.transpose(1, 2), self.token_w1, self.token_b1))  # transposes are views here
        return F.linear(h, self.token_w2, self.token_b2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mix(x)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class MlpMixer(PatchMlpNet):
    """MLP-Mixer: MixerBlocks and a final LayerNorm."""

    def __init__(self, img_size: int | tuple = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 512, num_blocks: int = 8, mlp_ratio: tuple[float, float] = (0.5, 4.0)):
        seq_len = token_count(img_size, patch_size)
        super().__init__(patch_size, in_chans, num_classes, embed_dim,
                         [MixerBlock(embed_dim, seq_len, mlp_ratio) for _ in range(num_blocks)],
                         nn.LayerNorm(embed_dim, eps=LN_EPS))

    def final_affine(self) -> tuple[Tensor, Tensor, str, nn.Module]:
        return self.norm.weight, self.norm.bias, "LayerNorm affine", _plain_layernorm(self.norm)


# ------------------------------------------------------------------ format


def _ratios(mlp_ratio: float | list | tuple) -> tuple[float, float]:
    """timm's ``to_2tuple(mlp_ratio)``: a scalar sets both the token and the channel ratio."""
    if isinstance(mlp_ratio, (int, float)):
        return float(mlp_ratio), float(mlp_ratio)
    r0, r1 = mlp_ratio
    return float(r0), float(r1)


def build_timm(config: dict) -> MlpMixer:
    """timm ``MlpMixer(...)`` arguments (default MixerBlock) -> model (drop rates: eval no-ops)."""
    check_timm_args(config, "timm-mixer", block_layer=("MixerBlock",))
    return MlpMixer(config.get("img_size", 224), config.get("patch_size", 16), config.get("in_chans", 3),
                    config.get("num_classes", 1000), config.get("embed_dim", 512), config.get("num_blocks", 8),
                    _ratios(config.get("mlp_ratio", (0.5, 4.0))))


def _ratio_for(hidden: int, dim: int) -> float:
    """A ratio r with ``int(r * dim) == hidden`` (hidden/dim can round just below in floats)."""
    r = hidden / dim
    while int(r * dim) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def infer_timm(sd: StateDict) -> dict:
    fmt = "timm-mixer"
    w = need(sd, "stem.proj.weight", fmt)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise CheckpointError(f"{fmt}: stem.proj.weight has shape {tuple(w.shape)}, expected (C, in, p, p)")
    dim, patch = int(w.shape[0]), int(w.shape[2])
    tokens_dim, seq_len = (int(n) for n in need(sd, "blocks.0.mlp_tokens.fc1.weight", fmt).shape)
    channels_dim = int(need(sd, "blocks.0.mlp_channels.fc1.weight", fmt).shape[0])
    head = sd.get("head.weight")
    return dict(num_classes=int(head.shape[0]) if head is not None else 0, img_size=square_grid(seq_len, patch, fmt),
                in_chans=int(w.shape[1]), patch_size=patch, num_blocks=count_blocks(sd, "norm1.weight"),
                embed_dim=dim, mlp_ratio=[_ratio_for(tokens_dim, dim), _ratio_for(channels_dim, dim)])


register_format(
    "timm-mixer", family="mixer", build=build_timm, infer_config=infer_timm, input_size=fixed_input_size,
    resize=resize_img_size, matches=has_keys("stem.proj.weight", "blocks.0.mlp_tokens.fc1.weight"),
    description="MLP-Mixer, timm MlpMixer (MixerBlock) keys",
)

for _size, _dim, _depth in (("s", 512, 8), ("b", 768, 12), ("l", 1024, 24)):
    for _patch in (16, 32):
        register_config(
            f"mixer_{_size}{_patch}", "timm-mixer", f"MLP-Mixer-{_size.upper()}/{_patch}, 224px",
            num_classes=1000, img_size=224, in_chans=3, patch_size=_patch, num_blocks=_depth, embed_dim=_dim,
            mlp_ratio=[0.5, 4.0],
        )
