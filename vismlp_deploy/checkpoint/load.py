"""checkpoint -> train-time model: ``load_checkpoint(path_or_state_dict, arch, config)``."""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..models.registry import CheckpointFormat, get_format
from .io import read_checkpoint
from .detect import detect_format


def load_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    arch: str | None = None,
    config: dict | None = None,
    *,
    ema: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """The train-time model of a checkpoint, in eval mode, float32.

    source: a path (.pth/.pt/.safetensors) or an in-memory state_dict (or wrapping dict).
    arch: a format name (``vismlp-deploy zoo`` lists them), detected from keys if None.
    config: the upstream constructor arguments, inferred from shapes if None.
    The returned model carries ``arch``, ``config`` and ``input_size`` attributes.
    """
    ckpt = read_checkpoint(source, ema=ema, trust_pickle=trust_pickle)
    state_dict = ckpt.state_dict
    arch = arch or ckpt.arch
    config = config if config is not None else ckpt.config
    if arch is None:
        fmt = detect_format(state_dict).format
    else:
        fmt = get_format(arch)
    if config is None:
        config = fmt.infer_config(state_dict)
    return build_and_load(fmt, config, state_dict)


def build_and_load(fmt: CheckpointFormat, config: dict, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Build ``fmt`` with ``config`` and load ``state_dict`` strictly, with readable errors."""
    try:
        model = fmt.build(dict(config))
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"cannot build {fmt.name} with config {config}: {e}") from None
    mapped = fmt.to_model_keys(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        raise CheckpointError(f"checkpoint does not fit {fmt.name} {config}: " + "; ".join(parts))
    for k, v in expected.items():
        got = mapped[k]
        if tuple(got.shape) != tuple(v.shape):
            raise CheckpointError(f"shape mismatch at {k}: model expects {tuple(v.shape)}, checkpoint has {tuple(got.shape)}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"checkpoint tensor {k} contains NaN or Inf")
    model.load_state_dict(mapped, strict=True)
    model.arch, model.config = fmt.name, dict(config)
    model.input_size = tuple(fmt.input_size(config))
    return model.float().eval()


def _preview(keys: list[str], n: int = 6) -> str:
    more = f", … (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
