"""The runners of one model: torch copies, ONNX exports, quantized graphs and engines, each made once.

A :class:`RunnerFactory` belongs to one :class:`~vismlp_deploy.runtime.source.Source` and one
device. Backends (:mod:`.backends`) ask it for what they run: a private copy of a torch form,
the ONNX file of a form (the given file, an export made beforehand, or an fp32 export with a
dynamic batch made on demand in ``workdir``), its int8 Q/DQ graph, or a TensorRT engine.
What cannot run here raises :class:`Unavailable` with the reason, which callers report
instead of a number.
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import UserError
from .backends import get_backend
from .base import Runner
from .source import Source


class Unavailable(Exception):
    """This backend/form/precision cannot run on this machine (the message says why)."""


class RunnerFactory:
    """Builds runners of one source on one device; artifacts are made once per form in ``workdir``.

    threads: CPU threads of ONNX Runtime sessions. max_batch: the largest batch a TensorRT
    profile must accept. onnx: exports made beforehand (form -> file). ort_spin: see OrtRunner
    (off when forms are timed alternately). calibration: (N, C, H, W) inputs for int8 graphs
    (default: seeded N(0, 1) images: right for speed, not for accuracy).
    """

    def __init__(self, source: Source, device: str, workdir: Path, threads: int | None = None, max_batch: int = 64,
                 onnx: dict[str, Path] | None = None, ort_spin: bool = True, calibration: np.ndarray | None = None):
        self.source, self.device, self.workdir, self.threads = source, device, Path(workdir), threads
        self.ort_spin, self.max_batch, self.calibration = ort_spin, max_batch, calibration
        self._onnx: dict[str, Path] = {f: p for f, p in (onnx or {}).items() if p.is_file()}
        self._made: dict[tuple, Path] = {}

    def forms(self, backend: str) -> list[str]:
        """Forms ``backend`` can run for this source (a given .onnx file runs on ONNX backends only)."""
        if self.source.onnx_path is not None:
            return [self.source.onnx_form] if get_backend(backend).runs_onnx else []
        return list(self.source.forms)

    def runner(self, backend: str, form: str, precision: str) -> Runner:
        """An inactive runner of ``form`` on ``backend`` in ``precision``; Unavailable if it cannot run here."""
        b = get_backend(backend)
        why = b.why_not(self.device, precision)
        if why is not None:
            raise Unavailable(why)
        if backend in ("onnxruntime", "tensorrt") and self.source.onnx_path is not None and precision != "int8":
            from ..export.onnx import is_quantized

            if is_quantized(self.source.onnx_path):
                raise Unavailable(f"{self.source.name} is an int8 (Q/DQ) graph: judge or time it with --precision int8")
        if form not in self.forms(backend):
            raise Unavailable(f"{self.source.name} has no {form} form on {backend} "
                              f"(available: {', '.join(self.forms(backend)) or 'none'})")
        return b.make(self, form, precision)

    # ------------------------------------------------------------------ what backends ask for
    def module(self, form: str) -> nn.Module:
        """A private copy of a torch form (runners cast and move their model in place)."""
        return copy.deepcopy(self.source.forms[form])

    def onnx(self, form: str) -> Path:
        """The fp32 ONNX file of ``form`` (the given file, or an export with a dynamic batch)."""
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

    def quantized_onnx(self, form: str) -> Path:
        """The int8 Q/DQ graph of ``form``: a given Q/DQ file as it is, else the fp32 export quantized
        with ``calibration`` (no accuracy guard: ``verify`` measures the agreement itself)."""
        from ..export.onnx import is_quantized
        from ..export.quantize import quantize_onnx

        src = self.onnx(form)
        if is_quantized(src):
            return src
        if self.source.onnx_path is not None:
            raise Unavailable(f"{src.name} is an fp32 graph: quantize it with `vismlp-deploy convert ... "
                              "--precision int8 --calib PATH`")
        key = ("int8", form)
        if key not in self._made:
            calib = self.calibration
            if calib is None:
                from ..verification.inputs import random_images

                calib = random_images(self.source.input_size, 32, seed=1).numpy()
            out = self.workdir / f"{form}.int8.onnx"
            quantize_onnx(src, out, calib, min_agreement=0.0)
            self._made[key] = out
        return self._made[key]

    def engine(self, form: str, precision: str) -> Path:
        """A TensorRT engine of ``form`` whose profile covers every batch up to ``max_batch``."""
        key = ("engine", form, precision)
        if key not in self._made:
            from ..export.tensorrt import build_engine

            src = self.quantized_onnx(form) if precision == "int8" else self.onnx(form)
            engine = self.workdir / f"{form}.{precision}.engine"
            try:
                build_engine(src, engine, precision=precision, dynamic_batch=(1, self.max_batch, self.max_batch),
                             log=lambda msg: print(msg, file=sys.stderr))
            except UserError as e:
                raise Unavailable(str(e)) from None
            self._made[key] = engine
        return self._made[key]
