"""The original RepMLP block (DingXiaoH/RepMLP@c946c5e ``repmlp.py``) and RepMLP-ResNet-50.

Block (train): optional global perceptron (avg pool h×w -> BN -> flatten (c, i, j) -> fc1 ->
ReLU -> fc2, *added* to every pixel of its partition), then per partition
``fc3_bn(fc3(vec)) + Σ_k BN_k(conv_k(partition))`` with fc3 a grouped FC over C·h·w -> O·h·w.
Deploy (exact): avg.bn -> fc1 (the pooled BN output feeds a linear); the conv branches are
merged and written as an FC with the identity trick (correct reshape for C != O, unlike the
upstream converter) and added to fc3 after fc3_bn (BatchNorm1d per feature) is folded into it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from ._repmlp_common import merged_local_perceptron, split_hw
from .layers import ConvBN, bn_affine, clone_conv, clone_linear
from .registry import register_config, register_format


class RepMLP(nn.Module):
    """The c946c5e ``RepMLP`` block. (N, C, H, W) -> (N, O, H, W); H, W fixed at construction."""

    def __init__(self, in_channels: int, out_channels: int, H: int, W: int, h: int, w: int,
                 reparam_conv_k: Sequence[int] | None = None, fc1_fc2_reduction: int = 1,
                 fc3_groups: int = 1, deploy: bool = False):
        super().__init__()
        if H % h or W % w:
            raise ValueError(f"partition {h}x{w} does not tile the {H}x{W} map")
        if deploy:
            raise ValueError("deploy=True checkpoints of the original RepMLP block are not supported; "
                             "load the train-time weights")
        self.C, self.O, self.H, self.W, self.h, self.w = in_channels, out_channels, H, W, h, w
        self.hp, self.wp = H // h, W // w
        self.groups = fc3_groups
        if (H, W) != (h, w):
            n = in_channels * self.hp * self.wp
            self.fc1_fc2 = nn.Sequential()
            self.fc1_fc2.add_module("fc1", nn.Linear(n, int(n // fc1_fc2_reduction)))
            self.fc1_fc2.add_module("relu", nn.ReLU())
            self.fc1_fc2.add_module("fc2", nn.Linear(int(n // fc1_fc2_reduction), n))
            self.avg = nn.Sequential()
            self.avg.add_module("avg", nn.AvgPool2d((h, w)))
            self.avg.add_module("bn", nn.BatchNorm2d(in_channels))
        self.fc3 = nn.Conv2d(in_channels * h * w, out_channels * h * w, 1, groups=fc3_groups, bias=False)
        self.fc3_bn = nn.BatchNorm1d(out_channels * h * w)
        self.ks = list(reparam_conv_k or [])
        for k in self.ks:
            self.add_module(f"repconv{k}", ConvBN(in_channels, out_channels, k, padding=k // 2, groups=fc3_groups))

    def _partitions(self, x: Tensor) -> Tensor:
        """Global perceptron, then (N, C, H, W) -> (N, hp, wp, C, h, w)."""
        x = x.reshape(-1, self.C, self.hp, self.h, self.wp, self.w)
        if hasattr(self, "fc1_fc2"):
            v = self.fc1_fc2(self.avg(x.reshape(-1, self.C, self.H, self.W)).reshape(-1, self.C * self.hp * self.wp))
            x = x + v.reshape(-1, self.C, self.hp, 1, self.wp, 1)
        return x.permute(0, 2, 4, 1, 3, 5)

    def _reassemble(self, y: Tensor) -> Tensor:
        """(N*hp*wp, O*h*w) -> (N, O, H, W): the plain inverse of the partitioning."""
        y = y.reshape(-1, self.hp, self.wp, self.O, self.h, self.w).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(-1, self.O, self.H, self.W)

    def forward(self, x: Tensor) -> Tensor:
        parts = self._partitions(x)
        out = self.fc3_bn(self.fc3(parts.reshape(-1, self.C * self.h * self.w, 1, 1)).flatten(1))
        if self.ks:
            blocks = parts.reshape(-1, self.C, self.h, self.w)
            conv = sum(getattr(self, f"repconv{k}")(blocks) for k in self.ks)
            out = out + conv.flatten(1)
        return self._reassemble(out)

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        deploy = RepMLPDeploy(self)
        if hasattr(self, "fc1_fc2"):
            # fc1(flatten(s*avg + t)): the flatten is (c, i, j), so channel c's scale covers hp*wp inputs
            s, t = bn_affine(self.avg.bn)
            fc1 = self.fc1_fc2.fc1
            w, b = T.fold_affine_before(fc1.weight, fc1.bias, s.repeat_interleave(self.hp * self.wp),
                                        t.repeat_interleave(self.hp * self.wp))
            deploy.fc1_fc2 = nn.Sequential()
            deploy.fc1_fc2.add_module("fc1", clone_linear(w, b))
            deploy.fc1_fc2.add_module("relu", nn.ReLU())
            deploy.fc1_fc2.add_module("fc2", self.fc1_fc2.fc2)
            deploy.avg = nn.AvgPool2d((self.h, self.w))
            ctx.folded("BatchNorm2d->Linear (through avg pool)", "avg.bn")
        # fc3_bn normalises each of the O*h*w features: a per-row affine of the fc3 matrix
        bn = self.fc3_bn
        s, b64 = T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        w = self.fc3.weight
        w64 = w.detach().double() * s.reshape(-1, 1, 1, 1)  # kept in float64 until the one final cast
        ctx.folded("BatchNorm1d->fc3", "fc3_bn")
        if self.ks:
            kernel, kbias, pad = merged_local_perceptron(self, ctx)
            fc, fc_b = T.conv_to_fc(kernel, kbias, self.h, self.w, groups=self.groups, padding=pad)
            w64 = w64 + fc.reshape(w64.shape)
            b64 = b64 + fc_b
            ctx.folded("Conv2d->fc3 (identity trick)", "repconv*")
        deploy.fc3 = clone_conv(self.fc3, w64.to(w.dtype), b64.to(w.dtype))
        return deploy


class RepMLPDeploy(nn.Module):
    """Deploy RepMLP block: [avg pool -> fc1 -> ReLU -> fc2 added per partition] -> fc3 with bias.

    Keys as the upstream deploy form: ``fc1_fc2.fc1``, ``fc1_fc2.fc2``, ``fc3`` (with bias).
    """

    def __init__(self, train: RepMLP):
        super().__init__()
        for a in ("C", "O", "H", "W", "h", "w", "hp", "wp"):
            setattr(self, a, getattr(train, a))

    _reassemble = RepMLP._reassemble

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.C, self.hp, self.h, self.wp, self.w)
        if hasattr(self, "fc1_fc2"):
            v = self.fc1_fc2(self.avg(x.reshape(-1, self.C, self.H, self.W)).reshape(-1, self.C * self.hp * self.wp))
            x = x + v.reshape(-1, self.C, self.hp, 1, self.wp, 1)
        parts = x.permute(0, 2, 4, 1, 3, 5).reshape(-1, self.C * self.h * self.w, 1, 1)
        return self._reassemble(self.fc3(parts))


# ------------------------------------------------------------------- RepMLP-ResNet-50
class Bottleneck(nn.Module):
    """ResNet bottleneck; with ``mlp`` set, its 3x3 conv is replaced by a RepMLP block.

    conv1 (1x1) -> ReLU -> [conv2 3x3 (stride) | RepMLP] -> ReLU -> conv3 (1x1), + shortcut, ReLU.
    The RepMLP variant reduces to ``out // mlp_reduction`` channels (the paper's RepMLP
    bottleneck: a narrower middle keeps fc3 affordable) and carries its own BNs.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int, mlp: dict | None = None):
        super().__init__()
        self.conv1 = ConvBN(cin, mid, 1)
        if mlp is None:
            self.conv2 = ConvBN(mid, mid, 3, stride, 1)
        else:
            self.mlp = RepMLP(mid, mid, **mlp)
        self.conv3 = ConvBN(mid, cout, 1)
        self.downsample = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv1(x))
        y = F.relu(self.mlp(y) if hasattr(self, "mlp") else self.conv2(y))
        y = self.conv3(y)
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RepMLPResNet(nn.Module):
    """ResNet-50 layout (7x7/2 stem, max-pool, 4 stages) with RepMLP bottlenecks in chosen stages.

    In a RepMLP stage every bottleneck but the first (which changes resolution and width with
    its 3x3/2 conv) uses a RepMLP block on the stage's fixed map of side image_size / 2^(i+2).
    partitions: one (h, w) per RepMLP stage. (N, in_channels, S, S) -> (N, num_classes).
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, num_classes: int = 1000,
                 in_channels: int = 3, image_size: int = 224, repmlp_stages: Sequence[int] = (2,),
                 partitions: Sequence[Sequence[int]] = ((7, 7),), reparam_conv_k: Sequence[int] = (1, 3, 5),
                 fc1_fc2_reduction: int = 4, fc3_groups: int = 4, mlp_reduction: int = 8):
        super().__init__()
        if len(partitions) != len(repmlp_stages):
            raise ValueError("give one (h, w) partition per RepMLP stage")
        self.stem = ConvBN(in_channels, width, 7, 2, 3)
        self.layers = nn.ModuleList()
        cin = width
        for i, n in enumerate(layers):
            mid, cout, side = width * 2 ** i, width * 2 ** i * 4, image_size // 2 ** (i + 2)
            mlp = None
            if i in repmlp_stages:
                h, w = partitions[list(repmlp_stages).index(i)]
                mlp = dict(H=side, W=side, h=h, w=w, reparam_conv_k=reparam_conv_k,
                           fc1_fc2_reduction=fc1_fc2_reduction, fc3_groups=fc3_groups)
            blocks = [Bottleneck(cin, mid, cout, 1 if i == 0 else 2)]
            blocks += [Bottleneck(cout, mid if mlp is None else cout // mlp_reduction, cout, 1, mlp)
                       for _ in range(n - 1)]
            self.layers.append(nn.Sequential(*blocks))
            cin = cout
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------------------ formats
def _build_block(config: dict) -> nn.Module:
    return RepMLP(**config)


def _matches_block(sd: Mapping[str, Tensor]) -> bool:
    return "fc3.weight" in sd and "fc3_bn.running_var" in sd and sd["fc3_bn.running_var"].dim() == 1


def _infer_block(sd: Mapping[str, Tensor]) -> dict:
    """Square partitions and grids only: the weights store h*w and hp*wp, not the factors."""
    ks = sorted(int(k[len("repconv"):-len(".conv.weight")]) for k in sd
                if k.startswith("repconv") and k.endswith(".conv.weight"))
    if not ks or "avg.bn.weight" not in sd:
        raise CheckpointError("a RepMLP block without conv branches or global perceptron does not record "
                              "its channel counts; pass the constructor arguments with --config")
    conv = sd[f"repconv{ks[0]}.conv.weight"]
    out_c, cpg, c = conv.shape[0], conv.shape[1], sd["avg.bn.weight"].shape[0]
    h, w = split_hw(sd["fc3_bn.running_var"].shape[0] // out_c, "RepMLP block partition")
    hp, wp = split_hw(sd["fc1_fc2.fc1.weight"].shape[1] // c, "RepMLP block partition grid")
    fc1 = sd["fc1_fc2.fc1.weight"]
    return dict(in_channels=c, out_channels=out_c, H=h * hp, W=w * wp, h=h, w=w, reparam_conv_k=ks,
                fc1_fc2_reduction=fc1.shape[1] // fc1.shape[0], fc3_groups=c // cpg)


def _input_size_block(config: dict) -> tuple[int, int, int]:
    return (config["in_channels"], config["H"], config["W"])


def _matches_res50(sd: Mapping[str, Tensor]) -> bool:
    return "stem.conv.weight" in sd and any(k.endswith(".mlp.fc3.weight") for k in sd)


def _infer_res50(sd: Mapping[str, Tensor]) -> dict:
    """Constructor arguments from shapes; square partitions and maps only (the weights store h*w and hp*wp).

    A RepMLP stage i (its blocks 1.. carry ``mlp``) runs on a map of side h*hp (h alone
    without the global perceptron) = image_size / 2^(i+2), which gives image_size.
    fc1_fc2_reduction has no weight to read when no partition is smaller than its map: then
    the default 4 (unused by that network).
    """
    try:
        stem = sd["stem.conv.weight"]
        n_stages = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
        layers = [1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{i}\.(\d+)\.", k)))
                  for i in range(n_stages)]
        stages = [i for i in range(n_stages) if f"layers.{i}.1.mlp.fc3.weight" in sd]
        if not stages:
            raise CheckpointError("no RepMLP block found (layers.<i>.1.mlp.fc3.weight)")
        first = f"layers.{stages[0]}.1."
        mid = sd[first + "conv1.conv.weight"].shape[0]
        fc3 = sd[first + "mlp.fc3.weight"]
        ks = sorted(int(m.group(1)) for k in sd
                    if (m := re.fullmatch(re.escape(first) + r"mlp\.repconv(\d+)\.conv\.weight", k)))
        partitions, sizes, reduction = [], set(), 4
        for i in stages:
            prefix = f"layers.{i}.1."
            c = sd[prefix + "conv1.conv.weight"].shape[0]
            h, w = split_hw(sd[prefix + "mlp.fc3.weight"].shape[0] // c, f"RepMLP partition of stage {i}")
            partitions.append([h, w])
            side = h
            if prefix + "mlp.fc1_fc2.fc1.weight" in sd:
                fc1 = sd[prefix + "mlp.fc1_fc2.fc1.weight"]
                side = h * split_hw(fc1.shape[1] // c, f"RepMLP partition grid of stage {i}")[0]
                reduction = fc1.shape[1] // fc1.shape[0]
            sizes.add(side * 2 ** (i + 2))
        if len(sizes) != 1:
            raise CheckpointError(f"the RepMLP stages' maps imply different image sizes {sorted(sizes)}")
        return dict(layers=layers, width=stem.shape[0], num_classes=sd["head.weight"].shape[0],
                    in_channels=stem.shape[1], image_size=sizes.pop(), repmlp_stages=stages, partitions=partitions,
                    reparam_conv_k=ks, fc1_fc2_reduction=reduction,
                    fc3_groups=fc3.shape[0] // fc3.shape[1],  # fc3 maps mid*h*w -> mid*h*w in groups
                    mlp_reduction=sd[first + "conv3.conv.weight"].shape[0] // mid)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a complete RepMLP-ResNet state_dict ({e})") from None


register_format(
    "official-repmlp-block-c946c5e", family="repmlp-block", build=_build_block, matches=_matches_block,
    infer_config=_infer_block, input_size=_input_size_block,
    description="original RepMLP block, DingXiaoH/RepMLP@c946c5e repmlp.py",
)
register_format(
    "vismlp-repmlp-res50", family="repmlp-res50", build=lambda cfg: RepMLPResNet(**cfg), matches=_matches_res50,
    infer_config=_infer_res50,
    input_size=lambda cfg: (cfg.get("in_channels", 3), cfg.get("image_size", 224), cfg.get("image_size", 224)),
    description="ResNet-50 with RepMLP bottlenecks (RepMLP paper), vismlp-deploy key layout",
)

register_config("repmlp_res50_light", "vismlp-repmlp-res50",
                "RepMLP-Res50: RepMLP bottlenecks in c4 (14x14 map, 7x7 partitions), g=4, r=8",
                layers=[3, 4, 6, 3], image_size=224, repmlp_stages=[2], partitions=[[7, 7]],
                reparam_conv_k=[1, 3, 5], fc1_fc2_reduction=4, fc3_groups=4, mlp_reduction=8, num_classes=1000)
register_config("repmlp_res50_c3c4", "vismlp-repmlp-res50",
                "RepMLP-Res50 with RepMLP bottlenecks in c3 (28x28, 7x7 partitions) and c4",
                layers=[3, 4, 6, 3], image_size=224, repmlp_stages=[1, 2], partitions=[[7, 7], [7, 7]],
                reparam_conv_k=[1, 3, 5], fc1_fc2_reduction=4, fc3_groups=4, mlp_reduction=8, num_classes=1000)
