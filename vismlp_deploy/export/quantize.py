"""INT8 Q/DQ ONNX of a deploy graph with ONNX Runtime's static quantizer, and the accuracy guard.

The quantization itself is ``onnxruntime.quantization.quantize_static`` after
``quant_pre_process``: QDQ format, signed int8, symmetric activations (per tensor) and
weights (per output channel): every zero point is 0, as TensorRT's explicit quantization
requires, and ONNX Runtime's CPU provider runs the same file. Where int8 pays and how the
Q/DQ pairs are placed follows what the int8 kernels of ONNX Runtime's CPU provider take
(measured, see ``docs/precision.md``):

- Only GEMM-like ops are quantized (:data:`INT8_OP_TYPES`); everything else runs in float
  on float inputs. A Q/DQ pair that feeds a quantized op also feeding a float op (a residual
  add reading the same tensor) is bypassed for the float op (:func:`route_float`):
  the residual stream keeps its float values and runs no dequantization.
- Gemm / MatMul outputs stay float (``QGemm`` / ``MatMulIntegerToFloat`` return float);
  Conv outputs are quantized, since ``QLinearConv`` (the only int8 conv) returns int8.
- A MatMul whose constant weight is the *left* operand (token mixing, ``W @ x``) has no int8
  kernel in the CPU provider (int8 weights go on the right; s8 x u8 does not exist), so it is
  rewritten exactly as ``(x^T @ W^T)^T`` first (:func:`_left_weights_to_right`); ONNX Runtime
  cancels the transposes that meet between consecutive ones (Mixer's token MLP keeps two).
  One whose input rank is unknown stays float.
- A batched weight (S, K, N) cannot carry per-(set, column) scales in one standard
  DequantizeLinear, and ``MatMulIntegerToFloat`` rejects per-axis scales on it. So each
  column's range is factored out exactly first (:func:`_factor_batched_weight_scales`:
  ``x @ B[s] = (x @ (B[s] / r[s])) * r[s]``) and the rescaled weight, whose every column
  spans [-1, 1], is quantized per tensor: per-(set, column) resolution, one float multiply.

The accuracy guard (:func:`quantize_onnx`) measures top-1 agreement, cosine and SQNR of the
quantized graph against the fp32 graph on held-out inputs. It passes when the agreement is
``min_agreement`` or more *with 95 % confidence* (:func:`agreement_lower_bound`: a 500-sample
estimate of 99.0 % is as likely to be below 99 % as above). Short of that it ranks the
quantized nodes by the damage each does alone (the graph's output SQNR against fp32 with
only that node in int8, every other one routed back to float) and keeps the most damaging
ones in float, doubling their number until the target is met, then bisecting back to the
fewest that meet it; each candidate is re-quantized by ``quantize_static`` with
``nodes_to_exclude`` and measured. Every pass it reports was measured.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static

from ..errors import UserError
from ..verification.stats import Stats, compare
from .onnx import QDQ_OPS, read_metadata, set_metadata

INT8_OP_TYPES = ("Conv", "Gemm", "MatMul")
FLOAT_OUTPUT_OP_TYPES = ("Gemm", "MatMul")  # their int8 kernels return float: no Q/DQ after them
METHODS = ("percentile", "minmax", "entropy")
DEFAULT_MIN_AGREEMENT = 0.99
CONFIDENCE_Z = 1.645  # one-sided 95 % normal quantile
_HAS_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


@dataclass
class FloatNode:
    """A GEMM-like node left in float, and why."""

    name: str
    op_type: str
    reason: str
    input_sqnr_db: float | None = None  # local int8 noise at its inputs (guard fallback only)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GuardRound:
    """One quantization the guard measured: how many nodes it kept in float, and the result."""

    float_nodes: int
    stats: Stats

    def to_dict(self) -> dict:
        return {"float_nodes": self.float_nodes, "top1": self.stats.top1,
                "top1_lower_bound": agreement_lower_bound(self.stats), "cosine": self.stats.cosine,
                "sqnr_db": self.stats.sqnr_db}


@dataclass
class QuantizeResult:
    """What :func:`quantize_onnx` wrote and measured.

    ``passed`` is None when nothing was measured (no held-out inputs, ``min_agreement`` 0);
    otherwise whether the written graph's agreement with fp32 reached ``min_agreement`` with
    95 % confidence (its lower bound did; ``min_agreement`` 0 always passes).
    """

    path: Path
    min_agreement: float
    method: str
    calibration: int  # calibration samples
    holdout: int  # held-out samples measured on
    quantized_nodes: list[str]
    float_nodes: list[FloatNode]
    stats: Stats | None  # the written graph vs fp32 on the held-out inputs
    rounds: list[GuardRound] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.stats is not None

    @property
    def passed(self) -> bool | None:
        return None if self.stats is None else _meets(self.stats, self.min_agreement)

    @property
    def agreement_lower_bound(self) -> float | None:
        return None if self.stats is None else agreement_lower_bound(self.stats)

    @property
    def fallback_nodes(self) -> list[FloatNode]:
        """The nodes the guard kept in float (beyond the ones int8 cannot run)."""
        return [n for n in self.float_nodes if n.input_sqnr_db is not None]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "min_agreement": self.min_agreement, "method": self.method,
                "calibration": self.calibration, "holdout": self.holdout, "measured": self.measured,
                "passed": self.passed, "agreement_lower_bound": self.agreement_lower_bound,
                "quantized_nodes": len(self.quantized_nodes),
                "float_nodes": [n.to_dict() for n in self.float_nodes],
                "stats": None if self.stats is None else self.stats.to_dict(),
                "rounds": [r.to_dict() for r in self.rounds]}


def quantize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray,
                  holdout: np.ndarray | None = None, *, min_agreement: float = DEFAULT_MIN_AGREEMENT,
                  method: str = "percentile", exclude: tuple[str, ...] = (), max_rounds: int = 8, batch: int = 8,
                  threads: int | None = None) -> QuantizeResult:
    """Write an INT8 Q/DQ version of the fp32 ONNX ``onnx_path`` to ``out_path`` (atomically).

    calibration: float32 (N, C, H, W) inputs the activation ranges are calibrated on.
    holdout: float32 (M, C, H, W) other inputs the guard measures on (None/empty: not measured,
    allowed only with ``min_agreement`` 0). min_agreement: required top-1 agreement with fp32
    in [0, 1]; 0 turns the fallback off (the result is still measured where inputs allow).
    method: calibration ``percentile`` (ONNX Runtime's 99.999th percentile of |x|: on the trained
    fixtures it agreed with fp32 as well as or better than ``minmax``, and did not degrade with
    more calibration samples, as the max does), ``minmax`` or ``entropy``. exclude: node names to keep
    in float from the start. max_rounds: quantize-and-measure rounds the fallback may spend.
    batch: samples per ONNX Runtime call (calibration, measurement). threads: intra-op
    threads of the measuring sessions.

    The output keeps fp32 inputs/outputs and the metadata of ``onnx_path``, plus
    ``precision: int8`` and a ``quantization`` entry (method, counts, float nodes, result).
    """
    if method not in METHODS:
        raise UserError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if not 0.0 <= min_agreement <= 1.0:
        raise UserError(f"min_agreement must be in [0, 1] (got {min_agreement})")
    holdout = holdout if holdout is not None and len(holdout) else None
    if holdout is None and min_agreement > 0:
        raise UserError("the accuracy guard needs held-out inputs to measure agreement with fp32 "
                        "(or min_agreement 0 to skip the guard)")
    if not len(calibration):
        raise UserError("no calibration inputs")
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: no such ONNX file")
    if not out_path.parent.is_dir():
        raise UserError(f"{out_path.parent}: output directory does not exist")
    _check_embedded(onnx_path)
    _check_inputs(onnx_path, calibration, holdout)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmp:
        work = _Workdir(Path(tmp), onnx_path, calibration, method, batch)
        excluded = work.unquantizable() + [FloatNode(n, work.op_type(n), "excluded by the caller") for n in exclude]
        guard = _Guard(onnx_path, holdout, batch, threads) if holdout is not None else None
        path = work.quantize([n.name for n in excluded])
        result = QuantizeResult(out_path, min_agreement, method, len(calibration),
                                0 if holdout is None else len(holdout), work.quantized(path), excluded, None)
        if guard is not None:
            result.stats = guard.measure(path)
            result.rounds.append(GuardRound(len(excluded), result.stats))
            if not _meets(result.stats, min_agreement):
                path = _fall_back(work, guard, result, path, max_rounds)
        _finish(path, onnx_path, result)
        os.replace(path, out_path)
    return result


def _fall_back(work: _Workdir, guard: _Guard, result: QuantizeResult, path: Path, max_rounds: int) -> Path:
    """Keep the most damaging nodes in float: 1, 2, 4 ... of them until the target is met, then bisect
    between the last miss and the first hit for the fewest that meet it. Updates ``result``."""
    base = list(result.float_nodes)
    ranking = work.sensitivity(path, [n.name for n in base])
    tried: dict[int, tuple[Path, Stats]] = {0: (path, result.stats)}

    def attempt(k: int) -> Stats:
        candidate = work.quantize([n.name for n in base] + [n.name for n in ranking[:k]], tag=f"k{k}")
        stats = guard.measure(candidate)
        tried[k] = (candidate, stats)
        result.rounds.append(GuardRound(len(base) + k, stats))
        return stats

    lo, hi, k = 0, None, 1  # lo: most nodes known to miss; hi: fewest known to meet
    while len(result.rounds) < max_rounds and hi is None and lo < len(ranking):
        k = min(k, len(ranking))
        if _meets(attempt(k), result.min_agreement):
            hi = k
        else:
            lo, k = k, 2 * k
    while hi is not None and hi - lo > 1 and len(result.rounds) < max_rounds:
        mid = (lo + hi) // 2
        if _meets(attempt(mid), result.min_agreement):
            hi = mid
        else:
            lo = mid
    # the fewest float nodes that met the target; if none did, the best agreement measured
    best = hi if hi is not None else max(tried, key=lambda j: (tried[j][1].top1, -j))
    result.float_nodes = base + ranking[:best]
    result.stats = tried[best][1]
    result.quantized_nodes = work.quantized(tried[best][0])
    return tried[best][0]


def agreement_lower_bound(stats: Stats, z: float = CONFIDENCE_Z) -> float:
    """One-sided lower confidence bound (Wilson score, 95 % by default) of the top-1 agreement
    that ``stats`` estimated from ``stats.n`` samples: the agreement a model has on inputs like
    these, short of bad luck. 0 samples: 0."""
    n, p = stats.n, stats.top1
    if n == 0:
        return 0.0
    centre, spread = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


def _meets(stats: Stats, min_agreement: float) -> bool:
    return min_agreement == 0 or agreement_lower_bound(stats) >= min_agreement


def _finish(path: Path, onnx_path: Path, result: QuantizeResult) -> None:
    """fp32 metadata + what was quantized, into the file at ``path``."""
    import onnxruntime

    proto = onnx.load(str(path))
    meta = {**read_metadata(onnx_path), "precision": "int8", "quantization": {
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_static", "format": "QDQ",
        "activations": "int8 symmetric per tensor", "weights": "int8 symmetric per output channel",
        "method": result.method, "calibration_samples": result.calibration, "holdout_samples": result.holdout,
        "min_agreement": result.min_agreement, "measured": result.measured, "passed": result.passed,
        "top1_agreement": None if result.stats is None else result.stats.top1,
        "agreement_lower_bound": result.agreement_lower_bound,
        "cosine": None if result.stats is None else result.stats.cosine,
        "sqnr_db": None if result.stats is None else result.stats.sqnr_db,
        "quantized_nodes": len(result.quantized_nodes), "float_nodes": [n.name for n in result.float_nodes]}}
    set_metadata(proto, meta)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


# ------------------------------------------------------------------------------ the graph work
class _Workdir:
    """The pre-processed float graph, the calibration ranges, and each quantized candidate."""

    def __init__(self, tmp: Path, onnx_path: Path, calibration: np.ndarray, method: str, batch: int):
        self.tmp, self.calibration, self.method, self.batch = tmp, calibration, method, batch
        self.float_path = tmp / "float.onnx"
        _pre_process(onnx_path, self.float_path)
        proto = onnx.load(str(self.float_path))
        _left_weights_to_right(proto)
        self.overrides = _factor_batched_weight_scales(proto)
        onnx.save(proto, str(self.float_path))
        self.graph = proto.graph
        self.input_name = proto.graph.input[0].name
        self.static_batch = _static_batch(proto)
        self.cache = tmp / "calibration.json"

    def op_type(self, name: str) -> str:
        for n in self.graph.node:
            if n.name == name:
                return n.op_type
        raise UserError(f"no node named {name!r} in the graph")

    def unquantizable(self) -> list[FloatNode]:
        """GEMM-like nodes no int8 kernel of ONNX Runtime's CPU provider runs: a constant left operand
        that :func:`_left_weights_to_right` could not move (input rank unknown)."""
        consts = {t.name for t in self.graph.initializer}
        return [FloatNode(n.name, n.op_type, "constant left operand (W @ x) of unknown input rank: ONNX Runtime's "
                          "CPU provider has no int8 kernel for it (int8 weights go on the right)")
                for n in self.graph.node if n.op_type == "MatMul" and n.input[0] in consts and n.input[1] not in consts]

    def quantized(self, path: Path) -> list[str]:
        """Names of the nodes whose inputs are quantized in ``path``."""
        proto = onnx.load(str(path), load_external_data=False)
        producer = {o: n.op_type for n in proto.graph.node for o in n.output}
        return [n.name for n in proto.graph.node
                if n.op_type in INT8_OP_TYPES and any(producer.get(i) == "DequantizeLinear" for i in n.input[:2])]

    def quantize(self, exclude: list[str], tag: str = "k0") -> Path:
        """``quantize_static`` of the float graph keeping ``exclude`` in float; ranges calibrated once."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        out = self.tmp / f"int8.{tag}.onnx"
        # where the quantizer can keep its calibrated ranges (newer onnxruntime), the guard's
        # re-quantizations reuse them; elsewhere each one calibrates again (same data, same ranges)
        cache = {"calibration_cache_path": self.cache} if _HAS_CACHE else {}
        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        with _quiet_ort():
            quantize_static(
                str(self.float_path), str(out),
                _Reader(self.calibration, self.input_name, self.batch, self.static_batch),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=True, op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=list(exclude),
                calibrate_method=methods[self.method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": list(FLOAT_OUTPUT_OP_TYPES),
                               "TensorQuantOverrides": self.overrides,
                               # ranges batch by batch, merged: memory of one batch's activations
                               "CalibStridedMinMax": 1},
                **cache)
        proto = onnx.load(str(out))
        route_float(proto)
        onnx.save(proto, str(out))
        return out

    def sensitivity(self, qdq_path: Path, skip: list[str]) -> list[FloatNode]:
        """Quantized nodes, most damaging first: each one quantized *alone* (every other node
        routed back to float in a copy of ``qdq_path``), the SQNR of the graph's output against
        fp32 on calibration inputs. The lower, the more this node's int8 costs the output."""
        from ..runtime.ort_runner import OrtRunner

        proto = onnx.load(str(qdq_path))
        float_inits = {t.name: t for t in self.graph.initializer}
        nodes = [n for n in self.quantized(qdq_path) if n not in set(skip)]
        x = torch.from_numpy(self.calibration[:4 * self.batch])
        reference = OrtRunner(self.float_path).run(x)
        ranked = []
        variant_path = self.tmp / "alone.onnx"
        for name in nodes:
            variant = copy.deepcopy(proto)
            route_float(variant, active={name}, float_initializers=float_inits)
            onnx.save(variant, str(variant_path))
            stats = compare(OrtRunner(variant_path).run(x), reference)
            ranked.append(FloatNode(name, self.op_type(name), f"{stats.sqnr_db:.1f} dB output SQNR", stats.sqnr_db))
        ranked.sort(key=lambda f: f.input_sqnr_db)
        for i, f in enumerate(ranked):
            f.reason = (f"kept float by the accuracy guard: #{i + 1} of {len(ranked)} quantized nodes by damage "
                        f"(quantized alone: {f.reason} against fp32)")
        return ranked


class _Guard:
    """The fp32 graph's outputs on the held-out inputs (computed once) and the comparison with a candidate."""

    def __init__(self, fp32_path: Path, holdout: np.ndarray, batch: int, threads: int | None):
        self.holdout, self.batch, self.threads = holdout, batch, threads
        self.reference = self._run(fp32_path)

    def _run(self, path: Path) -> torch.Tensor:
        from ..runtime.ort_runner import OrtRunner

        runner = OrtRunner(path, threads=self.threads)
        x = torch.from_numpy(self.holdout)
        return torch.cat([runner.run(x[i:i + self.batch]) for i in range(0, len(x), self.batch)])

    def measure(self, path: Path) -> Stats:
        return compare(self._run(path), self.reference)


class _Reader(CalibrationDataReader):
    """Calibration inputs: an (N, C, H, W) array in batches (a static batch is filled by wrapping)."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int, static_batch: int | None):
        step = static_batch or batch
        self.batches = [np.resize(x[i:i + step], (step, *x.shape[1:])) if static_batch else x[i:i + step]
                        for i in range(0, len(x), step)]
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict | None:
        b = next(self._it, None)
        return None if b is None else {self.input_name: np.ascontiguousarray(b, dtype=np.float32)}

    def __iter__(self):
        self._it = iter(self.batches)
        return self

    def __next__(self) -> dict:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Batches ``start_index:end_index`` next (the quantizer's strided calibration)."""
        self._it = iter(self.batches[start_index:end_index])


def _pre_process(src: Path, dst: Path) -> None:
    """ONNX Runtime's ``quant_pre_process`` (shape inference, constant folding, node fusions);
    without symbolic shape inference where that fails on a graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _quiet_ort():
        try:
            quant_pre_process(str(src), str(dst))
        except Exception:  # symbolic shape inference raises many types on graphs it does not know
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def _left_weights_to_right(proto: onnx.ModelProto) -> None:
    """``W @ x`` (constant W (M, K), x (..., K, N)) as ``(x^T @ W^T)^T``: the weight on the right, where
    ONNX Runtime's int8 MatMul takes it. Exact (the same products and sums). Where x is itself a
    Transpose of the last two axes, the MatMul reads that Transpose's input (the two cancel; the
    Transpose goes if nothing else reads it); the transposes of consecutive rewritten MatMuls meet
    across elementwise ops, where ONNX Runtime cancels them."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        w = inits.get(n.input[0]) if n.op_type == "MatMul" else None
        rank = _rank(g, n.input[1]) if w is not None else None
        if w is None or len(w.dims) != 2 or n.input[1] in inits or rank is None or rank < 2:
            nodes.append(n)
            continue
        perm = [*range(rank - 2), rank - 1, rank - 2]
        wt = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), f"{w.name}_transposed")
        g.initializer.append(wt)
        x, y = n.input[1], n.output[0]
        before = producer.get(x)
        if before is not None and before.op_type == "Transpose" and list(before.attribute[0].ints) == perm:
            x_t = before.input[0]  # x is itself a swap of the last two axes: read what it swapped
        else:
            x_t = f"{y}_input_t"
            nodes.append(helper.make_node("Transpose", [x], [x_t], perm=perm, name=f"{n.name}_input_t"))
        nodes += [helper.make_node("MatMul", [x_t, wt.name], [f"{y}_t"], name=n.name),
                  helper.make_node("Transpose", [f"{y}_t"], [y], perm=perm, name=f"{n.name}_output_t")]
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead_nodes(g)


def _rank(g: onnx.GraphProto, name: str) -> int | None:
    for v in (*g.value_info, *g.input):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def _factor_batched_weight_scales(proto: onnx.ModelProto) -> dict:
    """Per-(set, column) int8 resolution for MatMuls with a constant batched weight B (S, K, N).

    ``x @ B[s] == (x @ (B[s] / r[s])) * r[s]`` with ``r[s, n] = max_k |B[s, k, n]|`` (1 for an
    all-zero column): exact in real arithmetic, one fp32 rounding of B apart. Every column of
    the rescaled weight spans at most [-1, 1], so its per-tensor int8 scale is each column's own
    scale of B. Rewrites ``proto`` in place; returns per-tensor quantization overrides for the
    rescaled weights (``TensorQuantOverrides``: no axis = per tensor).
    """
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    overrides, nodes = {}, []
    for n in g.node:
        nodes.append(n)
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is None or len(w.dims) < 3 or n.input[0] in inits:
            continue
        b = numpy_helper.to_array(w).astype(np.float64)
        r = np.abs(b).max(axis=-2, keepdims=True)
        r[r == 0] = 1.0
        w.CopyFrom(numpy_helper.from_array((b / r).astype(np.float32), w.name))
        scale = numpy_helper.from_array(r.astype(np.float32), f"{w.name}_column_scale")
        g.initializer.append(scale)
        out = n.output[0]
        n.output[0] = f"{out}_unscaled"
        nodes.append(helper.make_node("Mul", [n.output[0], scale.name], [out], name=f"{n.name}_column_scale"))
        overrides[w.name] = [{"symmetric": True}]
    del g.node[:]
    g.node.extend(nodes)
    return overrides


def route_float(proto: onnx.ModelProto, active: set[str] | None = None,
                float_initializers: dict[str, onnx.TensorProto] | None = None) -> None:
    """Send float tensors to every node not in ``active`` (in place); ``active`` None: every
    node with quantized inputs stays int8 and only the float ops are rerouted.

    Float ops read the float tensor, not the Q/DQ copy made for a quantized consumer:
    ``quantize_static`` replaces a quantized activation in *all* its consumers by the
    DequantizeLinear output, so a residual add next to a quantized conv would add the int8
    rounding to the residual stream and run a DequantizeLinear of its own. The Q/DQ pair on
    the *output* of an active Conv stays for everyone: ``QLinearConv`` returns int8, so its
    consumers read the dequantized value in any case. A GEMM-like node routed to float (not
    in ``active``) also gets its float weights back from ``float_initializers`` (by name:
    the quantizer names a quantized weight ``<float name>_quantized``).
    """
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    consts = {t.name for t in g.initializer}
    if active is None:
        active = {n.name for n in g.node if n.op_type in INT8_OP_TYPES
                  and any(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in n.input)}
    reroute = {}  # DequantizeLinear output -> float tensor
    restored = {}  # float weights brought back, under a name of their own
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        src = producer.get(dq.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            before = producer.get(src.input[0])
            if before is None or before.name not in active or before.op_type not in INT8_OP_TYPES:
                reroute[dq.output[0]] = src.input[0]
        elif dq.input[0] in consts and float_initializers and _float_name(dq.input[0]) in float_initializers:
            weight = copy.copy(float_initializers[_float_name(dq.input[0])])
            weight.name = f"{_float_name(dq.input[0])}_float"
            restored[weight.name] = weight
            reroute[dq.output[0]] = weight.name
    for n in g.node:
        if n.name not in active and n.op_type not in QDQ_OPS:
            n.input[:] = [reroute.get(i, i) for i in n.input]
    used = {i for n in g.node for i in n.input}
    g.initializer.extend(t for name, t in restored.items() if name in used)
    _drop_dead_nodes(g)


def _float_name(quantized: str) -> str:
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    return quantized.removesuffix(TENSOR_NAME_QUANT_SUFFIX)


def _drop_dead_nodes(g: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads (Q/DQ pairs left without consumers), then the
    initializers nobody reads."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _static_batch(proto: onnx.ModelProto) -> int | None:
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def _check_inputs(path: Path, *arrays: np.ndarray | None) -> None:
    """Calibration / held-out arrays are float (N, C, H, W) matching the graph input's fixed dims."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    want = [d.dim_value if d.HasField("dim_value") else None for d in dims][1:]
    for x in (a for a in arrays if a is not None):
        if x.ndim != len(want) + 1 or any(w is not None and w != s for w, s in zip(want, x.shape[1:])):
            raise UserError(f"inputs of shape {tuple(x.shape)} do not fit the model input (N, "
                            f"{', '.join('?' if w is None else str(w) for w in want)})")


def _check_embedded(path: Path) -> None:
    """This path keeps the whole model in one protobuf (< 2 GB), as onnxsim and the quantizer need."""
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise UserError(f"{path}: weights in an external data file (a model over 2 GB); int8 conversion "
                        "supports models that fit one ONNX protobuf")


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """The quantizer logs progress and advice through the root logger and its histogram
    calibrators print to stdout (which must stay clean for ``--json``): keep only errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)

