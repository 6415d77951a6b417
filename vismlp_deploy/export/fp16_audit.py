"""FP16 safety audit of an ONNX graph, run before a half-precision TensorRT build.

Folding BN/affine scales into weights can push weights or biases past FP16's range
(|x| > 65504 overflows to inf) or below its smallest subnormal (|x| < 2**-24 flushes to
0). Normalizations compute a variance (squares, then a reduction): in FP16 that overflows
for activations above ~256, so norms stay in FP32 (TensorRT >= 8.6 does that itself for a
single ``LayerNormalization`` node, but not for a decomposed norm). A decomposed norm (the
GroupNorm(1, C) of AS-MLP: ``ReduceMean -> Sub -> Mul(x, x) -> ReduceMean -> Add(eps) ->
Sqrt``) keeps its whole variance chain in FP32: the square and the ``+ eps`` too, since an
FP32 reduction cast back to FP16 before its Sqrt would overflow just the same.

The audit names the nodes to keep in FP32 by the name TensorRT's ONNX parser gives them
(:func:`onnx_node_name`); the engine builder applies that as AutoCast exclusions (strongly
typed builds) or as layer precision constraints (weakly typed TensorRT 10).
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
# a square reduced by one of these is a variance; these ops between it and its Sqrt (+ eps, / N) stay FP32 with it
VARIANCE_REDUCTIONS = ("ReduceMean", "ReduceSum")
VARIANCE_TAIL_OPS = ("Add", "Div", "Mul")


def onnx_node_name(node: onnx.NodeProto) -> str:
    """The name TensorRT's ONNX parser gives ``node``: its own, or ``node_of_<first output>``
    when it has none (onnx-tensorrt ``getNodeName``); its layers' metadata carry this name."""
    return node.name or f"node_of_{node.output[0]}"


@dataclass
class Finding:
    node: str  # parser name of the ONNX node (onnx_node_name)
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


def _tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values by tensor name (not yet converted to arrays)."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            out.update((n.output[0], a.t) for a in n.attribute if a.name == "value")
    return out


def _float_constants(tensors: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    return {name: numpy_helper.to_array(t) for name, t in tensors.items()
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}


def _is_square(node: onnx.NodeProto, tensors: dict[str, onnx.TensorProto]) -> bool:
    """``Mul(x, x)`` or ``Pow(x, 2)`` (exponent of any numeric type)."""
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    exponent = tensors.get(node.input[1]) if node.op_type == "Pow" else None
    return exponent is not None and bool(np.all(numpy_helper.to_array(exponent) == 2))


def variance_chains(graph: onnx.GraphProto, users: dict[str, list[onnx.NodeProto]],
                    tensors: dict[str, onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The nodes computing a decomposed norm's variance: each square feeding a mean/sum
    reduction, that reduction, and the single-consumer ``Add``/``Div``/``Mul`` after it
    (``+ eps``, ``/ N``) up to its ``Sqrt``."""
    chain: list[onnx.NodeProto] = []
    for node in graph.node:
        reductions = [u for u in users[node.output[0]] if u.op_type in VARIANCE_REDUCTIONS]
        if not reductions or not _is_square(node, tensors):
            continue
        chain.append(node)
        for r in reductions:
            chain.append(r)
            tail = users[r.output[0]]
            while len(tail) == 1 and tail[0].op_type in VARIANCE_TAIL_OPS:
                chain.append(tail[0])
                tail = users[tail[0].output[0]]
    return chain


def audit_fp16(model: onnx.ModelProto, precision: str = "fp16", keep_norms: bool = True) -> Fp16Audit:
    """Findings for ``model`` (loaded with its weights) before a ``precision`` build.

    Weight range checks apply to fp16 only (bf16 has FP32's exponent range). ``keep_norms``:
    keep every normalization, statistic op and variance chain in FP32 (off only for an
    all-low-precision build).
    """
    g = model.graph
    tensors = _tensors(g)
    consts = _float_constants(tensors)
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
            label = onnx_node_name(node)
            if peak > FP16_MAX:
                reason = f"{name} reaches {peak:.3g} > FP16 max {FP16_MAX:g}"
                audit.findings.append(Finding(label, node.op_type, reason, True))
            if tiny:
                reason = f"{tiny} value(s) of {name} flush to zero in FP16"
                audit.findings.append(Finding(label, node.op_type, reason, False))
    if keep_norms:
        variance = {onnx_node_name(n) for n in variance_chains(g, users, tensors)}
        for node in g.node:
            if node.op_type in NORM_OPS:
                reason = "normalization: variance/accumulation overflows in FP16"
            elif onnx_node_name(node) in variance:
                reason = "variance of a decomposed norm: the square overflows FP16 once |x - mean| > 256"
            elif node.op_type in STAT_OPS:
                reason = "statistic of a normalization or pooling: accumulation overflows in FP16"
            else:
                continue
            audit.findings.append(Finding(onnx_node_name(node), node.op_type, reason, True))
    return audit
