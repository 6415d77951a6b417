"""The backend registry: every backend is declared once, here or by a caller's ``register_backend``.

A backend says what it runs (a torch form, or the ONNX export of a form), in which
precisions, on which devices, whether it can run here, and how to make its runner from the
artifacts of one model (:class:`~vismlp_deploy.runtime.factory.RunnerFactory`). ``verify``,
``bench`` and their ``--help`` texts read this registry, so a backend registered here
appears everywhere at once.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from .base import Runner
    from .factory import RunnerFactory


@dataclass(frozen=True)
class Backend:
    """One way to run a model. ``make(factory, form, precision)`` returns an (inactive) Runner."""

    name: str
    description: str
    precisions: tuple[str, ...]
    devices: tuple[str, ...]  # device kinds: "cpu", "cuda"
    make: Callable[[RunnerFactory, str, str], Runner]
    runs_onnx: bool = False  # runs an exported graph: a given .onnx file runs here, torch forms are exported first
    unavailable: Callable[[str], str | None] = lambda device: None  # why it cannot run on ``device`` (None: it can)
    default_on: tuple[str, ...] = ("cpu", "cuda")  # device kinds where verify/bench pick it by default

    def why_not(self, device: str, precision: str | None = None) -> str | None:
        """Why this backend cannot run on ``device`` in ``precision`` (None: it can)."""
        kind = device.partition(":")[0]
        if kind not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)}, not {kind}"
        if precision is not None and precision not in self.precisions:
            return f"{self.name} runs {', '.join(self.precisions)}, not {precision}"
        if precision == "tf32" and kind != "cuda":
            return "tf32 is a CUDA tensor-core mode"
        return self.unavailable(device)


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, *, description: str, precisions: tuple[str, ...], devices: tuple[str, ...],
                     make: Callable[[RunnerFactory, str, str], Runner], runs_onnx: bool = False,
                     unavailable: Callable[[str], str | None] | None = None,
                     default_on: tuple[str, ...] = ("cpu", "cuda")) -> Backend:
    """Declare a backend; it then appears in ``verify --runners``, ``bench --backends`` and their help."""
    if name in BACKENDS:
        raise ValueError(f"backend {name} registered twice")
    if ":" in name or "," in name or name in ("train", "deploy"):
        raise ValueError(f"backend name {name!r} clashes with the runner grammar (BACKEND:FORM, comma lists)")
    BACKENDS[name] = Backend(name, description, tuple(precisions), tuple(devices), make, runs_onnx,
                             unavailable or (lambda device: None), tuple(default_on))
    return BACKENDS[name]


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None


def default_backends(device: str) -> tuple[str, ...]:
    """The backends verify/bench use when none are named: those meant for this device that can run here."""
    kind = device.partition(":")[0]
    return tuple(b.name for b in BACKENDS.values() if kind in b.default_on and b.why_not(device) is None)


def backends_help() -> str:
    """One line per backend for ``--help``: name, precisions, devices, description."""
    return "; ".join(f"{b.name} ({'/'.join(b.precisions)} on {'/'.join(b.devices)}): {b.description}"
                     for b in BACKENDS.values())


# ----------------------------------------------------------------------------- the built-in backends

def _torch(compile: bool):
    def make(factory: RunnerFactory, form: str, precision: str) -> Runner:
        from .base import TorchRunner

        backend = "torch-compile" if compile else "torch"
        return TorchRunner(factory.module(form), name=f"{backend}-{form}", device=factory.device,
                           precision=precision, compile=compile)
    return make


def _compile_unavailable(device: str) -> str | None:
    # inductor compiles C++ (CPU) or Triton (CUDA) kernels at the first call
    if device == "cpu" and shutil.which("cc") is None and shutil.which("gcc") is None:
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None


def _ort(factory: RunnerFactory, form: str, precision: str) -> Runner:
    from .ort_runner import OrtRunner

    provider = "cpu" if factory.device == "cpu" else "cuda"
    path = factory.quantized_onnx(form) if precision == "int8" else factory.onnx(form)
    return OrtRunner(path, provider=provider, threads=factory.threads, name=f"onnxruntime-{form}",
                     spin=factory.ort_spin)


def _ort_unavailable(device: str) -> str | None:
    from .ort_runner import available_providers

    provider = "cpu" if device == "cpu" else "cuda"
    if provider not in available_providers():
        return f"onnxruntime has no {provider} provider here (install onnxruntime-gpu)"
    return None


def _trt(factory: RunnerFactory, form: str, precision: str) -> Runner:
    from .trt_runner import TrtRunner

    index = int(factory.device.partition(":")[2] or 0)
    return TrtRunner(factory.engine(form, precision), device=index, name=f"tensorrt-{form}")


def _trt_unavailable(device: str) -> str | None:
    from ..export.tensorrt import import_tensorrt

    try:
        import_tensorrt()
    except UserError as e:
        return str(e).split(". ")[0]
    return None


register_backend("torch", description="PyTorch eager", precisions=("fp32", "fp64", "tf32", "fp16", "bf16"),
                 devices=("cpu", "cuda"), make=_torch(False))
register_backend("torch-compile", description="torch.compile (inductor)", precisions=("fp32", "tf32", "fp16", "bf16"),
                 devices=("cpu", "cuda"), make=_torch(True), unavailable=_compile_unavailable, default_on=("cuda",))
register_backend("onnxruntime", description="ONNX Runtime on the exported graph (int8: its Q/DQ graph)",
                 precisions=("fp32", "int8"), devices=("cpu", "cuda"), make=_ort, runs_onnx=True,
                 unavailable=_ort_unavailable)
register_backend("tensorrt", description="a TensorRT engine built from the exported graph",
                 precisions=("fp32", "tf32", "fp16", "bf16", "int8"), devices=("cuda",), make=_trt, runs_onnx=True,
                 unavailable=_trt_unavailable)
