"""Random initialisation that does not hide bugs (the distributions of the conformance goldens).

Default init (BN γ=1, β=0, μ=0, σ²=1; Affine α=1, β=0) makes many folds trivially
"exact"; every test and ``zoo --init`` uses this instead.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Randomize every weight, bias, norm statistic and affine of ``model`` in place.

    conv/linear weight N(0, 1/fan_in); bias N(0, 0.1); BN γ U(0.5,1.5), β N(0,0.2),
    μ N(0,0.2), σ² U(0.5,2); LN/GN γ U(0.5,1.5), β N(0,0.2); Affine α U(0.5,1.5),
    β N(0,0.2); layer-scales (1-D params named gamma*/ls*) U(0.2,1).
    """
    g = torch.Generator().manual_seed(seed)

    def uni(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * std)

    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if mod.affine:
                uni(mod.weight, 0.5, 1.5)
                normal(mod.bias, 0.2)
            if mod.track_running_stats:
                normal(mod.running_mean, 0.2)
                uni(mod.running_var, 0.5, 2.0)
        elif isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            if getattr(mod, "weight", None) is not None:
                uni(mod.weight, 0.5, 1.5)
            if getattr(mod, "bias", None) is not None:
                normal(mod.bias, 0.2)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            fan_in = mod.weight[0].numel()
            normal(mod.weight, 1 / math.sqrt(fan_in))
            if mod.bias is not None:
                normal(mod.bias, 0.1)
        for name, p in mod.named_parameters(recurse=False):
            if name == "alpha":
                uni(p, 0.5, 1.5)
            elif name == "beta" and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                normal(p, 0.2)
            elif name.startswith(("gamma", "ls")):
                uni(p, 0.2, 1.0)
    return model
