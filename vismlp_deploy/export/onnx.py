"""ONNX export of a (deploy) model: export -> onnxsim with its output check -> checker -> audit.

Exporter choice (measured on torch 2.13 CPU with Conv/BN/LayerNorm/GELU/token-mixing
models): the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, torch 2.13's
default) gives the cleanest graph: a symbolic batch dimension without Shape/Slice/Concat
chains around every flatten, one ``LayerNormalization`` node per LayerNorm and, at opset
20, one ``Gelu`` node per exact GELU (the TorchScript exporter emits the same ops but 30-40 %
more nodes before simplification, and it is deprecated). So:

- opset 18-20 -> dynamo exporter (its minimum is 18); opset 20 is the default because it is
  the first with a single ``Gelu`` node, and TensorRT maps single ``LayerNormalization`` /
  ``Gelu`` nodes onto fused kernels (LayerNorm kept in FP32, avoiding FP16 overflow).
- opset 17 -> TorchScript exporter (``dynamo=False``; the only one that still emits 17),
  and also the fallback, with a warning, if the dynamo exporter fails on a model.
- Weights are embedded (``external_data=False``; torch 2.13 would otherwise write a side
  ``.onnx.data`` file) unless the model exceeds protobuf's 2 GB limit; then they go to
  ``<name>.onnx.data`` beside the model and onnxsim (which needs one protobuf) is skipped.

The batch dimension is exported symbolic (``batch``) unless ``dynamic_batch=False``.
Simplification runs onnxsim, then compares the simplified and the exported graph in ONNX
Runtime (``max|Δ| / max|ref|`` <= 1e-5 on a random input); any failure keeps the
unsimplified graph with a warning. ``onnx.checker`` always runs. The
final graph is audited: no training-only nodes, and for deploy forms no BatchNormalization
that an exact fold could have removed (one directly after a Conv/Gemm, or directly before a
padding-free Conv). Metadata (family, config, input size, re-parameterization summary,
package version, exporter, opset) goes into the model's ``metadata_props``.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from .. import __version__
from ..errors import UserError, VerificationError, VisMLPWarning, first_line
from ..precision import get_precision
from ..verification.stats import rel_err

DEFAULT_OPSET = 20
OPSETS = (17, 18, 19, 20)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
META_PREFIX = "vismlp_deploy."
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # 2 GB minus room for the graph itself


@dataclass
class OnnxExport:
    """What :func:`export_onnx_info` produced."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    simplified: bool
    external_data: bool
    nodes: int
    op_counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def export_onnx(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                batch: int = 1, simplify: bool = True, metadata: dict | None = None) -> Path:
    """Export ``model`` (input (N, C, H, W) float32 -> logits (N, classes)) to ``path``.

    ``dynamic_batch``: symbolic batch dimension; otherwise the batch is fixed to ``batch``.
    ``metadata``: extra string-able entries for ``metadata_props`` (merged over the ones
    derived from the model: family, arch, config, input size, reparam summary, version).
    The file appears atomically (with its ``.data`` file when the model is > 2 GB).
    """
    return export_onnx_info(model, path, opset=opset, dynamic_batch=dynamic_batch, batch=batch,
                            simplify=simplify, metadata=metadata).path


def export_onnx_info(model: nn.Module, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                     dynamic_batch: bool = True, batch: int = 1, simplify: bool = True,
                     metadata: dict | None = None) -> OnnxExport:
    """:func:`export_onnx`, returning what happened (exporter, simplification, node counts)."""
    path = Path(path)
    if opset not in OPSETS:
        raise UserError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")
    if model.training:
        raise UserError("model is in training mode; call model.eval() before exporting")
    if batch < 1:
        raise UserError(f"batch must be >= 1 (got {batch})")
    input_size = tuple(getattr(model, "input_size", ()) or ())
    if len(input_size) != 3:
        raise UserError("the model needs an input_size attribute (C, H, W) to be exported")
    external = _model_bytes(model) > PROTOBUF_LIMIT
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".vismlp-", dir=path.parent) as tmpdir:
        tmp = Path(tmpdir) / path.name
        # tracing with batch 2: torch.export specializes sizes 0 and 1
        example = torch.randn(2 if dynamic_batch else batch, *input_size)
        exporter = _export(model, example, tmp, opset, dynamic_batch, external, notes)
        proto = onnx.load(str(tmp), load_external_data=False)
        simplified = False
        if simplify and external:
            notes.append("simplification skipped: onnxsim needs the model in one protobuf (< 2 GB)")
        elif simplify:
            proto, simplified = _simplify(proto, (2 if dynamic_batch else batch, *input_size), notes)
        meta = {**_model_metadata(model), "exporter": exporter, "opset": opset, "simplified": simplified,
                "dynamic_batch": dynamic_batch, **(metadata or {})}
        set_metadata(proto, meta)
        _save(proto, tmp, external)
        onnx.checker.check_model(str(tmp), full_check=True)
        issues = audit_graph(onnx.load(str(tmp), load_external_data=False), deploy=hasattr(model, "reparam_report"))
        if issues:
            raise VerificationError("the exported graph is not a clean deploy graph: " + "; ".join(issues))
        move_into_place(Path(tmpdir), path)
    for note in notes:
        warnings.warn(note, VisMLPWarning, stacklevel=2)
    counts = op_counts(proto)
    return OnnxExport(path, exporter, opset, dynamic_batch, simplified, external, sum(counts.values()), counts, notes)


def _model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress to stdout (which must stay clean for ``--json``) and
    log/warn about torchvision ops and their own deprecations: keep only real failures."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic: bool, external: bool,
            notes: list[str]) -> str:
    names = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    if opset >= 18:
        try:
            shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic else None
            with _quiet_exporter(), torch.no_grad():
                torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=external, opset_version=opset,
                                  dynamic_shapes=shapes, optimize=True, verbose=False, report=False, **names)
            return "dynamo"
        except Exception as e:  # the exporters raise many types; the fallback is the point
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            notes.append(f"dynamo exporter failed ({type(e).__name__}: {first[:200]}); used the TorchScript exporter")
            for f in path.parent.iterdir():
                f.unlink()
    if external:
        raise UserError("models over 2 GB need the dynamo exporter (opset >= 18), which failed on this model")
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, dynamic_axes=axes,
                          do_constant_folding=True, **names)
    return "torchscript"


def _simplify(proto: onnx.ModelProto, test_shape: tuple[int, ...], notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    """onnxsim, then both graphs in ONNX Runtime on one random input of ``test_shape``; the
    original graph on any failure or if the outputs differ by more than fp32's rtol.

    onnxsim's own check is off (``check_n=0``): it is an elementwise ``allclose(rtol=1e-4,
    atol=1e-5)``, which refuses large logits that agree to float32 rounding (RepMLPNet-T224,
    max|y| 426: one logit of 0.18 moved by 2e-4, 7e-7 of max|y|). The measure here is the one
    every proof of this package uses, ``max|Δ| / max|ref|``.
    """
    import onnxsim

    try:
        with redirect_stdout(io.StringIO()):  # onnxsim prints progress
            simplified, _ = onnxsim.simplify(proto, check_n=0)
        err = _ort_rel_err(simplified, proto, test_shape)
    except Exception as e:  # onnxsim and ORT raise RuntimeError, ValueError, onnx errors ...
        notes.append(f"onnxsim failed ({type(e).__name__}: {str(e).strip()[:200]}); kept the unsimplified graph")
        return proto, False
    rtol = get_precision("fp32").tolerance
    if not err <= rtol:
        notes.append(f"onnxsim changed the output (relative error {err:.1e} > {rtol:.0e}); kept the unsimplified graph")
        return proto, False
    return simplified, True


def _ort_rel_err(new: onnx.ModelProto, ref: onnx.ModelProto, shape: tuple[int, ...]) -> float:
    """:func:`rel_err` over all outputs of two float32 graphs run in ORT on one N(0, 1) input."""
    import numpy as np
    import onnxruntime as ort

    x = {INPUT_NAME: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}

    def run(m: onnx.ModelProto) -> list[torch.Tensor]:
        outs = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
        return [torch.from_numpy(o) for o in outs]
    return rel_err(run(new), run(ref))


def _model_metadata(model: nn.Module) -> dict:
    meta: dict = {"version": __version__, "form": "deploy" if hasattr(model, "reparam_report") else "train",
                  "input_size": list(model.input_size)}
    arch = getattr(model, "arch", None)
    if arch:
        from ..models.registry import get_format

        meta.update(arch=arch, family=get_format(arch).family, config=getattr(model, "config", None))
    report = getattr(model, "reparam_report", None)
    if report is not None:
        meta["reparam"] = report.summary()
    return meta


def set_metadata(proto: onnx.ModelProto, meta: dict) -> None:
    """Replace onnxsim's bookkeeping props with ours (``vismlp_deploy.*``, JSON values)."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(("onnxsim.", META_PREFIX))]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        proto.metadata_props.add(key=META_PREFIX + k, value=v if isinstance(v, str) else json.dumps(v))
    proto.producer_name, proto.producer_version = "vismlp-deploy", __version__


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``vismlp_deploy.*`` metadata of an exported model (values JSON-decoded); UserError if unreadable."""
    return metadata_of(load_proto(path))


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The model of an ``.onnx`` file, without its external data; UserError (one line) if the file is not one."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and kin: whatever the bytes are, not a model
        raise UserError(f"{path}: not a readable ONNX model, truncated or corrupt "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if not proto.ir_version or not proto.graph.node or not proto.graph.output:
        raise UserError(f"{path}: not an ONNX model (it decodes, but holds no graph)")
    return proto


def metadata_of(proto: onnx.ModelProto) -> dict:
    """The ``vismlp_deploy.*`` entries of ``proto.metadata_props`` (values JSON-decoded where they are JSON)."""
    out = {}
    for p in proto.metadata_props:
        if p.key.startswith(META_PREFIX):
            try:
                out[p.key[len(META_PREFIX):]] = json.loads(p.value)
            except json.JSONDecodeError:
                out[p.key[len(META_PREFIX):]] = p.value
    return out


def _save(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    if external:  # tensors still reference <name>.data (loaded without external data): keep them there
        onnx.save(proto, str(path))
    else:
        onnx.save(proto, str(path), save_as_external_data=False)


def move_into_place(tmpdir: Path, path: Path) -> None:
    """The .onnx (and any external-data file the exporter wrote beside it) to their final place."""
    side = [f for f in tmpdir.iterdir() if f.name != path.name]
    if not side and path.with_name(path.name + ".data").exists():
        os.unlink(path.with_name(path.name + ".data"))  # a stale side file of an overwritten large export
    for f in side:
        os.replace(f, path.with_name(f.name))
    os.replace(tmpdir / path.name, path)


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def is_quantized(model: onnx.ModelProto | str | os.PathLike) -> bool:
    """A Q/DQ (int8) graph: it has QuantizeLinear/DequantizeLinear nodes (float I/O, int8 inside)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def onnx_summary(path: str | os.PathLike) -> dict:
    """Nodes, op counts, inputs/outputs and whether the graph is quantized (Q/DQ) — for ``inspect``."""
    proto = onnx.load(str(path), load_external_data=False)
    counts = op_counts(proto)
    inits = {t.name for t in proto.graph.initializer}

    def dims(v) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in v.type.tensor_type.shape.dim]
    return {"nodes": sum(counts.values()), "op_counts": counts,
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "inputs": {i.name: dims(i) for i in proto.graph.input if i.name not in inits},
            "outputs": {o.name: dims(o) for o in proto.graph.output},
            "quantized": is_quantized(proto)}


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        counts[node.op_type] += 1
    return dict(sorted(counts.items()))


def audit_graph(proto: onnx.ModelProto, deploy: bool = True) -> list[str]:
    """Structural problems of an inference graph, one readable line each.

    Always: training-only structure (Dropout, BatchNormalization in training mode,
    training info). For deploy graphs also: BatchNormalization an exact fold would have
    removed, i.e. fed by a Conv/Gemm whose output it alone consumes, or feeding alone a
    Conv without padding (a BN shift meeting zero padding is not foldable; see transforms).
    """
    g = proto.graph
    issues = []
    if len(proto.training_info):
        issues.append("the model carries training info")
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    graph_outputs = {o.name for o in g.output}
    for n in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Dropout":
            issues.append(f"training-only node {n.name} (Dropout)")
        if n.op_type != "BatchNormalization":
            continue
        if attrs.get("training_mode", 0) or len(n.output) > 1:
            issues.append(f"BatchNormalization {n.name} in training mode")
        if not deploy:
            continue
        src = producer.get(n.input[0])
        if (src is not None and src.op_type in ("Conv", "Gemm") and len(consumers[src.output[0]]) == 1
                and src.output[0] not in graph_outputs and all(i in consts for i in src.input[1:] if i)):
            issues.append(f"BatchNormalization {n.name} directly after {src.op_type} {src.name} was not folded")
        users = consumers[n.output[0]]
        if len(users) == 1 and users[0].op_type == "Conv" and users[0].input[1] in consts and _unpadded(users[0]):
            issues.append(f"BatchNormalization {n.name} directly before unpadded Conv {users[0].name} was not folded")
    return issues


def _unpadded(conv: onnx.NodeProto) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    return auto in ("NOTSET", "VALID") and not any(attrs.get("pads", []))
