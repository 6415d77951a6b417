"""Registries of checkpoint formats and named configs (timm-style).

A *format* is one key layout of one family (``official-repmlpnet``, ``timm-resmlp`` …):
it knows how to build the train-time model from the upstream constructor arguments,
how to map the format's keys onto that model's ``state_dict``, and how to recognise and
size itself from keys and shapes. A *named config* (``resmlp_12``) is a format plus
constructor arguments, what ``create_model`` and ``zoo`` list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import Tensor, nn

from ..errors import UserError
from .footprint import check_footprint

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class CheckpointFormat:
    """One key layout of one family.

    name: ``<source>-<family>``, the ``arch`` users pass (e.g. ``timm-resmlp``).
    family: the architecture family (``resmlp``).
    build: upstream constructor arguments -> train-time model (eval mode not required).
    to_model_keys: this format's state_dict -> the built model's state_dict keys/shapes.
    matches: does a state_dict look like this format? (cheap key test, used first)
    infer_config: state_dict -> constructor arguments (raises CheckpointError if it cannot).
    input_size: constructor arguments -> (C, H, W) the model expects.
    description: one line for ``zoo``.
    assumptions: optional; constructor arguments -> {argument: why} for the arguments the
        weights cannot determine (an activation, a default), so that detection can say so
        and lower its confidence. None: every argument of ``infer_config`` is read from shapes.
    """

    name: str
    family: str
    build: Callable[[dict], nn.Module]
    to_model_keys: Callable[[StateDict], dict[str, Tensor]]
    matches: Callable[[StateDict], bool]
    infer_config: Callable[[StateDict], dict]
    input_size: Callable[[dict], tuple[int, int, int]]
    description: str = ""
    assumptions: Callable[[dict], dict[str, str]] | None = None


@dataclass(frozen=True)
class NamedConfig:
    name: str
    format: str
    config: dict = field(default_factory=dict)
    description: str = ""


FORMATS: dict[str, CheckpointFormat] = {}
CONFIGS: dict[str, NamedConfig] = {}


def register_format(fmt: CheckpointFormat) -> CheckpointFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"format {fmt.name} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def register_config(name: str, format: str, description: str = "", **config) -> NamedConfig:
    if name in CONFIGS:
        raise ValueError(f"config {name} registered twice")
    CONFIGS[name] = NamedConfig(name, format, config, description)
    return CONFIGS[name]


def get_format(name: str) -> CheckpointFormat:
    _ensure_loaded()
    try:
        return FORMATS[name]
    except KeyError:
        raise UserError(f"unknown architecture/format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


def get_config(name: str) -> NamedConfig:
    _ensure_loaded()
    try:
        return CONFIGS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; `vismlp-deploy zoo` lists the named configs") from None


def create_model(name: str, *, max_memory: int | None = None, **overrides) -> nn.Module:
    """A named config of the zoo, train-time form, eval mode, freshly initialised.

    ``overrides`` replace constructor arguments, e.g. ``create_model("resmlp_12", num_classes=10)``.
    A config the family rejects, or whose weights plus a batch-1 forward exceed ``max_memory`` bytes
    (None: half the available memory), raises UserError before anything is allocated.
    """
    nc = get_config(name)
    fmt = get_format(nc.format)
    cfg = {**nc.config, **overrides}
    check_footprint(fmt, cfg, max_bytes=max_memory)
    model = fmt.build(cfg)
    model.arch, model.config = fmt.name, cfg
    model.input_size = tuple(fmt.input_size(cfg))
    return model.eval()


def _ensure_loaded() -> None:
    from .. import models  # noqa: F401  (imports every family module, which registers itself)
