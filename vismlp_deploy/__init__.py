"""vismlp-deploy: exact re-parameterization and deployment of vision-MLP networks.

Data flow: checkpoint -> ``load_checkpoint`` (train-time model) -> ``reparameterize``
(deploy model + report) -> ``export_onnx`` / ``build_engine`` (artifacts) -> runners ->
``verify`` / ``bench``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .checkpoint.load import load_checkpoint
from .models.registry import create_model
from .reparam import ReparamReport, reparameterize

# Names whose modules pull in onnx / onnxruntime / tensorrt are imported on first use.
_LAZY = {
    "export_onnx": "export.onnx",
    "build_engine": "export.tensorrt",
    "verify": "verification.compare",
    "bench": "benchmark.run",
    "bench_zoo": "benchmark.run",
}

__all__ = ["__version__", "load_checkpoint", "create_model", "reparameterize", "ReparamReport", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
