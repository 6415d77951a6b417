"""One interface for every backend (Polygraphy's idea: runners apart from the comparator that judges them)."""
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

    Lifecycle (Polygraphy's): ``activate()`` acquires what running needs (a session, an
    engine, device memory), ``deactivate()`` frees it; ``with runner:`` does both. ``run``
    activates an inactive runner first, so a plain call also works.
    """

    name: str = "runner"  # e.g. "torch-deploy", "onnxruntime-deploy", "tensorrt-deploy"
    input_name: str = "input"
    output_name: str = "logits"
    device: str = "cpu"
    precision: str = "fp32"
    is_active: bool = False

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _activate(self) -> None:
        """Acquire the backend's resources (override; default: nothing to acquire)."""

    def _deactivate(self) -> None:
        """Release what ``_activate`` acquired (override)."""

    @abstractmethod
    def run_native(self, batch):
        """Run on input already on the backend's device/dtype (what is timed); needs an active runner."""

    def prepare(self, batch: Tensor):
        """Convert a CPU float32 batch into what ``run_native`` takes (done outside timed loops)."""
        return batch

    def run(self, batch: Tensor) -> Tensor:
        """float32 CPU (N, C, H, W) -> float32 CPU outputs."""
        self.activate()
        out = self.run_native(self.prepare(batch))
        self.synchronize()
        return torch.as_tensor(out).float().cpu()

    def synchronize(self) -> None:
        """Block until queued work is done (CUDA); a no-op on CPU backends."""

    def describe(self) -> dict:
        return {"name": self.name, "device": self.device, "precision": self.precision,
                "input": self.input_name, "output": self.output_name}


class TorchRunner(Runner):
    """A PyTorch module (train or deploy form) in eval mode, eager or ``torch.compile``d.

    The module is cast to the precision's dtype and moved to ``device`` in place (pass a copy).
    ``tf32`` keeps float32 weights and lets CUDA matmuls/convs use TF32 while this runner runs.
    """

    def __init__(self, model: torch.nn.Module, name: str = "torch", device: str = "cpu",
                 precision: str = "fp32", compile: bool = False):
        self.name, self.device, self.precision = name, device, precision
        self.dtype = torch_dtype(precision)
        self.model = model.eval().to(device=device, dtype=self.dtype)
        self._compile = compile
        self._fn = None

    def _activate(self) -> None:
        self._fn = torch.compile(self.model) if self._compile else self.model

    def _deactivate(self) -> None:
        self._fn = None

    def prepare(self, batch: Tensor) -> Tensor:
        return batch.to(device=self.device, dtype=self.dtype)

    def run_native(self, batch: Tensor) -> Tensor:
        tf32 = self.precision == "tf32"
        with torch.inference_mode(), _tf32(tf32):
            return self._fn(batch)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class _tf32:
    """TF32 matmuls/convolutions on (or off) for the duration of a call, restored afterwards."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.on

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
