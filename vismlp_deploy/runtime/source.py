"""What ``verify`` and ``bench`` take: a checkpoint, a deploy artifact, an ONNX file or a named config.

Resolved into the forms that can be built from it: a checkpoint or a named config gives
both the train form and its deploy form (``reparameterize``); a ``.deploy.pt`` artifact
gives the deploy form only; an ``.onnx`` file gives neither torch form, only the graph.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError


@dataclass
class Source:
    """The models one input resolves to. ``input_size`` is (C, H, W).

    kind: "checkpoint", "named config", "deploy artifact" or "onnx". The deploy form of a
    train form is made on first access of ``deploy`` (``reparameterize``), so a caller can
    time it; ``info`` is the checkpoint's LoadInfo, ``meta`` an artifact's metadata.
    """

    name: str
    input_size: tuple[int, int, int]
    kind: str
    train: nn.Module | None = None
    onnx_path: Path | None = None  # a given ONNX file (exports of the torch forms are made on demand)
    info: Any = None
    meta: dict = field(default_factory=dict)
    _deploy: nn.Module | None = None

    @property
    def deploy(self) -> nn.Module | None:
        if self._deploy is None and self.train is not None:
            from ..reparam import reparameterize

            self._deploy = reparameterize(self.train).eval()
        return self._deploy

    @property
    def forms(self) -> dict[str, nn.Module]:
        return {k: m for k, m in (("train", self.train), ("deploy", self.deploy)) if m is not None}

    @property
    def onnx_form(self) -> str:
        """The form a given ONNX file was exported from (its metadata; deploy when unknown)."""
        return str(self.meta.get("form", "deploy"))


def load_source(spec: str | Path, *, arch: str | None = None, config: dict | None = None, ema: bool = False,
                trust_pickle: bool = False, seed: int = 0, input_size: int | tuple[int, int] | None = None,
                max_memory: int | None = None) -> Source:
    """Resolve ``spec``: an existing file (checkpoint / deploy .pt / .onnx) or a named config.

    A named config is built with ``randomize_(model, seed)`` weights (realistic statistics,
    so that the deploy form does real work and every fold is exercised); ``config`` then
    overrides its constructor arguments. ``input_size`` (H, W) runs the model at another
    size where the network allows it.
    max_memory: bytes the model (weights + batch-1 activations) may need; None: half the available memory.
    Anything that cannot be read, built or run raises UserError (an .onnx file is checked before any session).
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".onnx":
            source = _from_onnx(path, max_memory)
            if input_size is not None and _hw(input_size) != source.input_size[1:]:
                raise UserError(f"{path.name} was exported for {source.input_size[1]}x{source.input_size[2]} inputs; "
                                "export it again at the size you need")
            return source
        return _from_file(path, arch, config, ema, trust_pickle, input_size, max_memory)
    if path.exists():
        raise UserError(f"{spec}: not a file")
    if path.suffix or "/" in str(spec):
        raise UserError(f"{spec}: no such file")
    return from_named_config(str(spec), seed, input_size=input_size, overrides=config, max_memory=max_memory)


def as_source(model: nn.Module | str | Path | Source) -> Source:
    """A Source from a train-form module (with ``input_size``), a path / named config, or a Source."""
    if isinstance(model, Source):
        return model
    if isinstance(model, nn.Module):
        if len(tuple(getattr(model, "input_size", ()) or ())) != 3:
            raise UserError("the model needs an input_size attribute (C, H, W)")
        return from_train(model, getattr(model, "arch", None) or type(model).__name__)
    return load_source(model)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def from_named_config(name: str, seed: int = 0, *, input_size: int | tuple[int, int] | None = None,
                      overrides: dict | None = None, max_memory: int | None = None) -> Source:
    from ..models.init import randomize_
    from ..models.registry import create_model

    train = randomize_(create_model(name, input_size=input_size, max_memory=max_memory, **(overrides or {})),
                       seed=seed).eval()
    return from_train(train, name, kind="named config")


def from_train(train: nn.Module, name: str, kind: str = "checkpoint") -> Source:
    """Train form (with ``input_size``) -> a source of both forms."""
    return Source(name, tuple(train.input_size), kind, train=train, info=getattr(train, "checkpoint_info", None))


def _from_file(path: Path, arch, config, ema, trust_pickle, input_size, max_memory) -> Source:
    from ..checkpoint.io import read_checkpoint
    from ..checkpoint.load import load_checkpoint

    ckpt = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle)  # read once: load_checkpoint takes it as it is
    meta = ckpt.meta or {}
    if meta.get("form") == "deploy":
        from ..export.torch_artifact import load_deploy

        deploy = load_deploy(path, max_memory)
        if input_size is not None and _hw(input_size) != tuple(deploy.input_size[1:]):
            raise UserError(f"{path.name} is a deploy model for {deploy.input_size[1]}x{deploy.input_size[2]} inputs; "
                            "convert the checkpoint again at the size you need")
        return Source(path.name, tuple(deploy.input_size), "deploy artifact", meta=meta, _deploy=deploy)
    train = load_checkpoint(ckpt, arch=arch, config=config, input_size=input_size, max_memory=max_memory)
    return from_train(train, path.name)


def _from_onnx(path: Path, max_memory: int | None) -> Source:
    from ..export.onnx import read_metadata
    from .onnx_input import check_onnx_input

    return Source(path.name, check_onnx_input(path, max_memory), "onnx", onnx_path=path, meta=read_metadata(path))
