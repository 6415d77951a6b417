"""Runners for each (backend, form, precision) of one source: the ONNX exports and engines a comparison or a benchmark needs.

Backends: ``torch`` (eager), ``torch-compile`` (``torch.compile``, inductor), ``onnxruntime``
(the form exported to ONNX, fp32 graph) and ``tensorrt`` (an engine built from that ONNX
file; CUDA only). What cannot run here raises :class:`Unavailable` with the reason, which
callers report instead of a number.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

from .base import Runner, TorchRunner
from .source import Source

BACKENDS = ("torch", "torch-compile", "onnxruntime", "tensorrt")


class Unavailable(Exception):
    """This backend/form/precision cannot run on this machine (the message says why)."""


class RunnerFactory:
    """Builds runners of one source; ONNX exports and engines are made once per form in ``workdir``."""

    def __init__(self, source: Source, device: str, workdir: Path, threads: int | None = None, max_batch: int = 64,
                 onnx: dict[str, Path] | None = None, ort_spin: bool = True):
        self.source, self.device, self.workdir, self.threads = source, device, Path(workdir), threads
        self.ort_spin = ort_spin  # see OrtRunner: off when forms are timed alternately
        self.max_batch = max_batch  # largest batch a TensorRT profile must accept
        # exports made beforehand (form -> file); missing files are exported on demand
        self._onnx: dict[str, Path] = {f: p for f, p in (onnx or {}).items() if p.is_file()}

    def forms(self, backend: str) -> list[str]:
        """Forms this backend can run for this source (a given .onnx file runs on ORT/TRT only)."""
        if self.source.onnx_path is not None:
            return [] if backend.startswith("torch") else [self._onnx_form()]
        return list(self.source.forms)

    def runner(self, backend: str, form: str, precision: str) -> Runner:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend in ("torch", "torch-compile"):
            model = copy.deepcopy(self.source.forms[form])  # TorchRunner casts/moves its model in place
            return TorchRunner(model, name=f"{backend}-{form}", device=self.device, precision=precision,
                               compile=backend == "torch-compile")
        if backend == "onnxruntime":
            return self._ort(form, precision)
        return self._trt(form, precision)

    def onnx(self, form: str) -> Path:
        """The ONNX file of ``form`` (the given file, or an fp32 export with a dynamic batch)."""
        if self.source.onnx_path is not None:
            return self.source.onnx_path
        if form not in self._onnx:
            from ..export.onnx import export_onnx

            path = self.workdir / f"{form}.onnx"
            with warnings.catch_warnings():  # exporter fallback notes: the graph is still checked
                warnings.simplefilter("ignore")
                export_onnx(self.source.forms[form], path)
            self._onnx[form] = path
        return self._onnx[form]

    def _onnx_form(self) -> str:
        from ..export.onnx import read_metadata

        return read_metadata(self.source.onnx_path).get("form", "deploy")

    def _ort(self, form: str, precision: str) -> Runner:
        from .ort_runner import OrtRunner, available_providers

        if precision != "fp32":
            raise Unavailable(f"ONNX Runtime runs the exported fp32 graph; {precision} is measured on torch/tensorrt")
        provider = "cpu" if self.device == "cpu" else "cuda"
        if provider not in available_providers():
            raise Unavailable(f"onnxruntime has no {provider} provider here (install onnxruntime-gpu)")
        return OrtRunner(self.onnx(form), provider=provider, threads=self.threads, name=f"onnxruntime-{form}",
                         spin=self.ort_spin)

    def _trt(self, form: str, precision: str) -> Runner:
        if not self.device.startswith("cuda"):
            raise Unavailable("TensorRT needs a CUDA device")
        from ..errors import UserError
        from ..export.tensorrt import build_engine, import_tensorrt
        from .trt_runner import TrtRunner

        try:
            import_tensorrt()
        except UserError as e:
            raise Unavailable(str(e).split(". ")[0]) from None
        engine = self.workdir / f"{form}.{precision}.engine"
        if not engine.exists():  # the profile covers every batch size asked for, optimized for the largest
            build_engine(self.onnx(form), engine, precision=precision, dynamic_batch=(1, self.max_batch, self.max_batch),
                         log=lambda msg: print(msg, file=sys.stderr))
        index = int(self.device.partition(":")[2] or 0)
        return TrtRunner(engine, device=index, name=f"tensorrt-{form}")
