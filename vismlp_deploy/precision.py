"""The one precision vocabulary: names, torch dtypes, and what each must reproduce of fp32.

Every command and backend speaks these names. A precision is never a re-parameterization
step: it is chosen explicitly, and its agreement with the fp32 reference is measured and
judged against the targets below (exact precisions by the relative error alone; low
precisions also by top-1 agreement, cosine and SQNR, measured on real images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class Precision:
    """One precision and its targets against the fp32 (or fp64) reference.

    tolerance: ``max|y - ref| / max|ref|`` allowed (the numerics policy's measure).
    min_top1: fraction of samples whose argmax must agree (None: not judged).
    min_cosine: worst per-sample cosine similarity allowed (None: not judged).
    min_sqnr_db: ``10 log10(sum ref^2 / sum (y - ref)^2)`` required (None: not judged).
    """

    name: str
    dtype: torch.dtype | None  # torch compute dtype; None where torch has no such mode (int8)
    tolerance: float
    description: str
    min_top1: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None

    @property
    def exact(self) -> bool:
        """fp64/fp32: judged by the relative error alone (the re-parameterization is exact)."""
        return self.name in ("fp64", "fp32")


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp64", torch.float64, 1e-10, "float64 (reference checks of the folds)"),
    Precision("fp32", torch.float32, 1e-5, "float32, TF32 off"),
    Precision("tf32", torch.float32, 5e-3, "float32 storage, TF32 tensor-core matmuls (CUDA)"),
    Precision("fp16", torch.float16, 2e-2, "float16 (norms kept in float32 where the backend allows)",
              min_top1=0.99, min_cosine=0.999),
    # bf16 / int8 targets from docs/precision.md (trained Fashion-MNIST fixtures, 10k test images):
    # bf16 cast: rel <= 0.024, worst cosine >= 0.9990, SQNR >= 37 dB; int8 after the guard: rel <=
    # 0.114, worst cosine >= 0.972, SQNR >= 29.9 dB (fully quantized, guard off: ~24 dB). Each
    # target sits about a factor of two (6 dB) beyond the worst trained network measured.
    Precision("bf16", torch.bfloat16, 1e-1, "bfloat16 (float32's range, 8-bit mantissa)",
              min_top1=0.99, min_cosine=0.99, min_sqnr_db=30.0),
    Precision("int8", None, 0.25, "int8 weights and activations, Q/DQ ONNX (calibrated)",
              min_top1=0.99, min_cosine=0.95, min_sqnr_db=20.0),
)}


def get_precision(name: str) -> Precision:
    """The :class:`Precision` called ``name``; a readable UserError for anything else."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise UserError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a torch runner computes ``name`` in (UserError where torch has none)."""
    p = get_precision(name)
    if p.dtype is None:
        raise UserError(f"{name} has no torch compute dtype: it runs as a quantized ONNX graph (onnxruntime, tensorrt)")
    return p.dtype
