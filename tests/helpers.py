"""Shared test utilities: the equivalence measure of the numerics policy."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

FP32_RTOL = 1e-5
FP64_RTOL = 1e-10


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| (the design's equivalence measure)."""
    y, ref = y.detach().double(), ref.detach().double()
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def assert_close(y: torch.Tensor, ref: torch.Tensor, rtol: float | None = None) -> None:
    if rtol is None:
        rtol = FP64_RTOL if ref.dtype == torch.float64 else FP32_RTOL
    err = rel_err(y, ref)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.0e}"


def load_script(name: str) -> ModuleType:
    """A script of ``benchmarks/`` imported as a module (its functions are tested like the package's)."""
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
