"""TensorRT engine runner (TensorRT 10/11 tensor API, torch CUDA memory, no pycuda).

``set_input_shape`` -> ``set_tensor_address`` (torch tensors' device pointers) ->
``execute_async_v3`` on a non-default ``torch.cuda.Stream`` (TensorRT syncs extra work on
the legacy default stream, and a private stream keeps timings honest). Batches beyond the
profile's MAX run in chunks; chunks below MIN are padded.
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
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if dt not in table:
        raise UserError(f"engine I/O type {dt} is not supported by the runner")
    return table[dt]


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
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise UserError(f"{engine_path}: expected one input and an output, found inputs {inputs}, outputs {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.in_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = lo[0], hi[0]
        meta_file = metadata_path(engine_path)
        self.metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.precision = self.metadata.get("precision", {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.in_dtype, "fp32"))
        self.stream = torch.cuda.Stream(device=self.device)

    def prepare(self, batch: Tensor) -> Tensor:
        return batch.to(device=self.device, dtype=self.in_dtype).contiguous()

    def run_native(self, batch: Tensor) -> Tensor:
        """Enqueue one batch (on the device, MIN <= N <= MAX) on the runner's stream."""
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype, device=self.device)
        self.context.set_tensor_address(self.input_name, batch.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input was written there
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        batch.record_stream(self.stream)  # the caching allocator must not reuse these early
        out.record_stream(self.stream)
        return out

    def synchronize(self) -> None:
        self.stream.synchronize()

    def run(self, batch: Tensor) -> Tensor:
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
