"""The GEMM peak of this machine, measured in the same run as the models.

A large square ``torch.mm`` is the best case for every dense kernel a deploy model runs
(convs and linears lower to GEMMs), so ``achieved GFLOP/s / GEMM peak`` says how far a
form is from the limit of this machine at this thread count and precision.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..runtime.base import _DTYPES


@dataclass
class GemmPeak:
    gflops: float  # best of the sizes and repeats
    size: int  # n of the n x n x n GEMM that reached it
    precision: str
    device: str
    threads: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gemm_peak(device: str = "cpu", precision: str = "fp32", sizes: tuple[int, ...] = (1024, 2048),
              repeats: int = 5) -> GemmPeak:
    """Best GFLOP/s of ``C = A @ B`` (2 n^3 FLOPs) over ``sizes`` × ``repeats`` after a warm-up call."""
    dtype = _DTYPES[precision]
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: allocations, thread pool, cuBLAS handle
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            rate = 2 * n**3 / (time.perf_counter() - t0) / 1e9
            if rate > best:
                best, best_n = rate, n
    return GemmPeak(best, best_n, precision, device, torch.get_num_threads())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
