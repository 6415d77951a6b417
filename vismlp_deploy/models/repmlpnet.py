"""RepMLPNet (DingXiaoH/RepMLP ``repmlpnet.py``): train form with the official keys, exact deploy form.

Unit: ``y = x + RepMLPBlock(prebn1(x))``, ``z = y + FFN(prebn2(y))``. Deploy folds, all exact:
fc3_bn + the local-perceptron conv/BN branches -> fc3 with a bias (locality injection);
prebn2 -> FFN fc1 (1x1, no padding); FFN, stem and downsample BNs -> their convs;
head_norm -> head Linear (through the spatial mean, which is linear and per channel).
prebn1 stays (see :meth:`RepMLPNetUnit.reparameterize`).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from ._repmlp_common import (
    fold_conv_bn_,
    fold_sharesets_fc_,
    merged_local_perceptron,
    min_input_side,
    sharesets_partition,
    sharesets_reassemble,
    split_hw,
)
from .layers import ConvBN, PointwiseMlp, bn_affine, clone_conv, clone_linear
from .registry import register_config, register_format


class ConvBNReLU(nn.Sequential):
    """Official ``conv_bn_relu`` (keys ``conv``, ``bn``); deploys as conv with bias + ReLU."""

    def __init__(self, cin: int, cout: int, k: int | Sequence[int], stride: int | Sequence[int]):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        ctx.folded("BatchNorm2d->Conv2d")
        return nn.Sequential(fold_conv_bn_(self.conv, self.bn), nn.ReLU())


class ConvBNInPlace(ConvBN):
    """:class:`ConvBN` (keys ``conv``, ``bn``) whose fold reuses the conv's storage.

    The walker hands every module a private deep copy, so folding in place costs no second
    weight: this keeps the peak memory of converting the full-size models at their size.
    """

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        ctx.folded("BatchNorm2d->Conv2d")
        return fold_conv_bn_(self.conv, self.bn)


def conv_bn_pair(cin: int, cout: int) -> nn.Sequential:
    """1x1 conv then BN (keys ``conv``, ``bn``), folded by its owner together with the BN before it."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 1, bias=False), bn=nn.BatchNorm2d(cout)))


class GlobalPerceptron(PointwiseMlp):
    """Channel gate: mean -> 1x1 fc1 -> ReLU -> 1x1 fc2 -> sigmoid. (N,C,H,W) -> (N,C,1,1)."""

    def __init__(self, channels: int, internal: int):
        super().__init__(channels, internal, nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(super().forward(x.mean((2, 3), keepdim=True)))


class RepMLPNetBlock(nn.Module):
    """The official ``RepMLPBlock``: gate * [fc3_bn(fc3(blocks)) + Σ_k BN_k(conv_k(blocks))].

    ``deploy=True`` gives the official deploy key set (fc3 with bias, no fc3_bn/repconv).
    (N, C, H, W) -> (N, C, H, W), H % h == 0, W % w == 0.
    """

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k: Sequence[int] | None,
                 globalperceptron_reduce: int, num_sharesets: int, deploy: bool = False):
        super().__init__()
        if channels % num_sharesets:
            raise ValueError(f"channels {channels} not divisible by sharesets {num_sharesets}")
        self.C, self.S, self.h, self.w = channels, num_sharesets, h, w
        self.gp = GlobalPerceptron(channels, channels // globalperceptron_reduce)
        n = num_sharesets * h * w
        self.fc3 = nn.Conv2d(n, n, 1, groups=num_sharesets, bias=deploy)
        self.ks = [] if deploy or not reparam_conv_k else list(reparam_conv_k)
        if not deploy:
            self.fc3_bn = nn.BatchNorm2d(num_sharesets)
        for k in self.ks:
            self.add_module(f"repconv{k}",
                            ConvBNInPlace(num_sharesets, num_sharesets, k, padding=k // 2, groups=num_sharesets))

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gp(x)
        blocks = sharesets_partition(x, self.h, self.w, self.S)  # (B, S, h, w)
        out = self.fc3(blocks.reshape(-1, self.S * self.h * self.w, 1, 1)).reshape(-1, self.S, self.h, self.w)
        if hasattr(self, "fc3_bn"):
            out = self.fc3_bn(out)
        for k in self.ks:
            out = out + getattr(self, f"repconv{k}")(blocks)
        return sharesets_reassemble(out, self.C, x.shape[2], x.shape[3], self.h, self.w, self.S) * gate

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        n_s, n = self.S, self.h * self.w
        # the walker handed us a private copy: fold into fc3's own storage (no second copy)
        weight = self.fc3.weight.data.view(n_s, n, n)
        if hasattr(self, "fc3_bn"):
            s, t = bn_affine(self.fc3_bn)
            ctx.folded("BatchNorm2d->fc3", "fc3_bn")
        else:  # official deploy checkpoint: already folded
            s, t = torch.ones(n_s, dtype=torch.float64), torch.zeros(n_s, dtype=torch.float64)
        kernel = kbias = None
        if self.ks:
            kernel, kbias, _ = merged_local_perceptron(self, ctx)
            ctx.folded("Conv2d->fc3 (locality injection)", "repconv*")
        bias = fold_sharesets_fc_(weight, s, t, kernel, kbias, self.h, self.w)
        if self.fc3.bias is not None:
            bias = bias + self.fc3.bias.detach().view(n_s, n)
        return RepMLPNetDeployBlock(self.gp, weight, bias, self.C, self.h, self.w)


class RepMLPNetDeployBlock(nn.Module):
    """Deploy RepMLPNet block: gate * reassemble(fc(partition(x))), same order as train.

    fc applies one (hw × hw) matrix + bias per shareset, as a batched matmul over the S
    sharesets (faster on CPU than the grouped 1x1 conv; see ``benchmarks/convert_speed.py``)
    and as one plain matmul when S == 1. weight (S, hw, hw), bias (S, hw).
    """

    def __init__(self, gp: GlobalPerceptron, weight: Tensor, bias: Tensor, channels: int, h: int, w: int):
        super().__init__()
        self.gp = gp
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.C, self.S, self.h, self.w = channels, weight.shape[0], h, w

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gp(x)
        blocks = sharesets_partition(x, self.h, self.w, self.S).reshape(-1, self.S, self.h * self.w)
        if self.S == 1:
            out = F.linear(blocks, self.weight[0], self.bias[0])
        else:  # (S, B, hw) @ (S, hw, hw)^T per shareset
            out = torch.baddbmm(self.bias.unsqueeze(1), blocks.transpose(0, 1), self.weight.transpose(1, 2))
            out = out.transpose(0, 1)
        return sharesets_reassemble(out, self.C, x.shape[2], x.shape[3], self.h, self.w, self.S) * gate


class FFNBlock(nn.Module):
    """1x1 conv+BN -> GELU -> 1x1 conv+BN (keys ``ffn_fc1``, ``ffn_fc2``)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.ffn_fc1 = conv_bn_pair(channels, hidden)  # folded with prebn2 by the unit
        self.ffn_fc2 = ConvBNInPlace(hidden, channels, 1)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_fc2(self.act(self.ffn_fc1(x)))


class RepMLPNetUnit(nn.Module):
    """``y = x + block(prebn1(x))``, ``z = y + ffn(prebn2(y))``."""

    def __init__(self, channels: int, h: int, w: int, reparam_conv_k, globalperceptron_reduce: int,
                 num_sharesets: int, ffn_expand: int = 4, deploy: bool = False):
        super().__init__()
        self.repmlp_block = RepMLPNetBlock(channels, h, w, reparam_conv_k, globalperceptron_reduce,
                                           num_sharesets, deploy)
        self.ffn_block = FFNBlock(channels, channels * ffn_expand)
        self.prebn1 = nn.BatchNorm2d(channels)
        self.prebn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = x + self.repmlp_block(self.prebn1(x))
        return y + self.ffn_block(self.prebn2(y))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        fc1 = self.ffn_block.ffn_fc1
        if isinstance(self.prebn2, nn.BatchNorm2d) and isinstance(fc1, nn.Sequential):
            # bn(W (s x + t)) with a 1x1 conv without padding: both affines enter W and b exactly
            self.ffn_block.ffn_fc1 = fold_conv_bn_(fc1.conv, fc1.bn, before=bn_affine(self.prebn2))
            self.prebn2 = nn.Identity()
            ctx.folded("BatchNorm2d->Conv2d", "ffn_block.ffn_fc1")
            ctx.folded("BatchNorm2d->Conv2d (input side)", "prebn2")
        if isinstance(self.prebn1, nn.BatchNorm2d):
            block = self.repmlp_block
            if isinstance(block, RepMLPNetDeployBlock) and block.S == block.C:
                self._fold_prebn1(block)
                ctx.folded("BatchNorm2d->fc3 (input side, one channel per shareset)", "prebn1")
            else:
                ctx.left("prebn1", "BatchNorm2d",
                         f"prebn1 feeds fc3, whose weight sets are each shared by {block.C // block.S} channels "
                         "(c = q*S + s) with different BN scales, so no single weight fits them; it cannot "
                         "move backwards either, because the residual stream needs x unscaled")
        return self

    def _fold_prebn1(self, block: RepMLPNetDeployBlock) -> None:
        """S == C: each channel owns its (hw × hw) matrix and the fc has no padding, so
        ``W_c (s_c x + t_c) + b = (s_c W_c) x + (b + t_c rowsum(W_c))``; the gate's fc1
        sees the mean of ``s x + t`` = ``s mean(x) + t`` (a 1x1 conv, exact)."""
        s, t = bn_affine(self.prebn1)
        w64 = block.weight.detach().to(torch.float64)
        block.bias.data = (block.bias.detach().to(torch.float64) + t[:, None] * w64.sum(2)).to(block.bias.dtype)
        block.weight.data = (w64 * s[:, None, None]).to(block.weight.dtype)
        fc1 = block.gp.fc1
        w, b = T.fold_affine_before(fc1.weight, fc1.bias, s, t)
        block.gp.fc1 = clone_conv(fc1, w, b)
        self.prebn1 = nn.Identity()


class RepMLPNet(nn.Module):
    """The official RepMLPNet; constructor arguments and state_dict keys as upstream.

    (N, in_channels, H, W) -> (N, num_class); H, W multiples of patch * lcm_i(h_i * 2^i).
    """

    def __init__(self, in_channels: int = 3, num_class: int = 1000, patch_size: Sequence[int] = (4, 4),
                 num_blocks: Sequence[int] = (2, 2, 6, 2), channels: Sequence[int] = (192, 384, 768, 1536),
                 hs: Sequence[int] = (64, 32, 16, 8), ws: Sequence[int] = (64, 32, 16, 8),
                 sharesets_nums: Sequence[int] = (4, 8, 16, 32), reparam_conv_k: Sequence[int] = (3,),
                 globalperceptron_reduce: int = 4, use_checkpoint: bool = False, deploy: bool = False):
        super().__init__()
        n = len(num_blocks)
        if not (len(channels) == len(hs) == len(ws) == len(sharesets_nums) == n):
            raise ValueError("num_blocks, channels, hs, ws and sharesets_nums must have one entry per stage")
        self.conv_embedding = ConvBNReLU(in_channels, channels[0], tuple(patch_size), tuple(patch_size))
        self.stages = nn.ModuleList(
            nn.ModuleList(RepMLPNetUnit(channels[i], hs[i], ws[i], reparam_conv_k, globalperceptron_reduce,
                                        sharesets_nums[i], deploy=deploy) for _ in range(num_blocks[i]))
            for i in range(n))
        self.embeds = nn.ModuleList(ConvBNReLU(channels[i], channels[i + 1], 2, 2) for i in range(n - 1))
        self.head_norm = nn.BatchNorm2d(channels[-1])
        self.head = nn.Linear(channels[-1], num_class)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_embedding(x)
        for i, stage in enumerate(self.stages):
            for unit in stage:
                x = unit(x)
            if i < len(self.embeds):
                x = self.embeds[i](x)
        return self.head(self.head_norm(x).mean((2, 3)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        # head(mean(s x + t)) = (W s) mean(x) + (b + W t): mean is linear and per channel
        s, t = bn_affine(self.head_norm)
        w, b = T.fold_affine_before(self.head.weight, self.head.bias, s, t)
        self.head = clone_linear(w, b)
        self.head_norm = nn.Identity()
        ctx.folded("BatchNorm2d->Linear (through mean)", "head_norm")
        return self


# ------------------------------------------------------------------------------ formats
_OFFICIAL_ARGS = ("in_channels", "num_class", "patch_size", "num_blocks", "channels", "hs", "ws",
                  "sharesets_nums", "reparam_conv_k", "globalperceptron_reduce")


def _build(deploy: bool):
    def build(config: dict) -> nn.Module:
        cfg = dict(config)
        if bool(cfg.pop("deploy", False)) != deploy:
            fmt = "official-repmlpnet-deploy" if not deploy else "official-repmlpnet"
            raise ValueError(f"config has deploy={not deploy}: use the format {fmt}")
        cfg.pop("use_checkpoint", None)
        unknown = set(cfg) - set(_OFFICIAL_ARGS)
        if unknown:
            raise ValueError(f"unknown RepMLPNet arguments {sorted(unknown)}")
        return RepMLPNet(**cfg, deploy=deploy)
    return build


def _matches(deploy: bool):
    def matches(sd: Mapping[str, Tensor]) -> bool:
        if "conv_embedding.conv.weight" not in sd or "stages.0.0.repmlp_block.fc3.weight" not in sd:
            return False
        return ("stages.0.0.repmlp_block.fc3.bias" in sd) == deploy
    return matches


def _infer_config(deploy: bool):
    def infer(sd: Mapping[str, Tensor]) -> dict:
        try:
            stem = sd["conv_embedding.conv.weight"]
            n_stages = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"stages\.(\d+)\.", k)))
            blocks, channels, hs, ws, sets = [], [], [], [], []
            for i in range(n_stages):
                blocks.append(1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))))
                channels.append(sd[f"stages.{i}.0.prebn1.weight"].shape[0])
                fc3 = sd[f"stages.{i}.0.repmlp_block.fc3.weight"]
                sets.append(fc3.shape[0] // fc3.shape[1])
                h, w = split_hw(fc3.shape[1], f"stage {i}")
                hs.append(h)
                ws.append(w)
            prefix = "stages.0.0.repmlp_block."
            pattern = re.escape(prefix) + r"repconv(\d+)\.conv\.weight"
            ks = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k)))
            gp = sd[prefix + "gp.fc1.weight"].shape[0]
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"not a complete RepMLPNet state_dict ({e})") from None
        return dict(in_channels=stem.shape[1], num_class=sd["head.weight"].shape[0],
                    patch_size=list(stem.shape[2:]), num_blocks=blocks, channels=channels, hs=hs, ws=ws,
                    sharesets_nums=sets, reparam_conv_k=ks or None, globalperceptron_reduce=channels[0] // gp,
                    deploy=deploy)
    return infer


def _input_size(config: dict) -> tuple[int, int, int]:
    ph, pw = config.get("patch_size", (4, 4))
    return (config.get("in_channels", 3), min_input_side(config["hs"], ph), min_input_side(config["ws"], pw))


def _resize(config: dict, size: tuple[int, int]) -> dict:
    """A larger map splits into more partitions of the same h x w (fc3 is shared by all of them):
    any multiple of the smallest side, same config."""
    _, h, w = _input_size(config)
    if size[0] % h or size[1] % w:
        raise ValueError(f"each side must be a multiple of the partition grid's side ({h}x{w})")
    return config


register_format(
    "official-repmlpnet", family="repmlpnet", build=_build(False), resize=_resize, matches=_matches(False),
    infer_config=_infer_config(False), input_size=_input_size,
    description="RepMLPNet, DingXiaoH/RepMLP repmlpnet.py (train-time keys)",
)
# The official deploy keys (fc3 with bias, no fc3_bn/repconv) load into the same module
# tree with deploy=True (reparam_conv_k is then unused and not recorded by the keys).
register_format(
    "official-repmlpnet-deploy", family="repmlpnet", build=_build(True), resize=_resize, matches=_matches(True),
    infer_config=_infer_config(True), input_size=_input_size,
    description="RepMLPNet after the official locality injection (fc3 with bias)",
)

_COMMON = dict(in_channels=3, num_class=1000, patch_size=[4, 4], reparam_conv_k=[1, 3], globalperceptron_reduce=4)
_P224, _P256 = [56, 28, 14, 7], [64, 32, 16, 8]
for _name, _ch, _blocks, _sets, _hw in [
    ("t224", [64, 128, 256, 512], [2, 2, 6, 2], [1, 4, 16, 128], _P224),
    ("b224", [96, 192, 384, 768], [2, 2, 12, 2], [1, 4, 32, 128], _P224),
    ("t256", [64, 128, 256, 512], [2, 2, 6, 2], [1, 4, 16, 128], _P256),
    ("b256", [96, 192, 384, 768], [2, 2, 12, 2], [1, 4, 32, 128], _P256),
    ("l256", [96, 192, 384, 768], [2, 2, 18, 2], [1, 4, 32, 256], _P256),
]:
    register_config(f"repmlpnet_{_name}", "official-repmlpnet", f"RepMLPNet-{_name.upper()}",
                    channels=_ch, num_blocks=_blocks, sharesets_nums=_sets, hs=_hw, ws=_hw, **_COMMON)
