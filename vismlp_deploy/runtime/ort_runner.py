"""ONNX Runtime runner: CPU, and the CUDA / TensorRT execution providers when installed."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError, first_line
from ..export.onnx import is_quantized
from .base import Runner

# provider short name -> ONNX Runtime execution providers, in priority order (CPU last as the
# fallback for nodes a GPU provider does not take)
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_DTYPES = {"tensor(float)": ("fp32", np.float32), "tensor(float16)": ("fp16", np.float16),
               "tensor(double)": ("fp64", np.float64)}


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers (``cpu`` always)."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [k for k, v in PROVIDERS.items() if v[0] in have]


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exception types (Fail, InvalidArgument, InvalidGraph, …; they derive from Exception)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


class OrtRunner(Runner):
    """An ``.onnx`` file in an ``onnxruntime.InferenceSession``.

    provider: ``cpu``, ``cuda`` or ``tensorrt`` (see :func:`available_providers`).
    spin: let idle intra-op threads spin-wait for the next call (ONNX Runtime's default; lowest
    latency for one session alone). Turn it off when sessions alternate on few cores: a
    spinning session steals a core from the one that runs next.
    A static-batch model runs larger batches in chunks of its batch (last chunk padded).
    ``precision`` is the graph's: its input dtype, or ``int8`` for a Q/DQ graph (float I/O).
    The int8 kernels need no session setting: the CPU provider turns the signed int8
    activations of a Q/DQ graph into uint8 (u8s8, MLAS's fast VNNI path). Setting
    ``session.qdqisint8allowed`` would keep them s8s8, which ran about 10x slower here.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 name: str | None = None, spin: bool = True):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise UserError(f"unknown ONNX Runtime provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        if provider not in available_providers():
            raise UserError(f"ONNX Runtime provider {provider!r} is not available in this onnxruntime build "
                            f"(available: {', '.join(available_providers())}); "
                            "for GPU providers install onnxruntime-gpu")
        self._path, self._providers = str(path), PROVIDERS[provider]
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            self._options.intra_op_num_threads = threads
        if not spin:
            self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._activate()  # the session tells the I/O names and types; deactivate() frees it, activate() reloads it
        (inp,), (out, *_) = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = inp.name, out.name
        self.precision, self._np_dtype = _ORT_DTYPES.get(inp.type, ("fp32", np.float32))
        if is_quantized(path):  # float I/O, int8 inside
            self.precision = "int8"
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.provider = provider
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.name = name or f"onnxruntime-{provider}"
        self.is_active = True

    def _activate(self) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(self._path, self._options, providers=self._providers)
        except _ort_errors() as e:  # a model onnxruntime cannot load (an op it lacks, a bad graph)
            raise UserError(f"{self._path}: ONNX Runtime cannot load it ({first_line(e)})") from None

    def _deactivate(self) -> None:
        self.session = None

    def prepare(self, batch: Tensor) -> np.ndarray:
        return batch.detach().cpu().numpy().astype(self._np_dtype, copy=False)

    def run_native(self, batch: np.ndarray) -> np.ndarray:
        b = self.static_batch
        if b is None or batch.shape[0] == b:
            return self._run(batch)
        outs = []
        for i in range(0, batch.shape[0], b):
            chunk = batch[i:i + b]
            n = chunk.shape[0]
            if n < b:  # pad the last chunk to the static batch, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([self.output_name], {self.input_name: batch})[0]
        except _ort_errors() as e:  # the model cannot run this input
            raise UserError(f"ONNX Runtime cannot run {self.name} on a {'x'.join(map(str, batch.shape))} input "
                            f"({first_line(e)})") from None

    def run(self, batch: Tensor) -> Tensor:
        self.activate()
        return torch.from_numpy(np.asarray(self.run_native(self.prepare(batch)), dtype=np.float32))

    def describe(self) -> dict:
        return {**super().describe(), "provider": self.provider, "static_batch": self.static_batch,
                "providers": self.session.get_providers() if self.session is not None else self._providers}
