"""TensorRT engine runner (TensorRT 10/11 tensor API, torch CUDA memory, no pycuda).

``set_input_shape`` -> ``set_tensor_address`` for the input and *every* output (torch
tensors' device pointers; ``execute_async_v3`` fails while any I/O tensor has no address) ->
``execute_async_v3`` on a non-default ``torch.cuda.Stream`` (TensorRT syncs extra work on
the legacy default stream, and a private stream keeps timings honest). The first output is
the logits the runner returns. Batches beyond the profile's MAX run in chunks; chunks below
MIN are padded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .base import Runner


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int8: torch.int8, trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool,
             trt.uint8: torch.uint8}
    if dt not in table:
        raise UserError(f"engine I/O type {dt} is not supported by the runner")
    return table[dt]


def bind_io(context, input_name: str, batch: Tensor, outputs: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """Set ``batch``'s shape and the address of every I/O tensor on a TensorRT execution context.

    batch: (N, C, H, W) on the engine's device, contiguous. outputs: name -> dtype of every
    engine output; their buffers are allocated on ``batch.device`` in the shapes the context
    reports once the input shape is set, and returned by name (in ``outputs``' order).
    """
    if not context.set_input_shape(input_name, tuple(batch.shape)):
        raise RuntimeError(f"TensorRT rejected input shape {tuple(batch.shape)} for {input_name!r}")
    buffers = {name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=batch.device)
               for name, dtype in outputs.items()}
    for name, tensor in [(input_name, batch), *buffers.items()]:
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT set_tensor_address({name!r}) failed")
    return buffers


class TrtRunner(Runner):
    """A serialized TensorRT engine (``.engine`` plan, with its ``.engine.json`` if present)."""

    def __init__(self, engine_path: str | os.PathLike, device: int = 0, name: str = "tensorrt"):
        from ..export.tensorrt import import_tensorrt, metadata_path

        trt = import_tensorrt()
        self.name, self.device = name, f"cuda:{device}"
        torch.cuda.set_device(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UserError(f"{engine_path}: TensorRT {trt.__version__} cannot deserialize this engine "
                            "(built by another TensorRT version or for another GPU?)")
        self.context = None  # made by activate(): the execution context holds the device memory
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise UserError(f"{engine_path}: expected one input and an output, found inputs {inputs}, "
                            f"outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.outputs = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in outputs}
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = lo[0], hi[0]
        meta_file = metadata_path(engine_path)
        self.metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        by_dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.in_dtype, "fp32")
        self.precision = self.metadata.get("precision", by_dtype)
        self.stream = torch.cuda.Stream(device=self.device)

    def _activate(self) -> None:
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError("TensorRT could not create an execution context (out of GPU memory?)")

    def _deactivate(self) -> None:
        self.context = None

    def prepare(self, batch: Tensor) -> Tensor:
        return batch.to(device=self.device, dtype=self.in_dtype).contiguous()

    def run_native(self, batch: Tensor) -> Tensor:
        """Enqueue one batch (on the device, MIN <= N <= MAX) on the runner's stream."""
        buffers = bind_io(self.context, self.input_name, batch, self.outputs)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input was written there
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        for tensor in (batch, *buffers.values()):  # the caching allocator must not reuse these early
            tensor.record_stream(self.stream)
        return buffers[self.output_name]

    def synchronize(self) -> None:
        self.stream.synchronize()

    def run(self, batch: Tensor) -> Tensor:
        self.activate()
        outs = []
        for chunk in batch.split(self.max_batch):
            n = chunk.shape[0]
            if n < self.min_batch:
                chunk = torch.cat([chunk, chunk.new_zeros(self.min_batch - n, *chunk.shape[1:])])
            y = self.run_native(self.prepare(chunk))
            self.synchronize()
            outs.append(y[:n].float().cpu())
        return torch.cat(outs)

    def describe(self) -> dict:
        return {**super().describe(), "profile_batch": [self.min_batch, self.max_batch],
                "tensorrt": self.metadata.get("tensorrt"), "gpu": self.metadata.get("gpu")}
