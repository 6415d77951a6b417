"""One interface for every backend (Polygraphy's idea: runners apart from the comparator)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..precision import torch_dtype


class Runner(ABC):
    """Runs one model artifact on one backend.

    ``run(batch)`` takes a float32 CPU tensor (N, C, H, W) and returns float32 CPU logits
    (N, classes); input casting/transfer to the backend's device and precision is the
    runner's job, so every runner can be compared with every other one.
    """

    name: str = "runner"  # e.g. "torch-deploy", "onnxruntime-cpu", "tensorrt"
    input_name: str = "input"
    output_name: str = "logits"
    device: str = "cpu"
    precision: str = "fp32"

    @abstractmethod
    def run(self, batch: Tensor) -> Tensor: ...

    def run_native(self, batch):
        """Run on input already on the backend's device/dtype (for timing); default: ``run``."""
        return self.run(batch)

    def prepare(self, batch: Tensor):
        """Convert a CPU float32 batch into what ``run_native`` takes (done outside timed loops)."""
        return batch

    def synchronize(self) -> None:
        """Block until queued work is done (CUDA); a no-op on CPU backends."""

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "precision": self.precision,
                "input": self.input_name, "output": self.output_name}


class TorchRunner(Runner):
    """A PyTorch module (train or deploy form) in eval mode, eager or ``torch.compile``d."""

    def __init__(self, model: torch.nn.Module, name: str = "torch", device: str = "cpu",
                 precision: str = "fp32", compile: bool = False):
        self.name, self.device, self.precision = name, device, precision
        self.dtype = torch_dtype(precision)
        self.model = model.eval().to(device=device, dtype=self.dtype)
        self._fn = torch.compile(self.model) if compile else self.model

    def prepare(self, batch: Tensor) -> Tensor:
        return batch.to(device=self.device, dtype=self.dtype)

    def run_native(self, batch: Tensor) -> Tensor:
        with torch.inference_mode():
            return self._fn(batch)

    def run(self, batch: Tensor) -> Tensor:
        return self.run_native(self.prepare(batch)).float().cpu()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
