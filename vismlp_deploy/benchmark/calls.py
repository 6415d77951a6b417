"""The timed call of a runner: prepared input, host clock or CUDA events, optional CUDA graph."""
from __future__ import annotations

import torch
from torch import Tensor

from ..runtime.base import Runner, TorchRunner
from .timing import Candidate, Clock, CudaEventClock


def candidate(runner: Runner, x: Tensor, cuda_graphs: bool = False) -> Candidate:
    """A zero-argument timed call of ``runner`` on ``x`` (prepared once, outside the clock).

    CUDA torch runners are timed with CUDA events; with ``cuda_graphs`` the forward is
    captured once into a ``torch.cuda.CUDAGraph`` and the timed call is its replay (no
    per-kernel launch cost). Other runners are timed on the host, closed by their
    ``synchronize``.
    """
    runner.activate()
    native = runner.prepare(x)
    on_cuda = isinstance(runner, TorchRunner) and runner.device.startswith("cuda")
    if on_cuda and cuda_graphs:
        return Candidate(_capture(runner, native), CudaEventClock())
    fn = lambda: runner.run_native(native)  # noqa: E731
    return Candidate(fn, CudaEventClock() if on_cuda else Clock(runner.synchronize))


def _capture(runner: TorchRunner, static_in: Tensor):
    """Capture one forward into a CUDA graph (warm-up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            runner.run_native(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner.run_native(static_in)
    return graph.replay
