"""``verify``: run runners of one model on the same inputs and judge each against a reference.

Runners are named ``backend:form`` (``torch:train``, ``onnxruntime:deploy``, ``tensorrt:deploy``
…) with short names for the usual ones: ``train`` / ``deploy`` = that torch form, a bare
backend name = the deploy form on that backend. The first runner is the reference and runs
in fp32; candidates run in the asked precision. With ``against`` (a checkpoint), the
reference is that checkpoint's train form and every runner is a candidate on ``model``
(an ONNX file, a deploy artifact): Polygraphy's ``run x.onnx --onnxrt --trt`` habit.

The comparator is :func:`judge`: one :class:`Comparison` per (candidate, input set), with the
precision's targets (``vismlp_deploy.precision``): the relative error always; for low
precisions also cosine and SQNR, and top-1 agreement on real images (random-weight models
have near-tied logits on random inputs, where top-1 means nothing). ``atol``/``rtol`` add
Polygraphy's element-wise test: an element fails only if it exceeds both.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from ..errors import UserError
from ..precision import get_precision
from ..runtime.backends import BACKENDS, default_backends, get_backend
from ..runtime.factory import RunnerFactory, Unavailable
from ..runtime.source import Source, as_source
from .images import IMAGENET_MEAN, IMAGENET_STD
from .inputs import input_sets
from .stats import Stats, compare

FORMS = ("train", "deploy")
SHORT = {"train": ("torch", "train"), "deploy": ("torch", "deploy")}


def parse_runner(name: str) -> tuple[str, str]:
    """``train`` / ``onnxruntime`` / ``torch-compile:deploy`` -> (backend, form)."""
    if name in SHORT:
        return SHORT[name]
    backend, sep, form = name.partition(":")
    if backend in BACKENDS and not sep:
        return backend, "deploy"
    if backend not in BACKENDS or form not in FORMS:
        raise UserError(f"unknown runner {name!r}: use train, deploy, a backend name or BACKEND:FORM "
                        f"(backends {', '.join(BACKENDS)}; forms {', '.join(FORMS)})")
    return backend, form


@dataclass
class Comparison:
    """One candidate against the reference on one input set, with the targets it was judged by."""

    candidate: str
    reference: str
    inputs: str  # "random", "images", a loaded set's name, "held-out images" …
    precision: str
    stats: Stats
    tolerance: float  # on stats.rel
    min_top1: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    atol: float | None = None
    rtol: float | None = None
    elementwise_failures: int | None = None  # elements exceeding both atol and rtol

    @property
    def failures(self) -> list[str]:
        """Each target missed, in words (empty: passed)."""
        s, out = self.stats, []
        if not s.rel <= self.tolerance:
            out.append(f"rel err {s.rel:.2e} > {self.tolerance:.0e}")
        if self.elementwise_failures:
            out.append(f"{self.elementwise_failures} elements exceed both atol {self.atol:g} and rtol {self.rtol:g}")
        if self.min_cosine is not None and not s.cosine >= self.min_cosine:
            out.append(f"cosine {s.cosine:.6f} < {self.min_cosine}")
        if self.min_sqnr_db is not None and not s.sqnr_db >= self.min_sqnr_db:
            out.append(f"SQNR {s.sqnr_db:.1f} dB < {self.min_sqnr_db:g} dB")
        if self.min_top1 is not None and not s.top1 >= self.min_top1:
            out.append(f"top-1 agreement {s.top1:.2%} < {self.min_top1:.0%}")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "reference": self.reference, "inputs": self.inputs,
                "precision": self.precision, "tolerance": self.tolerance, "min_top1": self.min_top1,
                "min_cosine": self.min_cosine, "min_sqnr_db": self.min_sqnr_db, "atol": self.atol, "rtol": self.rtol,
                "elementwise_failures": self.elementwise_failures, "passed": self.passed, "failures": self.failures,
                **self.stats.to_dict()}


def judge(candidate: str, y: Tensor, ref: Tensor, precision: str = "fp32", *, reference: str = "reference",
          inputs: str = "random", tolerance: float | None = None, atol: float | None = None,
          rtol: float | None = None, min_top1: float | None = None) -> Comparison:
    """Compare ``y`` with ``ref`` (same shape) and attach the targets of ``precision``.

    ``tolerance`` overrides the precision's relative-error target and ``min_top1`` its top-1
    agreement target (e.g. ``convert --min-agreement``). Top-1 agreement is judged only on
    real inputs (``inputs != "random"``).
    """
    p = get_precision(precision)
    stats = compare(y, ref)
    elem = None
    if atol is not None or rtol is not None:
        atol, rtol = atol or 0.0, rtol or 0.0
        diff = (y.double() - ref.double()).abs()
        elem = int(((diff > atol) & (diff > rtol * ref.double().abs())).sum())
    low = not p.exact
    return Comparison(candidate, reference, inputs, precision, stats, p.tolerance if tolerance is None else tolerance,
                      min_top1=(p.min_top1 if min_top1 is None else min_top1) if low and inputs != "random" else None,
                      min_cosine=p.min_cosine if low else None, min_sqnr_db=p.min_sqnr_db if low else None,
                      atol=atol, rtol=rtol, elementwise_failures=elem)


@dataclass
class VerifyResult:
    model: str
    reference: str
    comparisons: list[Comparison] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # input set -> description
    outputs: dict[str, Tensor] = field(default_factory=dict)  # "<runner>/<set>" -> outputs (keep_outputs)
    input_arrays: dict[str, Tensor] = field(default_factory=dict)  # set -> the inputs it ran on

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference, "inputs": self.inputs, "passed": self.passed,
                "comparisons": [c.to_dict() for c in self.comparisons]}


def default_runners(source: Source, device: str, precision: str) -> list[str]:
    """Candidates verify runs when none are named: the deploy form on every default backend that runs
    ``precision`` here (for an ONNX file: the ONNX backends only)."""
    names = []
    for name in default_backends(device):
        b = get_backend(name)
        if precision not in b.precisions or (source.onnx_path is not None and not b.runs_onnx):
            continue
        names.append("deploy" if name == "torch" else name)
    return names


def verify(model: nn.Module | str | os.PathLike | Source, runners: tuple[str, ...] | None = None, *,
           against: nn.Module | str | os.PathLike | Source | None = None, precision: str = "fp32",
           tolerance: float | None = None, atol: float | None = None, rtol: float | None = None, device: str = "cpu",
           batch: int = 8, seed: int = 0, images: str | Path | None = "default", mean=IMAGENET_MEAN, std=IMAGENET_STD,
           load_inputs: str | os.PathLike | None = None, calibration: np.ndarray | None = None,
           keep_outputs: bool = False) -> VerifyResult:
    """Judge runners of ``model`` against a reference on random and real inputs.

    model: a train-form module (with ``input_size``), a :class:`Source`, or a path / named
        config for :func:`~vismlp_deploy.runtime.source.load_source`.
    runners: names (see the module docstring); default: ``train`` as the reference, then the
        deploy form on each available default backend (:func:`default_runners`).
    against: a checkpoint (or Source) whose train form is the reference; every runner is then a
        candidate on ``model``.
    precision: of the candidates (``vismlp_deploy.precision``); the reference runs in fp32.
    tolerance / atol / rtol: see :func:`judge`. calibration: (N, C, H, W) inputs for an int8
        graph quantized on the fly. load_inputs: an ``.npz`` of input sets to run instead.
    keep_outputs: keep every runner's outputs in ``result.outputs`` (to save them).
    """
    source = as_source(model)
    ref_source = as_source(against) if against is not None else source
    get_precision(precision)
    if runners is None:
        candidates = default_runners(source, device, precision)
        if against is None:
            if source.train is None and source.deploy is None:
                raise UserError(f"{source.name} is an ONNX file: there is nothing to compare it with; "
                                "pass --against CHECKPOINT, or name two runners (--runners onnxruntime,tensorrt)")
            ref = "train" if source.train is not None else "deploy"
            runners = (ref, *[c for c in candidates if c != ref])
        else:
            runners = tuple(candidates)
    if against is not None:
        if ref_source.train is None and ref_source.deploy is None:
            raise UserError("--against needs a checkpoint, a deploy artifact or a named config (a torch form)")
        plan = [("train" if ref_source.train is not None else "deploy", ref_source)] + [(r, source) for r in runners]
    else:
        plan = [(r, source) for r in runners]
    if len(plan) < 2:
        raise UserError("verify needs a reference and at least one candidate runner")
    sets, about = input_sets(source.input_size, batch=batch, seed=seed, images=images, mean=mean, std=std,
                             load=load_inputs)
    if against is not None and tuple(ref_source.input_size) != tuple(source.input_size):
        raise UserError(f"{source.name} takes {source.input_size} inputs, {ref_source.name} {ref_source.input_size}")
    reference = f"{plan[0][0]} ({ref_source.name})" if against is not None else plan[0][0]
    result = VerifyResult(source.name, reference, inputs=about, input_arrays=sets)
    labels = [reference] + [name for name, _ in plan[1:]]
    with tempfile.TemporaryDirectory(prefix="vismlp-verify-") as workdir, ExitStack() as active:
        factories = {key: RunnerFactory(src, device, Path(tempfile.mkdtemp(dir=workdir)), calibration=calibration)
                     for key, src in {id(src): src for _, src in plan}.items()}
        built = []
        for i, (name, src) in enumerate(plan):
            backend, form = parse_runner(name)
            try:
                built.append(active.enter_context(
                    factories[id(src)].runner(backend, form, "fp32" if i == 0 else precision)))
            except Unavailable as e:
                raise UserError(f"runner {name}: {e}") from None
        for set_name, x in sets.items():
            outs = [runner.run(x) for runner in built]
            if keep_outputs:
                result.outputs.update({f"{name}/{set_name}": y for name, y in zip(labels, outs)})
            for name, y in zip(labels[1:], outs[1:]):
                result.comparisons.append(judge(name, y, outs[0], precision, reference=reference, inputs=set_name,
                                                tolerance=tolerance, atol=atol, rtol=rtol))
    return result

