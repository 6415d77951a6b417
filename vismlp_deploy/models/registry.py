"""Registries of checkpoint formats and named configs (timm-style).

A *format* is one key layout of one family (``official-repmlpnet``, ``timm-resmlp`` …):
it knows how to build the train-time model from the upstream constructor arguments,
how to map the format's keys onto that model's ``state_dict``, and how to recognise and
size itself from keys and shapes. A *named config* (``resmlp_12``) is a format plus
constructor arguments, what ``create_model`` and ``zoo`` list.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..errors import UserError
from .footprint import check_footprint

StateDict = Mapping[str, Tensor]


@dataclass(frozen=True)
class CheckpointFormat:
    """One key layout of one family (see :func:`register_format` for the fields)."""

    name: str
    family: str
    build: Callable[[dict], nn.Module]
    to_model_keys: Callable[[StateDict], dict[str, Tensor]]
    matches: Callable[[StateDict], bool]
    infer_config: Callable[[StateDict], dict]
    input_size: Callable[[dict], tuple[int, int, int]]
    description: str = ""
    assumptions: Callable[[dict], dict[str, str]] | None = None
    resize: Callable[[dict, tuple[int, int]], dict] | None = None


@dataclass(frozen=True)
class NamedConfig:
    name: str
    format: str
    config: dict = field(default_factory=dict)
    description: str = ""


FORMATS: dict[str, CheckpointFormat] = {}
CONFIGS: dict[str, NamedConfig] = {}


def register_format(
    name: str,
    *,
    family: str,
    build: Callable[[dict], nn.Module],
    matches: Callable[[StateDict], bool],
    infer_config: Callable[[StateDict], dict],
    input_size: Callable[[dict], tuple[int, int, int]],
    description: str,
    to_model_keys: Callable[[StateDict], dict[str, Tensor]] = dict,
    assumptions: Callable[[dict], dict[str, str]] | None = None,
    resize: Callable[[dict, tuple[int, int]], dict] | None = None,
) -> CheckpointFormat:
    """Register one key layout of one family.

    name: ``<source>-<family>``, the ``arch`` users pass (e.g. ``timm-resmlp``).
    build: upstream constructor arguments -> train-time model (eval mode not required).
    matches: does a state_dict look like this format? (cheap key test, tried first; see :func:`has_keys`)
    infer_config: state_dict -> constructor arguments (raises CheckpointError if it cannot).
    input_size: constructor arguments -> (C, H, W) the model expects by default.
    to_model_keys: this format's state_dict -> the built model's keys/shapes (default: the same keys).
    assumptions: constructor arguments -> {argument: why} for the arguments the weights cannot
        determine (an activation, a default), so that detection can say so and lower its confidence.
    resize: (config, (H, W)) -> the config of the same network at another input size, raising
        ValueError with the reason where that size does not fit. None: the weights fix the size
        (token-mixing or partition weights are sized for it).
    """
    if name in FORMATS:
        raise ValueError(f"format {name} registered twice")
    FORMATS[name] = CheckpointFormat(name, family, build, to_model_keys, matches, infer_config, input_size,
                                     description, assumptions, resize)
    return FORMATS[name]


def has_keys(*keys: str) -> Callable[[StateDict], bool]:
    """A ``matches`` test: every one of ``keys`` is in the state_dict."""
    return lambda sd: all(k in sd for k in keys)


def register_config(name: str, format: str, description: str = "", **config) -> NamedConfig:
    if name in CONFIGS:
        raise ValueError(f"config {name} registered twice")
    CONFIGS[name] = NamedConfig(name, format, config, description)
    return CONFIGS[name]


def at_input_size(fmt: CheckpointFormat, config: dict,
                  size: int | tuple[int, int] | None) -> tuple[dict, tuple[int, int, int]]:
    """(config, (C, H, W)) of ``fmt``'s network at input ``size`` (H, W); channels stay the config's.

    ``size`` None keeps the config's own size. A size the network cannot take is a UserError
    saying why (the format's ``resize`` reason, or that its weights fix the size).
    """
    c, h, w = fmt.input_size(config)
    if min(c, h, w) < 1:
        raise UserError(f"{fmt.name}: the config gives input size {c}x{h}x{w}; every dimension must be >= 1")
    if size is None:
        return config, (c, h, w)
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise UserError(f"input size {size[0]}x{size[1]}: both sides must be >= 1")
    if size == (h, w):
        return config, (c, h, w)
    if fmt.resize is None:
        raise UserError(f"{fmt.name} takes {h}x{w} inputs only: its weights fix the input size "
                        f"(asked for {size[0]}x{size[1]})")
    try:
        config = fmt.resize(dict(config), size)
    except ValueError as e:
        raise UserError(f"{fmt.name} cannot run at {size[0]}x{size[1]}: {e}") from None
    return config, (c, *size)


def get_format(name: str) -> CheckpointFormat:
    return _lookup(formats(), name, f"unknown architecture/format {name!r}; known: {', '.join(sorted(FORMATS))}")


def get_config(name: str) -> NamedConfig:
    return _lookup(configs(), name, f"unknown model {name!r}; `vismlp-deploy zoo` lists the named configs")


def _lookup(registry: dict, name: str, unknown: str):
    if name not in registry:
        raise UserError(unknown)
    return registry[name]


def create_model(name: str, *, input_size: int | tuple[int, int] | None = None, max_memory: int | None = None,
                 **overrides) -> nn.Module:
    """A named config of the zoo, train-time form, eval mode, freshly initialised.

    ``overrides`` replace constructor arguments, e.g. ``create_model("resmlp_12", num_classes=10)``;
    ``input_size`` (H, W) or an int builds it for another input size where the network allows it.
    A config the family rejects, or whose weights plus a batch-1 forward exceed ``max_memory`` bytes
    (None: half the available memory), raises UserError before anything is allocated.
    """
    nc = get_config(name)
    fmt = get_format(nc.format)
    cfg, size = at_input_size(fmt, {**nc.config, **overrides}, input_size)
    check_footprint(fmt, cfg, size, max_bytes=max_memory)
    model = fmt.build(cfg)
    model.arch, model.config, model.input_size = fmt.name, cfg, size
    return model.eval()


def formats() -> dict[str, CheckpointFormat]:
    """Every registered checkpoint format, by name."""
    _ensure_loaded()
    return FORMATS


def configs() -> dict[str, NamedConfig]:
    """Every registered named config, by name."""
    _ensure_loaded()
    return CONFIGS


def _ensure_loaded() -> None:
    from .. import models  # noqa: F401  (imports every family module, which registers itself)
