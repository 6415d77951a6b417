"""TensorRT engine from the exported ONNX (TensorRT 10 and 11 Python APIs; older ones are refused).

- Networks are explicit-batch; one optimization profile covers the dynamic batch
  ``MIN:OPT:MAX`` (a static ONNX gets MIN = OPT = MAX = its batch).
- Typing: one strongly typed path for TensorRT 10 and 11. The ONNX carries its own
  precision and no precision builder flag is set: ``fp32`` (TF32 cleared: strict FP32) and
  ``tf32`` build the exported float32 ONNX; ``fp16``/``bf16`` build the ONNX converted by
  NVIDIA ModelOpt AutoCast (I/O kept FP32, the FP16 audit's nodes excluded), written beside
  the engine as ``<engine stem>.<precision>.onnx``; ``int8`` builds a Q/DQ ONNX
  (QuantizeLinear/DequantizeLinear, symmetric scales) as it is. TensorRT 11 has only this
  mode (its FP16/BF16/INT8 flags are gone); 10 has it since 10.0 (``STRONGLY_TYPED``) and
  deprecates weak typing from 10.12.
- The weakly typed path is kept on TensorRT 10 only where strong typing cannot do the job:
  fp16/bf16 without ModelOpt (AutoCast is the only converter), or when asked
  (``strongly_typed=False``, e.g. to let TensorRT choose each layer's precision). It sets
  ``BuilderFlag.FP16/BF16`` with FP32 constraints on the audited layers, or
  ``BuilderFlag.INT8`` for a Q/DQ network (without it TensorRT 10 says "int8 is not
  configured in the builder").
- Workspace limit via ``set_memory_pool_limit(WORKSPACE)``; a persistent timing cache
  (loaded before, saved after the build; a cache from another GPU, driver or TensorRT is
  replaced by a fresh one, and the log says so) makes rebuilds fast.
- ``<engine>.json`` beside the plan records TensorRT version, GPU, precision, typing, the
  builder flags set, profile, workspace, the source ONNX's SHA-256, the audit and what was
  really kept in FP32, so an engine can be traced back. It is written before the engine
  appears: an engine never exists without it.

ModelOpt (``nvidia-modelopt[onnx] >= 0.33``) is optional and needed only for fp16/bf16
engines on TensorRT 11 (on 10 it selects the strongly typed path). Its ``[onnx]`` extra pins
onnx, onnxruntime-gpu and polygraphy versions (0.33: ``onnx>=1.18``, ``onnxruntime-gpu~=1.22``,
``polygraphy>=0.49.22``; later releases ``onnx~=1.21``, ``onnxruntime-gpu~=1.24``) that can
clash with this package's ``onnx``/``onnxruntime``: both ORT wheels install the same
``onnxruntime`` module, so remove ``onnxruntime`` before installing it, and install it only
on the machine that builds engines (best in its own virtual environment).

When TensorRT or a CUDA GPU is missing :class:`UserError` (exit 2) says exactly what is
missing and how to install it; the CLI has written the ONNX before getting here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import onnx

from .. import __version__
from ..errors import UserError
from ..precision import PRECISIONS as ALL_PRECISIONS
from ..precision import get_precision
from .fp16_audit import Fp16Audit, audit_fp16, onnx_node_name
from .onnx import PROTOBUF_LIMIT, is_quantized, move_into_place, read_metadata

# the precisions an engine builds: the package's vocabulary less fp64 (TensorRT has no float64 compute)
PRECISIONS = tuple(name for name in ALL_PRECISIONS if name != "fp64")
HALF = ("fp16", "bf16")
DEFAULT_DYNAMIC_BATCH = (1, 8, 32)
MIN_TENSORRT = 10
MIN_MODELOPT = (0, 33)  # convert_to_mixed_precision is exported from 0.33 (earlier: autocast.convert)

TENSORRT_INSTALL = ("install TensorRT 10 or 11 for your CUDA version: `pip install tensorrt` "
                    "(NVIDIA's wheels; if pip cannot find them: "
                    "`pip install --extra-index-url https://pypi.nvidia.com tensorrt`)")
MODELOPT_INSTALL = ("`pip uninstall onnxruntime; pip install --extra-index-url https://pypi.nvidia.com "
                    "\"nvidia-modelopt[onnx]>=0.33\"` (its [onnx] extra pins onnx, onnxruntime-gpu and polygraphy "
                    "versions that replace this package's; best in the environment that only builds engines)")


def parse_dynamic_batch(text: str) -> tuple[int, int, int]:
    """``"1:8:32"`` -> (1, 8, 32); a single ``"8"`` means a static batch (8, 8, 8)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--dynamic-batch {text!r}: expected MIN:OPT:MAX integers, e.g. 1:8:32") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise UserError(f"--dynamic-batch {text!r}: expected MIN:OPT:MAX (three integers)")
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise UserError(f"--dynamic-batch {text!r}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def onnx_input(onnx_path: str | os.PathLike) -> tuple[str, int | None, tuple[int, ...]]:
    """(input name, static batch or None when symbolic, (C, H, W)) of an exported model."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path}: expected one image input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or any(not d.HasField("dim_value") for d in dims[1:]):
        raise UserError(f"{onnx_path}: input must be (N, C, H, W) with fixed C, H, W")
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return inputs[0].name, batch, tuple(d.dim_value for d in dims[1:])


def profile_shapes(onnx_path: str | os.PathLike, dynamic_batch: tuple[int, int, int] | None) -> dict:
    """The optimization profile: {"input": name, "min"/"opt"/"max": (N, C, H, W)}."""
    name, static, chw = onnx_input(onnx_path)
    if static is not None:
        if dynamic_batch is not None and set(dynamic_batch) != {static}:
            raise UserError(f"{onnx_path} has a static batch of {static}; export it with a dynamic batch "
                            f"to build the profile {':'.join(map(str, dynamic_batch))}")
        dynamic_batch = (static,) * 3
    lo, opt, hi = dynamic_batch or DEFAULT_DYNAMIC_BATCH
    return {"input": name, "min": (lo, *chw), "opt": (opt, *chw), "max": (hi, *chw)}


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"10.9.0.34"`` -> (10, 9); ``"0.33.0rc1"`` -> (0, 33)."""
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def trt_major(trt) -> int:
    return _version_tuple(trt.__version__)[0]


def import_tensorrt(onnx_path: str | os.PathLike | None = None):
    """The ``tensorrt`` module (10 or later) and a usable CUDA device, or UserError saying what is missing."""
    kept = f" The ONNX model is at {onnx_path}; nothing is lost." if onnx_path else ""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed (import tensorrt: {e}). To build the engine, {TENSORRT_INSTALL}, "
                        f"then run the command again.{kept}") from None
    if trt_major(trt) < MIN_TENSORRT:  # 8.x: create_network(0) is implicit-batch, and the parser fails misleadingly
        raise UserError(f"TensorRT {trt.__version__} is too old: this package uses the TensorRT 10/11 API "
                        f"(explicit-batch networks, named I/O tensors); {TENSORRT_INSTALL}.{kept}")
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"no CUDA GPU is usable: TensorRT {trt.__version__} is installed but "
                        f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}). Building and "
                        f"running an engine needs an NVIDIA GPU with its driver and a CUDA build of PyTorch "
                        f"(`pip install torch --index-url https://download.pytorch.org/whl/cu128`).{kept}")
    return trt


def import_autocast(precision: str):
    """ModelOpt AutoCast's ``convert_to_mixed_precision`` (ModelOpt >= 0.33), or UserError saying why not."""
    need = f"a strongly typed {precision} engine is built from an ONNX converted by NVIDIA ModelOpt AutoCast"
    try:
        import modelopt
    except ImportError:
        raise UserError(f"{need}, and ModelOpt is not installed. Install it with {MODELOPT_INSTALL}") from None
    version = getattr(modelopt, "__version__", "0")
    if _version_tuple(version) < MIN_MODELOPT:
        raise UserError(f"{need}: ModelOpt {version} is too old (convert_to_mixed_precision needs >= 0.33). "
                        f"Upgrade it with {MODELOPT_INSTALL}")
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise UserError(f"{need}: ModelOpt {version} is installed but its ONNX part does not import ({e}). "
                        f"Install the [onnx] extra with {MODELOPT_INSTALL}") from None
    return convert_to_mixed_precision


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_timing_cache(trt_version: str, gpu: str) -> Path:
    """Per TensorRT version and GPU (caches do not transfer between them)."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vismlp_deploy"
    return root / f"tensorrt-{trt_version}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.timing"


def engine_metadata(onnx_path: str | os.PathLike, *, trt_version: str, gpu: str, compute_capability: str,
                    precision: str, profile: dict, workspace_gib: float, strongly_typed: bool,
                    builder_flags: list[str], audit: Fp16Audit | None, kept_fp32: dict | None,
                    built_from: str | os.PathLike, build_s: float, timing_cache: str | None) -> dict:
    """What ``<engine>.json`` records (JSON-ready). ``kept_fp32``: {"by": what kept them, "nodes": [...]}
    (AutoCast's result, its own choices included, or the nodes whose layers were constrained)."""
    return {
        "vismlp_deploy": __version__, "tensorrt": trt_version, "gpu": gpu, "compute_capability": compute_capability,
        "precision": precision, "strongly_typed": strongly_typed, "builder_flags": builder_flags,
        "profile": {"input": profile["input"], **{k: list(profile[k]) for k in ("min", "opt", "max")}},
        "workspace_gib": workspace_gib, "source_onnx": str(onnx_path), "source_onnx_sha256": sha256(onnx_path),
        "built_from": str(built_from), "build_s": round(build_s, 3), "timing_cache": timing_cache,
        "fp16_audit": audit.to_dict() if audit else None, "kept_fp32": kept_fp32, "model": read_metadata(onnx_path),
    }


def metadata_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_engine_metadata(engine_path: str | os.PathLike, meta: dict) -> Path:
    path = metadata_path(engine_path)
    _write_atomic(path, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def _write_engine(engine_path: Path, plan: bytes, meta: dict) -> None:
    """Plan to a temporary file, then its JSON, then the plan into place: no engine without metadata."""
    tmp = _tmp_path(engine_path)
    tmp.write_bytes(plan)
    try:
        write_engine_metadata(engine_path, meta)
        os.replace(tmp, engine_path)
    finally:
        tmp.unlink(missing_ok=True)


def save_onnx(proto: onnx.ModelProto, path: Path) -> Path:
    """Write ``proto`` atomically; past protobuf's 2 GB its weights go to ``<name>.data`` beside it."""
    external = proto.ByteSize() > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix=".vismlp-", dir=path.parent) as tmpdir:
        onnx.save(proto, str(Path(tmpdir) / path.name), save_as_external_data=external,
                  all_tensors_to_one_file=True, location=f"{path.name}.data")
        move_into_place(Path(tmpdir), path)
    return path


def check_quantization(model: onnx.ModelProto, precision: str, onnx_path: Path) -> None:
    """int8 engines build from a Q/DQ ONNX, and a Q/DQ ONNX builds only as int8 (its types are its precision)."""
    quantized = is_quantized(model)
    if precision == "int8" and not quantized:
        raise UserError(f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes: an int8 engine is built from a "
                        "quantized (Q/DQ) ONNX. Quantize it first (static calibration, QDQ format, symmetric scales), "
                        "then build the engine from the quantized ONNX")
    if quantized and precision != "int8":
        raise UserError(f"{onnx_path} is quantized (QuantizeLinear/DequantizeLinear nodes): build it with precision "
                        f"int8, or build {precision} from the float ONNX")


def name_unnamed_nodes(model: onnx.ModelProto) -> bool:
    """Give unnamed nodes the name TensorRT's parser uses for them (so AutoCast's exclusions,
    which match node names, can reach them); True if any was renamed."""
    unnamed = [n for n in model.graph.node if not n.name]
    for node in unnamed:
        node.name = onnx_node_name(node)
    return bool(unnamed)


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of a mixed-precision ONNX that compute in FP32: those (Casts and Constants aside)
    with a float32 output. AutoCast returns its model type-inferred, so value_info has the types."""
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    return sorted(onnx_node_name(n) for n in g.node if n.op_type not in ("Cast", "Constant")
                  and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output))


def autocast_onnx(model: onnx.ModelProto, onnx_path: Path, out_path: Path, precision: str, audit: Fp16Audit,
                  renamed: bool) -> list[str]:
    """The strongly typed route to FP16/BF16: ``out_path`` = ModelOpt AutoCast's mixed-precision
    ONNX, I/O kept FP32, the audited nodes and norm op types excluded. ``model`` is ``onnx_path``
    loaded (with its unnamed nodes named when ``renamed``). Returns the nodes AutoCast really kept
    in FP32 (its own range-based choices included)."""
    convert = import_autocast(precision)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", dir=out_path.parent) as tmpdir:
        source = save_onnx(model, Path(tmpdir) / onnx_path.name) if renamed else onnx_path
        converted = convert(onnx_path=str(source), low_precision_type=precision, keep_io_types=True,
                            nodes_to_exclude=[f"^{re.escape(n)}$" for n in audit.keep_fp32_nodes],
                            op_types_to_exclude=audit.keep_fp32_op_types)
    save_onnx(converted, out_path)
    return fp32_nodes(converted)


_LAYER_METADATA = re.compile(r"\[ONNX Layer: (.*?)(?: \| .*)?\]", re.DOTALL)


def layer_onnx_node(layer, node_names: set[str]) -> str | None:
    """The ONNX node (parser name) a parsed TensorRT layer was made for, or None (parser helpers).

    onnx-tensorrt (``ImporterContext::registerLayer``) names a node's layers ``getNodeName(node)``
    and, once that is taken, ``<name>_<k>`` with one counter shared by every layer and tensor
    name, and writes ``[ONNX Layer: <name>]`` (``... | Local Function: f]`` inside a function)
    into each one's metadata; helper layers it adds for no node (``ONNXTRT_*``) get none. The
    metadata is exact where a name is not (``node_conv2d_8`` is node ``node_conv2d_8`` or a
    second layer of ``node_conv2d``), so names decide only for layers without metadata: the
    exact node name first, else ``<node>_<k>``.
    """
    found = _LAYER_METADATA.fullmatch(layer.metadata or "")
    if found:
        return found.group(1)
    if layer.name in node_names:
        return layer.name
    base, _, suffix = layer.name.rpartition("_")
    return base if suffix.isdigit() and base in node_names else None


def keep_layers_fp32(trt, network, wanted: list[str], node_names: set[str]) -> dict[str, list[str]]:
    """Weakly typed TensorRT 10: FP32 precision and output types on the float layers made from
    the ``wanted`` nodes. Returns {node: [constrained layer names]}."""
    wanted_set, kept = set(wanted), {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = layer_onnx_node(layer, node_names)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if node not in wanted_set or not all(o.dtype == trt.float32 for o in outs):  # int/shape layers: no precision
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        kept.setdefault(node, []).append(layer.name)
    return kept


def choose_strong_typing(major: int, precision: str, requested: bool | None, log) -> bool:
    """Strongly typed unless TensorRT 10 must (fp16/bf16 without ModelOpt) or is asked to be weakly typed."""
    if major >= 11:
        if requested is False:
            raise UserError("TensorRT 11 networks are always strongly typed (weak typing was removed)")
        return True
    if requested is not None:
        return requested
    if precision in HALF:
        try:
            import_autocast(precision)
        except UserError as e:
            log(f"TensorRT {major}: {e}. Building weakly typed instead (BuilderFlag.{precision.upper()} with FP32 "
                f"layer constraints; deprecated since TensorRT 10.12, gone in 11)")
            return False
    return True


def _precision_flags(trt, config, precision: str, strong: bool) -> list[str]:
    """TF32 on for tf32 only (on by default: fp32 must clear it); on a weakly typed network the
    precision flag too. Returns the names of the flags set."""
    flags = []
    if precision == "tf32":
        config.set_flag(trt.BuilderFlag.TF32)
        flags.append("TF32")
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if not strong and precision in ("fp16", "bf16", "int8"):
        config.set_flag(getattr(trt.BuilderFlag, precision.upper()))
        flags.append(precision.upper())
    return flags


def _attach_timing_cache(config, path: Path, trt_version: str, log) -> None:
    """The cache file's timings, or a fresh cache where the file is missing or was made by
    another GPU, driver or TensorRT (``set_timing_cache`` returns False then)."""
    data = path.read_bytes() if path.is_file() else b""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        log(f"timing cache {path} does not match this GPU, driver or TensorRT {trt_version}: building with a fresh "
            "cache, which replaces it")
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp16",
                 dynamic_batch: tuple[int, int, int] | None = DEFAULT_DYNAMIC_BATCH, workspace_gib: float = 4.0,
                 timing_cache: str | os.PathLike | None = None, strongly_typed: bool | None = None,
                 log=print) -> Path:
    """Build a serialized engine (plan) from ``onnx_path``; write it and ``<engine>.json``.

    precision: one of :data:`PRECISIONS`; ``int8`` needs a Q/DQ ONNX (and only int8 builds one).
    dynamic_batch: (MIN, OPT, MAX) of the profile; None for a static ONNX's own batch.
    timing_cache: file loaded before and saved after the build (default: per TensorRT
    version and GPU under ``$XDG_CACHE_HOME`` or ``~/.cache``, in ``vismlp_deploy/``).
    strongly_typed: None = strongly typed wherever possible (see the module docstring);
    False = weakly typed (TensorRT 10 only). ``log`` receives the audit findings and notes.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if get_precision(precision).name not in PRECISIONS:
        raise UserError(f"precision {precision!r} cannot build an engine: choose one of {', '.join(PRECISIONS)}")
    profile = profile_shapes(onnx_path, dynamic_batch)
    model = onnx.load(str(onnx_path), load_external_data=precision in HALF)  # weights: only the audit reads them
    check_quantization(model, precision, onnx_path)
    trt = import_tensorrt(onnx_path)
    import torch

    gpu = torch.cuda.get_device_name()
    cc = "{}.{}".format(*torch.cuda.get_device_capability())
    major = trt_major(trt)
    strong = choose_strong_typing(major, precision, strongly_typed, log)
    audit, kept_fp32, source = None, None, onnx_path
    node_names = {onnx_node_name(n) for n in model.graph.node}
    if precision in HALF:
        renamed = name_unnamed_nodes(model)
        audit = audit_fp16(model, precision)
        for finding in audit.findings:
            log(f"fp16 audit: {finding}")
        if strong:
            source = engine_path.with_suffix(f".{precision}.onnx")
            kept_fp32 = {"by": "ModelOpt AutoCast",
                         "nodes": autocast_onnx(model, onnx_path, source, precision, audit, renamed)}
    del model  # the weights are not needed for the build: free them before TensorRT takes its memory

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 11: always strongly typed (its STRONGLY_TYPED flag is deprecated and ignored); 10: opt in
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
                                     if strong and major < 11 else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT {trt.__version__} cannot parse {source}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    flags = _precision_flags(trt, config, precision, strong)
    if precision in HALF and not strong:
        kept = keep_layers_fp32(trt, network, audit.keep_fp32_nodes, node_names)
        if kept:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            flags.append("OBEY_PRECISION_CONSTRAINTS")
        missed = sorted(set(audit.keep_fp32_nodes) - set(kept))
        log(f"fp16 audit: {sum(map(len, kept.values()))} TensorRT layer(s) of {len(kept)} node(s) constrained to FP32"
            + (f"; no float layer found for {', '.join(missed)}" if missed else ""))
        kept_fp32 = {"by": "TensorRT layer constraints", "nodes": sorted(kept)}

    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile["input"], profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu)
    _attach_timing_cache(config, cache_path, trt.__version__, log)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build an engine from {source} (see its log above)")
    build_s = time.perf_counter() - t0
    cache = config.get_timing_cache()
    _write_engine(engine_path, bytes(plan), engine_metadata(
        onnx_path, trt_version=trt.__version__, gpu=gpu, compute_capability=cc, precision=precision,
        profile=profile, workspace_gib=workspace_gib, strongly_typed=strong, builder_flags=flags, audit=audit,
        kept_fp32=kept_fp32, built_from=source, build_s=build_s, timing_cache=str(cache_path) if cache else None))
    if cache is None:
        log(f"TensorRT kept no timing cache for this build; {cache_path} is unchanged")
    else:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, bytes(cache.serialize()))
    return engine_path
