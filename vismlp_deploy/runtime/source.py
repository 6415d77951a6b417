"""What ``verify`` and ``bench`` take: a checkpoint, a deploy artifact, an ONNX file or a named config.

Resolved into the forms that can be built from it: a checkpoint or a named config gives
both the train form and its deploy form (``reparameterize``); a ``.deploy.pt`` artifact
gives the deploy form only; an ``.onnx`` file gives neither torch form, only the graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import UserError


@dataclass
class Source:
    """The models one input resolves to. ``input_size`` is (C, H, W)."""

    name: str
    input_size: tuple[int, int, int]
    train: nn.Module | None = None
    deploy: nn.Module | None = None
    onnx_path: Path | None = None  # a given ONNX file (exports of the torch forms are made on demand)

    @property
    def forms(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("train", self.train), ("deploy", self.deploy)) if m is not None}


def load_source(spec: str | Path, *, arch: str | None = None, config: dict | None = None, ema: bool = False,
                trust_pickle: bool = False, seed: int = 0, max_memory: int | None = None) -> Source:
    """Resolve ``spec``: an existing file (checkpoint / deploy .pt / .onnx) or a named config.

    A named config is built with ``randomize_(model, seed)`` weights (realistic statistics,
    so that the deploy form does real work and every fold is exercised).
    max_memory: bytes the model (weights + batch-1 activations) may need; None: half the available memory.
    Anything that cannot be read, built or run raises UserError (an .onnx file is checked before any session).
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".onnx":
            return _from_onnx(path, max_memory)
        return _from_file(path, arch, config, ema, trust_pickle, max_memory)
    if path.suffix or "/" in str(spec):
        raise UserError(f"{spec}: no such file")
    return from_named_config(str(spec), seed, max_memory)


def from_named_config(name: str, seed: int = 0, max_memory: int | None = None) -> Source:
    from ..models.init import randomize_
    from ..models.registry import create_model, get_format

    train = randomize_(create_model(name, max_memory=max_memory), seed=seed).eval()
    train.input_size = tuple(get_format(train.arch).input_size(train.config))
    return from_train(train, name)


def from_train(train: nn.Module, name: str) -> Source:
    """Train form (with ``input_size``) -> both forms."""
    from ..reparam import reparameterize

    deploy = reparameterize(train).eval()
    for attr in ("arch", "config", "input_size"):
        if hasattr(train, attr):
            setattr(deploy, attr, getattr(train, attr))
    return Source(name, tuple(train.input_size), train=train, deploy=deploy)


def _from_file(path: Path, arch, config, ema, trust_pickle, max_memory) -> Source:
    from ..checkpoint.io import read_checkpoint
    from ..checkpoint.load import load_checkpoint

    meta = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle).meta or {}
    if meta.get("form") == "deploy":
        from ..export.torch_artifact import load_deploy

        deploy = load_deploy(path, max_memory)
        return Source(path.name, tuple(deploy.input_size), deploy=deploy)
    train = load_checkpoint(path, arch=arch, config=config, ema=ema, trust_pickle=trust_pickle, max_memory=max_memory)
    return from_train(train, path.name)


def _from_onnx(path: Path, max_memory: int | None) -> Source:
    from .onnx_input import check_onnx_input

    return Source(path.name, check_onnx_input(path, max_memory), onnx_path=path)
