"""FP16 safety audit of an ONNX graph, run before a half-precision TensorRT build.

Folding BN/affine scales into weights can push weights or biases past FP16's range
(|x| > 65504 overflows to inf) or below its smallest subnormal (|x| < 2**-24 flushes to
0). Normalizations compute a variance (squares, then a reduction): in FP16 that overflows
for activations above ~256, so norms stay in FP32 (TensorRT >= 8.6 does that itself for a
single ``LayerNormalization`` node, but not for a decomposed norm). The audit names the
nodes to keep in FP32; the engine builder applies that as layer precision constraints
(TensorRT 10) or as AutoCast exclusions (TensorRT 11).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24
# normalization ops and the statistic ops of decomposed norms (GroupNorm(1, C) is emitted as
# explicit reductions because of a TensorRT GroupNormalization import bug; see anchors)
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization")
STAT_OPS = ("ReduceMean", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Reciprocal")


@dataclass
class Finding:
    node: str  # ONNX node name
    op_type: str
    reason: str
    keep_fp32: bool

    def __str__(self) -> str:
        action = "kept in FP32" if self.keep_fp32 else "warning"
        return f"{self.op_type} {self.node}: {self.reason} ({action})"


@dataclass
class Fp16Audit:
    findings: list[Finding] = field(default_factory=list)

    @property
    def keep_fp32_nodes(self) -> list[str]:
        return sorted({f.node for f in self.findings if f.keep_fp32})

    @property
    def keep_fp32_op_types(self) -> list[str]:
        """Op types kept in FP32 wholesale (norms), for AutoCast's ``op_types_to_exclude``."""
        return sorted({f.op_type for f in self.findings if f.keep_fp32 and f.op_type in NORM_OPS})

    def summary(self) -> str:
        if not self.findings:
            return "fp16 audit: no weight outside FP16 range, no normalization"
        kept = len(self.keep_fp32_nodes)
        return f"fp16 audit: {len(self.findings)} finding(s), {kept} node(s) kept in FP32"

    def to_dict(self) -> dict:
        return {"keep_fp32_nodes": self.keep_fp32_nodes,
                "findings": [f.__dict__ for f in self.findings]}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer
           if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def audit_fp16(model: onnx.ModelProto, precision: str = "fp16", keep_norms: bool = True) -> Fp16Audit:
    """Findings for ``model`` (loaded with its weights) before a ``precision`` build.

    Weight range checks apply to fp16 only (bf16 has FP32's exponent range). ``keep_norms``:
    keep every normalization and statistic op in FP32 (off only for an all-low-precision build).
    """
    g = model.graph
    consts = _constants(g)
    users = defaultdict(list)
    for n in g.node:
        for i in n.input:
            users[i].append(n)
    audit = Fp16Audit()
    for name, value in consts.items() if precision == "fp16" else ():
        a = np.abs(value.astype(np.float64))
        if a.size == 0:
            continue
        peak = float(a.max())
        tiny = int(((a > 0) & (a < FP16_MIN_SUBNORMAL)).sum())
        for node in users[name]:
            if node.op_type == "Constant":
                continue
            label = node.name or node.output[0]
            if peak > FP16_MAX:
                audit.findings.append(Finding(label, node.op_type, f"{name} reaches {peak:.3g} > FP16 max {FP16_MAX:g}", True))
            if tiny:
                audit.findings.append(Finding(label, node.op_type, f"{tiny} value(s) of {name} flush to zero in FP16", False))
    if keep_norms:
        for node in g.node:
            if node.op_type in NORM_OPS or node.op_type in STAT_OPS:
                kind = "normalization" if node.op_type in NORM_OPS else "statistic of a normalization or pooling"
                audit.findings.append(Finding(node.name or node.output[0], node.op_type,
                                              f"{kind}: variance/accumulation overflows in FP16", True))
    return audit
