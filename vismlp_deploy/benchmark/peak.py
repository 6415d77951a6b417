"""The GEMM peak of this machine, measured in the same run as the models.

A large square GEMM is the best case for every dense kernel a deploy model runs (convs and
linears lower to GEMMs), so ``achieved GFLOP/s / GEMM peak`` says how far a form is from the
limit of this machine at this thread count and precision. Each backend brings its own GEMM
library (torch: oneDNN/MKL, ONNX Runtime: MLAS), so the peak is measured with ``torch.mm``
and, on CPU in fp32, with an ONNX Runtime ``MatMul`` too; the best of them is the limit.
INT8 (a Q/DQ graph on ONNX Runtime) is read against :func:`ort_int8_gemm_peak`.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..precision import torch_dtype


@dataclass
class GemmPeak:
    gflops: float  # best of the sizes and repeats
    size: int  # n of the n x n x n GEMM that reached it
    precision: str
    device: str
    threads: int
    kernel: str = "torch.mm"  # what reached it: "torch.mm", "onnxruntime MatMul", "onnxruntime MatMulInteger u8s8"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def gemm_peak(device: str = "cpu", precision: str = "fp32", sizes: tuple[int, ...] = (1024, 2048),
              repeats: int = 5) -> GemmPeak:
    """Best GFLOP/s of ``C = A @ B`` (2 n^3 FLOPs) over ``sizes`` × ``repeats`` after a warm-up call."""
    dtype = torch_dtype(precision)

    def make_call(n: int) -> Callable[[], None]:
        g = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def call() -> None:
            torch.mm(a, b, out=out)
            _sync(device)
        return call

    best, n = _best_rate(make_call, sizes, repeats)
    return GemmPeak(best, n, precision, device, torch.get_num_threads())


def ort_gemm_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, threads: int | None = None) -> GemmPeak:
    """:func:`gemm_peak` for ONNX Runtime's CPU ``MatMul`` (fp32; B a constant, as model weights are)."""
    import numpy as np

    def make_call(n: int) -> Callable[[], None]:
        rng = np.random.default_rng(n)
        return _ort_gemm_call("MatMul", rng.standard_normal((n, n), dtype=np.float32),
                              rng.standard_normal((n, n), dtype=np.float32), np.dtype(np.float32), threads)

    best, n = _best_rate(make_call, sizes, repeats)
    return GemmPeak(best, n, "fp32", "cpu", threads or 0, "onnxruntime MatMul")


def ort_int8_gemm_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5, threads: int | None = None) -> GemmPeak:
    """Best GOP/s (2 n^3 int8 ops per call) of ONNX Runtime's CPU ``MatMulInteger``, uint8 A x int8 constant B.

    u8 x s8 is the kernel a Q/DQ graph's int8 GEMMs run on x86: the CPU provider turns the signed
    int8 activations of a Q/DQ graph into uint8 and keeps int8 weights (s8 x s8 ``MatMulInteger``
    has no VNNI path: ~100 GOP/s here). The fused Q/DQ ``MatMul`` of a quantized model
    (``MatMulIntegerToFloat``, which also quantizes its float input and scales its int32 result)
    reached ~90 % of this on the machine of ``docs/precision.md``.
    """
    import numpy as np

    def make_call(n: int) -> Callable[[], None]:
        rng = np.random.default_rng(n)
        return _ort_gemm_call("MatMulInteger", rng.integers(0, 256, (n, n), dtype=np.uint8),
                              rng.integers(-127, 128, (n, n), dtype=np.int8), np.dtype(np.int32), threads)

    best, n = _best_rate(make_call, sizes, repeats)
    return GemmPeak(best, n, "int8", "cpu", threads or 0, "onnxruntime MatMulInteger u8s8")


def _ort_gemm_call(op: str, a, b, out_dtype, threads: int | None) -> Callable[[], None]:
    """One ONNX Runtime CPU session computing ``op(a, B)``, B = ``b`` a constant (as model weights are,
    so the kernel may pre-pack it); returns the call. a, b: numpy (n, n) arrays; out_dtype: numpy dtype."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnx.helper import np_dtype_to_tensor_dtype as onnx_type

    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info("a", onnx_type(a.dtype), list(a.shape))],
                              [helper.make_tensor_value_info("c", onnx_type(out_dtype), list(a.shape))],
                              [numpy_helper.from_array(b, "b")])
    # IR version 8 (opset 17): old enough for every onnxruntime this package supports
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def _best_rate(make_call: Callable[[int], Callable[[], None]], sizes: tuple[int, ...],
               repeats: int) -> tuple[float, int]:
    """Best GFLOP/s of an n x n x n GEMM call over sizes × repeats, each size warmed up once first
    (allocations, thread pool, cuBLAS handle, weight pre-packing). Returns (GFLOP/s, n)."""
    best, best_n = 0.0, sizes[0]
    for n in sizes:
        call = make_call(n)
        call()
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            rate = 2 * n**3 / (time.perf_counter() - t0) / 1e9
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
