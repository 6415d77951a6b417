"""``verify``: run two or more runners of one model on the same inputs and compare each with the first.

Runners are named ``backend:form`` (``torch:train``, ``onnxruntime:deploy``, ``tensorrt:deploy``
…) with short names for the usual ones: ``train`` = torch:train, ``deploy`` = torch:deploy,
``onnxruntime`` / ``tensorrt`` = the deploy form on that backend. Inputs: seeded random
images, and real images (a folder or the default set). The first runner is the reference;
the reference always runs in fp32, candidates in the asked precision.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from .images import IMAGENET_MEAN, IMAGENET_STD, default_images, folder_images, preprocess
from .proof import proof_inputs
from ..runtime.factory import BACKENDS, RunnerFactory, Unavailable
from ..runtime.source import Source, from_train, load_source
from ..precision import get_precision
from .stats import Stats, compare

SHORT = {"train": ("torch", "train"), "deploy": ("torch", "deploy"), "onnxruntime": ("onnxruntime", "deploy"),
         "tensorrt": ("tensorrt", "deploy")}


def parse_runner(name: str) -> tuple[str, str]:
    """``train`` / ``onnxruntime`` / ``torch-compile:deploy`` -> (backend, form)."""
    if name in SHORT:
        return SHORT[name]
    backend, _, form = name.partition(":")
    if backend not in BACKENDS or form not in ("train", "deploy"):
        raise UserError(f"unknown runner {name!r}: use train, deploy, onnxruntime, tensorrt or BACKEND:FORM "
                        f"(backends {', '.join(BACKENDS)}; forms train, deploy)")
    return backend, form


@dataclass
class Comparison:
    candidate: str
    reference: str
    inputs: str  # "random" or "images"
    precision: str
    tolerance: float
    stats: Stats

    @property
    def passed(self) -> bool:
        return self.stats.passed(self.tolerance)

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "reference": self.reference, "inputs": self.inputs,
                "precision": self.precision, "tolerance": self.tolerance, "passed": self.passed,
                **self.stats.to_dict()}


@dataclass
class VerifyResult:
    model: str
    reference: str
    comparisons: list[Comparison] = field(default_factory=list)
    inputs: dict[str, str] = field(default_factory=dict)  # input set -> description

    @property
    def passed(self) -> bool:
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict:
        return {"model": self.model, "reference": self.reference, "inputs": self.inputs, "passed": self.passed,
                "comparisons": [c.to_dict() for c in self.comparisons]}


def input_sets(input_size: tuple[int, int, int], *, batch: int = 8, seed: int = 0, images: str | Path | None = "default",
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[dict[str, Tensor], dict[str, str]]:
    """{"random": N(0,1) batch, "images": real images} and a description of each."""
    sets = {"random": proof_inputs(input_size, batch, seed)}
    about = {"random": f"{batch} seeded N(0, 1) images (seed {seed})"}
    if images is not None:
        if str(images) == "default":
            imgs, where = default_images()
        else:
            imgs, where = folder_images(images), str(images)
        sets["images"] = preprocess(imgs, input_size, mean, std)
        about["images"] = f"{len(imgs)} real images from {where}, resized/centre-cropped/normalized"
    return sets, about


def verify(model: nn.Module | str | Path | Source, runners: tuple[str, ...] = ("train", "deploy", "onnxruntime"), *,
           precision: str = "fp32", tolerance: float | None = None, device: str = "cpu", batch: int = 8, seed: int = 0,
           images: str | Path | None = "default", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> VerifyResult:
    """Compare ``runners[1:]`` against ``runners[0]`` on random and real inputs.

    ``model``: a train-form module (with ``input_size``), a :class:`Source`, or a path/named
    config for :func:`load_source`. ``tolerance`` overrides the precision's default (``vismlp_deploy.precision``).
    """
    source = model if isinstance(model, Source) else (
        from_train(model, getattr(model, "arch", None) or type(model).__name__) if isinstance(model, nn.Module)
        else load_source(model))
    if len(runners) < 2:
        raise UserError("verify needs at least two runners to compare")
    tol = tolerance if tolerance is not None else get_precision(precision).tolerance
    sets, about = input_sets(source.input_size, batch=batch, seed=seed, images=images, mean=mean, std=std)
    result = VerifyResult(source.name, runners[0], inputs=about)
    with tempfile.TemporaryDirectory(prefix="vismlp-verify-") as workdir:
        factory = RunnerFactory(source, device, Path(workdir))
        built = {}
        for i, name in enumerate(runners):
            backend, form = parse_runner(name)
            if form not in factory.forms(backend):
                raise UserError(f"{name}: {source.name} has no {form} form on {backend} "
                                f"(available: {', '.join(factory.forms(backend)) or 'none'})")
            try:
                built[name] = factory.runner(backend, form, "fp32" if i == 0 else precision)
            except Unavailable as e:
                raise UserError(f"{name}: {e}") from None
        for set_name, x in sets.items():
            with torch.inference_mode():
                ref = built[runners[0]].run(x)
                for name in runners[1:]:
                    y = built[name].run(x)
                    result.comparisons.append(Comparison(name, runners[0], set_name, precision, tol, compare(y, ref)))
    return result
