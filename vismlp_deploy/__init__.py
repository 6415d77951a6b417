"""vismlp-deploy: exact re-parameterization and deployment of vision-MLP networks.

Data flow: checkpoint -> ``load_checkpoint`` (train-time model) -> ``reparameterize``
(deploy model + report) -> ``export_onnx`` / ``build_engine`` (artifacts) -> runners ->
``verify`` / ``bench``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .checkpoint.load import load_checkpoint
from .models.registry import create_model
from .reparam import ReparamReport, reparameterize
from . import bench, verify  # callable subpackages: vismlp_deploy.verify(...), vismlp_deploy.bench(...)


def __getattr__(name: str):
    # Heavier layers (onnx, onnxruntime, tensorrt) are imported only when asked for.
    lazy = {
        "export_onnx": ("export.onnx", "export_onnx"),
        "build_engine": ("export.tensorrt", "build_engine"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
    raise AttributeError(name)


__all__ = ["__version__", "load_checkpoint", "create_model", "reparameterize", "ReparamReport",
           "export_onnx", "build_engine", "verify", "bench"]
