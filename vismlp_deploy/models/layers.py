"""Building blocks shared by the families, each owning its exact ``reparameterize``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..reparam import transforms as T
from ..reparam.walker import ReparamContext


def exporting() -> bool:
    """True while a graph is being captured for deployment (dynamo or TorchScript ONNX export,
    torch.export). Deploy modules use it to pick the lowering that is fastest for the target:
    eager PyTorch and an exported graph favour different (equally exact) op sequences."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def clone_conv(conv: nn.Conv2d | nn.Conv1d, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """A conv with ``conv``'s hyper-parameters holding the given tensors (not copied: pass
    fresh ones); padding='same' is made explicit."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(conv.kernel_size)
        else:  # "same" at stride 1: (d*(k-1))//2 per side, exact for odd k
            if any((d * (k - 1)) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
                raise ValueError("padding='same' with an even effective kernel is asymmetric")
            padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
    # built on the meta device: no throw-away random init, the given tensors become the parameters
    new = type(conv)(
        weight.shape[1] * conv.groups, weight.shape[0], tuple(weight.shape[2:]), conv.stride,
        padding, conv.dilation, conv.groups, bias is not None, device="meta",
    )
    return _adopt(new, weight, bias)


def _adopt(module: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    module.weight = nn.Parameter(weight.detach())
    if bias is not None:
        module.bias = nn.Parameter(bias.detach())
    return module


def clone_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A Linear holding the given tensors (they are not copied: pass fresh ones)."""
    return _adopt(nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device="meta"), weight, bias)


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(scale, shift) float64 of an eval-mode BatchNorm."""
    return T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def fuse_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Conv/Linear followed by BN over its output channels -> one conv/linear with bias."""
    w, b = T.fold_bn_after(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return clone_linear(w, b) if isinstance(conv, nn.Linear) else clone_conv(conv, w, b)


class ConvBN(nn.Sequential):
    """``conv`` then ``bn`` (keys ``conv.*``, ``bn.*``); deploys as one conv with bias."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1,
                 bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        ctx.folded("BatchNorm2d->Conv2d")
        return fuse_conv_bn(self.conv, self.bn)


class PointwiseMlp(nn.Module):
    """``fc2(act(fc1(x)))`` with 1x1 convs on (N, C, H, W) (keys ``fc1``, ``fc2``; the activation has none)."""

    def __init__(self, channels: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = act
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
