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
                trust_pickle: bool = False, seed: int = 0) -> Source:
    """Resolve ``spec``: an existing file (checkpoint / deploy .pt / .onnx) or a named config.

    A named config is built with ``randomize_(model, seed)`` weights (realistic statistics,
    so that the deploy form does real work and every fold is exercised).
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".onnx":
            return _from_onnx(path)
        return _from_file(path, arch, config, ema, trust_pickle)
    if path.suffix or "/" in str(spec):
        raise UserError(f"{spec}: no such file")
    return from_named_config(str(spec), seed)


def from_named_config(name: str, seed: int = 0) -> Source:
    from ..models.init import randomize_
    from ..models.registry import create_model, get_format

    train = randomize_(create_model(name), seed=seed).eval()
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


def _from_file(path: Path, arch, config, ema, trust_pickle) -> Source:
    from ..checkpoint.io import read_checkpoint
    from ..checkpoint.load import load_checkpoint

    meta = read_checkpoint(path, ema=ema, trust_pickle=trust_pickle).meta or {}
    if meta.get("form") == "deploy":
        from ..export.torch_artifact import load_deploy

        deploy = load_deploy(path)
        return Source(path.name, tuple(deploy.input_size), deploy=deploy)
    train = load_checkpoint(path, arch=arch, config=config, ema=ema, trust_pickle=trust_pickle)
    return from_train(train, path.name)


def _from_onnx(path: Path) -> Source:
    from ..export.onnx import read_metadata

    size = read_metadata(path).get("input_size")
    if not size or len(size) != 3:
        import onnx

        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[1:]
        size = [d.dim_value for d in dims]
        if len(size) != 3 or not all(size):
            raise UserError(f"{path}: cannot tell the input size (no vismlp_deploy metadata, no static C, H, W)")
    return Source(path.name, tuple(int(s) for s in size), onnx_path=path)
