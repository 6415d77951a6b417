"""TensorRT engine from the exported ONNX (TensorRT 10 and 11 Python APIs).

- Networks are explicit-batch (``create_network(0)``); one optimization profile covers the
  dynamic batch ``MIN:OPT:MAX`` (a static ONNX gets MIN = OPT = MAX = its batch).
- Precision: ``fp32`` (TF32 cleared: strict FP32), ``tf32``, ``fp16``, ``bf16``.
  TensorRT 10 is weakly typed: ``BuilderFlag.FP16/BF16`` let it choose half kernels, and the
  FP16 audit's layers get FP32 precision constraints (``OBEY_PRECISION_CONSTRAINTS``).
  TensorRT 11 removed those flags (networks are always strongly typed), so the ONNX is first
  converted with NVIDIA ModelOpt AutoCast, keeping I/O types and the audited layers
  (norms, out-of-range weights) in FP32; the converted ONNX is written beside the engine.
- Workspace limit via ``set_memory_pool_limit(WORKSPACE)``; a persistent timing cache
  (loaded before, saved after the build) makes rebuilds fast.
- ``<engine>.json`` beside the plan records TensorRT version, GPU, precision, profile,
  workspace, the source ONNX's SHA-256 and the audit, so an engine can be traced back.

When TensorRT or a CUDA GPU is missing :class:`UserError` (exit 2) says exactly what is
missing and how to install it; the CLI has written the ONNX before getting here.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import onnx

from .. import __version__
from ..errors import UserError
from .fp16_audit import Fp16Audit, audit_fp16

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
DEFAULT_DYNAMIC_BATCH = (1, 8, 32)

TENSORRT_INSTALL = ("install TensorRT 10 or 11 for your CUDA version: `pip install tensorrt` "
                    "(NVIDIA's wheels; if pip cannot find them: "
                    "`pip install --extra-index-url https://pypi.nvidia.com tensorrt`)")
MODELOPT_INSTALL = ("`pip install --extra-index-url https://pypi.nvidia.com \"nvidia-modelopt[onnx]\"`")


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


def import_tensorrt(onnx_path: str | os.PathLike | None = None):
    """The ``tensorrt`` module and a usable CUDA device, or UserError saying what is missing."""
    kept = f" The ONNX model is at {onnx_path}; nothing is lost." if onnx_path else ""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed (import tensorrt: {e}). To build the engine, {TENSORRT_INSTALL}, "
                        f"then run the command again.{kept}") from None
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"no CUDA GPU is usable: TensorRT {trt.__version__} is installed but torch.cuda.is_available() "
                        f"is False (torch {torch.__version__}, {build}). Building and running an engine needs an NVIDIA "
                        f"GPU with its driver and a CUDA build of PyTorch (`pip install torch --index-url "
                        f"https://download.pytorch.org/whl/cu128`).{kept}")
    return trt


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


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
                    audit: Fp16Audit | None, built_from: str | os.PathLike, build_s: float,
                    timing_cache: str | None) -> dict:
    """What ``<engine>.json`` records (JSON-ready)."""
    from .onnx import read_metadata

    return {
        "vismlp_deploy": __version__, "tensorrt": trt_version, "gpu": gpu, "compute_capability": compute_capability,
        "precision": precision, "strongly_typed": strongly_typed,
        "profile": {"input": profile["input"], **{k: list(profile[k]) for k in ("min", "opt", "max")}},
        "workspace_gib": workspace_gib, "source_onnx": str(onnx_path), "source_onnx_sha256": sha256(onnx_path),
        "built_from": str(built_from), "build_s": round(build_s, 3), "timing_cache": timing_cache,
        "fp16_audit": audit.to_dict() if audit else None, "model": read_metadata(onnx_path),
    }


def metadata_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_engine_metadata(engine_path: str | os.PathLike, meta: dict) -> Path:
    path = metadata_path(engine_path)
    _write_atomic(path, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def autocast_onnx(onnx_path: Path, out_path: Path, precision: str, audit: Fp16Audit) -> Path:
    """TensorRT 11's route to FP16/BF16: a mixed-precision ONNX from ModelOpt AutoCast,
    I/O kept FP32 and the audited nodes (norms, out-of-range weights) excluded."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as e:
        raise UserError(f"TensorRT 11 has no {precision.upper()} builder flag: a {precision} engine needs the ONNX "
                        f"converted first by NVIDIA ModelOpt AutoCast, which is not installed ({e}). Install it with "
                        f"{MODELOPT_INSTALL}. The ONNX model is at {onnx_path}; nothing is lost.") from None
    converted = convert_to_mixed_precision(
        onnx_path=str(onnx_path), low_precision_type=precision, keep_io_types=True,
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in audit.keep_fp32_nodes],
        op_types_to_exclude=audit.keep_fp32_op_types)
    onnx.save(converted, str(out_path))
    return out_path


def _keep_layers_fp32(trt, network, names: list[str]) -> int:
    """TensorRT 10: FP32 precision constraints on the layers the ONNX parser made from
    ``names`` (a node becomes a layer of the same name, or several named ``<name>_<k>``)."""
    wanted = set(names)
    kept = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        base = layer.name if layer.name in wanted else re.sub(r"_\d+$", "", layer.name)
        if base not in wanted:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if all(o.dtype == trt.float32 for o in outs):  # shape/int layers have no precision to pin
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            kept += 1
    return kept


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str = "fp16",
                 dynamic_batch: tuple[int, int, int] | None = DEFAULT_DYNAMIC_BATCH, workspace_gib: float = 4.0,
                 timing_cache: str | os.PathLike | None = None, log=print) -> Path:
    """Build a serialized engine (plan) from ``onnx_path``; write it and ``<engine>.json``.

    dynamic_batch: (MIN, OPT, MAX) of the profile; None for a static ONNX's own batch.
    timing_cache: file loaded before and saved after the build (default: per TensorRT
    version and GPU under ``~/.cache/vismlp_deploy``). ``log`` receives the audit findings.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    profile = profile_shapes(onnx_path, dynamic_batch)
    trt = import_tensorrt(onnx_path)
    import torch

    gpu = torch.cuda.get_device_name()
    cc = "%d.%d" % torch.cuda.get_device_capability()
    major = trt_major(trt)
    audit = None
    source = onnx_path
    if precision in ("fp16", "bf16"):
        audit = audit_fp16(onnx.load(str(onnx_path)), precision)
        for finding in audit.findings:
            log(f"fp16 audit: {finding}")
        if major >= 11:
            source = autocast_onnx(onnx_path, engine_path.with_suffix(f".{precision}.onnx"), precision, audit)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # the only mode in 11; accepted
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT {trt.__version__} cannot parse {source}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if hasattr(trt.BuilderFlag, "TF32"):  # on by default in TensorRT: "fp32" must clear it
        (config.set_flag if precision == "tf32" else config.clear_flag)(trt.BuilderFlag.TF32)
    if precision in ("fp16", "bf16") and major < 11:
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
        kept = _keep_layers_fp32(trt, network, audit.keep_fp32_nodes)
        if kept:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"fp16 audit: {kept} TensorRT layer(s) constrained to FP32")

    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(profile["input"], profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build an engine from {source} (see its log above)")
    build_s = time.perf_counter() - t0
    _write_atomic(engine_path, bytes(plan))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    write_engine_metadata(engine_path, engine_metadata(
        onnx_path, trt_version=trt.__version__, gpu=gpu, compute_capability=cc, precision=precision,
        profile=profile, workspace_gib=workspace_gib, strongly_typed=major >= 11, audit=audit,
        built_from=source, build_s=build_s, timing_cache=str(cache_path)))
    return engine_path
