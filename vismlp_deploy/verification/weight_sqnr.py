"""Re-parameterization vs quantization: int8 weight SQNR of every GEMM weight, train form vs deploy form.

A fold changes weight ranges. Folding a per-output-channel scale (a BatchNorm after a conv)
scales whole rows, which per-channel int8 quantization does not notice; folding a
per-*input*-channel affine (a BatchNorm, LayerNorm gamma or Affine *before* a linear) scales
columns, and adding branches (RepMLPNet's locality injection writes the conv taps into fc3)
puts large and small values into one row: both can widen a row's range so that its small
entries lose their int8 resolution. This report measures it per layer: the SQNR of symmetric
per-output-channel int8 quantization (``[-127, 127]``, what :mod:`vismlp_deploy.export.quantize`
asks ONNX Runtime for) of the train weight and of the deploy weight it became.

Rule: a layer is flagged when its deploy weight quantizes :data:`DROP_DB` (6 dB, one bit of
int8 resolution) or more worse than its train weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from .stats import SQNR_CAP_DB

DROP_DB = 6.0
_MODULE_WEIGHTS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LayerSQNR:
    """One deploy GEMM weight, the train weight it came from, and their int8 SQNR (dB)."""

    deploy_name: str
    shape: tuple[int, ...]
    deploy_db: float
    train_name: str | None = None  # None: no train weight of the same size (the fold created it)
    train_db: float | None = None
    flagged: bool = False

    @property
    def drop_db(self) -> float | None:
        return None if self.train_db is None else self.train_db - self.deploy_db

    def to_dict(self) -> dict:
        return {**self.__dict__, "shape": list(self.shape), "drop_db": self.drop_db}


@dataclass
class WeightSQNRReport:
    layers: list[LayerSQNR] = field(default_factory=list)
    drop_db: float = DROP_DB

    @property
    def flagged(self) -> list[LayerSQNR]:
        return [layer for layer in self.layers if layer.flagged]

    def lines(self) -> list[str]:
        """One readable line per flagged layer (empty: no fold made a weight harder to quantize)."""
        return [f"{layer.deploy_name}: int8 weight SQNR {layer.deploy_db:.1f} dB after re-parameterization, "
                f"{layer.train_db:.1f} dB before ({layer.train_name}): the fold widened its ranges "
                f"({layer.drop_db:.1f} dB = {layer.drop_db / 6.02:.1f} bits lost)" for layer in self.flagged]

    def to_dict(self) -> dict:
        return {"rule": f"flagged when the deploy weight's int8 SQNR is >= {self.drop_db:g} dB below the train "
                        "weight's",
                "flagged": [layer.deploy_name for layer in self.flagged], "layers": [x.to_dict() for x in self.layers]}


def int8_weight_sqnr_db(rows: Tensor) -> float:
    """SQNR (dB) of symmetric per-row int8 quantization of ``rows`` (output channels, inputs).

    Scale ``max|row| / 127``, round half to even, float64. Each output channel's noise is taken
    relative to its own signal and the ratios are averaged over channels,
    ``-10 log10(mean_i noise_i / signal_i)``: every output channel counts alike, so scaling
    whole rows (a BatchNorm folded after a conv) leaves it unchanged, while anything that
    widens the range inside a row lowers it. All-zero rows are skipped.
    """
    w = rows.detach().double()
    scale = w.abs().amax(1, keepdim=True) / 127
    err = w - (w / scale.clamp_min(1e-300)).round().clamp(-127, 127) * scale
    signal, noise = w.square().sum(1), err.square().sum(1)
    ratio = (noise[signal > 0] / signal[signal > 0]).mean().item() if (signal > 0).any() else 0.0
    return SQNR_CAP_DB if ratio <= 10 ** (-SQNR_CAP_DB / 10) else -10 * math.log10(ratio)


def gemm_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every GEMM weight of ``model`` as (output channels, inputs) rows, by parameter name.

    Linear/Conv weights: (out, in * kernel). Other matrices (>= 2 dims, not a bias, not in a
    norm: token-mixing ``W @ x`` weights, RepMLPNet's (S, hw, hw) deploy fc) are applied row
    by row: (prod of leading dims, last dim).
    """
    out = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, _MODULE_WEIGHTS) and p_name == "weight":
                out[name] = p.detach().reshape(p.shape[0], -1)
            elif (not isinstance(mod, _MODULE_WEIGHTS) and p.ndim >= 2 and not p_name.endswith("bias")
                  and "norm" not in type(mod).__name__.lower()):
                out[name] = p.detach().reshape(-1, p.shape[-1])
    return out


def weight_sqnr_report(train: nn.Module, deploy: nn.Module, drop_db: float = DROP_DB) -> WeightSQNRReport:
    """Per deploy GEMM weight: its int8 SQNR and that of the train weight it came from.

    The train counterpart is the train GEMM weight with the same rows × inputs (folds keep
    the main weight's shape) whose name shares the longest dotted prefix with it, then the
    longest suffix (``blocks.0.fc1.weight`` <- ``blocks.0.mlp_channels.fc1.weight``); each
    train weight is used once.
    """
    train_w, deploy_w = gemm_weights(train), gemm_weights(deploy)
    pairs = sorted(((_affinity(d, t), d, t) for d, dw in deploy_w.items() for t, tw in train_w.items()
                    if tuple(dw.shape) == tuple(tw.shape)), reverse=True)
    match: dict[str, str] = {}
    for _, d, t in pairs:
        if d not in match and t not in match.values():
            match[d] = t
    report = WeightSQNRReport(drop_db=drop_db)
    for d, rows in deploy_w.items():
        layer = LayerSQNR(d, tuple(dict(deploy.named_parameters())[d].shape), int8_weight_sqnr_db(rows))
        if d in match:
            layer.train_name, layer.train_db = match[d], int8_weight_sqnr_db(train_w[match[d]])
            layer.flagged = layer.drop_db >= drop_db
        report.layers.append(layer)
    return report


def _affinity(a: str, b: str) -> tuple[int, int]:
    """(common leading dotted parts, common trailing dotted parts) of two parameter names."""
    pa, pb = a.split("."), b.split(".")
    lead = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
    trail = next((i for i, (x, y) in enumerate(zip(reversed(pa), reversed(pb))) if x != y), min(len(pa), len(pb)))
    return lead, trail
