"""checkpoint -> train-time model: ``load_checkpoint(path_or_state_dict, arch, config)``.

Precedence of what decides the architecture: ``arch``/``config`` given by the caller, then
the file's own ``vismlp_deploy`` metadata, then detection from keys and shapes. A partial
``config`` overrides only the arguments it names (e.g. ``{"act_layer": "ReLU"}``, which
no weight can tell); the rest still comes from the file.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, UserError
from ..models.footprint import build_on_meta, check_footprint, input_size_of
from ..models.registry import CheckpointFormat, at_input_size, get_format
from .detect import Detection, describe_mismatch, detect_format, finish
from .io import Checkpoint, preview, read_checkpoint


@dataclass
class LoadInfo:
    """What ``load_checkpoint`` used and found out; ``model.checkpoint_info``."""

    weights: str  # entry of the file that was used: "state_dict", "model", "model_ema", …
    container: str  # "torch zip", "safetensors", "in-memory", …
    stripped: list[str]  # key prefixes removed ("module.")
    format: str
    label: str  # "resmlp_12 (timm-resmlp)"
    named: str | None
    how: str
    confidence: str
    config_source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: what was loaded and how sure the detection is."""
        strip = f", prefix {'+'.join(self.stripped)} removed" if self.stripped else ""
        return f"{self.label} — {self.confidence} confidence; weights: {self.weights} ({self.container}{strip})"


def load_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    arch: str | None = None,
    config: dict | None = None,
    *,
    ema: bool = False,
    trust_pickle: bool = False,
    input_size: int | tuple[int, int] | None = None,
    max_memory: int | None = None,
) -> nn.Module:
    """The train-time model of a checkpoint, in eval mode, float32.

    source: a path (.pth/.pt/.bin/.safetensors) or an in-memory state_dict (or wrapping dict).
    arch: a format name (``vismlp-deploy zoo`` lists them); detected from keys if None.
    config: upstream constructor arguments; inferred from shapes if None, merged over the
        inferred ones if partial.
    ema: use the EMA weights of a training checkpoint. trust_pickle: allow code execution.
    input_size: (H, W) or an int: the input size to run at (channels come from the weights),
        where the network allows it; default: the size stored with the file, else the config's.
    max_memory: refuse (CheckpointError) a model whose weights plus a batch-1 forward need more bytes;
        None: half the available memory.
    The model carries ``arch``, ``config``, ``input_size``, ``checkpoint_info`` (LoadInfo)
    and ``config_notes`` (what the weights could not tell).
    """
    if config is not None and not isinstance(config, Mapping):
        raise CheckpointError(f"config must be a dict of constructor arguments, not a {type(config).__name__}")
    ckpt = read_checkpoint(source, ema=ema, trust_pickle=trust_pickle)
    if ckpt.meta and ckpt.meta.get("form") == "deploy":
        raise CheckpointError("this is a deploy model written by `vismlp-deploy convert`: it is already "
                              "re-parameterized (load it with vismlp_deploy.export.torch_artifact.load_deploy)")
    det = resolve(ckpt, arch, config)
    if input_size is None and ckpt.meta and ckpt.meta.get("input_size"):
        input_size = tuple(ckpt.meta["input_size"][1:])
    model = _build_at_size(det, ckpt, input_size, max_memory)
    family_notes = [n for n in getattr(model, "config_notes", []) if n not in det.notes and not config]
    notes = ckpt.notes + det.notes + family_notes
    confidence = "medium" if family_notes and det.confidence == "high" else det.confidence
    model.config_notes = notes
    model.checkpoint_info = LoadInfo(
        weights=ckpt.source, container=ckpt.container, stripped=ckpt.stripped, format=det.format.name,
        label=det.label(), named=det.named, how=det.how, confidence=confidence,
        config_source=_config_source(ckpt, config), notes=notes)
    return model


def _build_at_size(det: Detection, ckpt: Checkpoint, input_size, max_memory: int | None) -> nn.Module:
    """The detected network at ``input_size``; where the weights fix the size, a clear error."""
    fmt = det.format
    config, size = at_input_size(fmt, det.config, input_size)
    try:
        model = build_and_load(fmt, config, ckpt.state_dict, notes=det.notes, max_memory=max_memory, input_size=size)
    except CheckpointError as e:
        if config == det.config:
            raise
        c, h, w = fmt.input_size(det.config)
        raise CheckpointError(f"this {fmt.name} checkpoint's weights fix its input size at {h}x{w}: "
                              f"{size[1]}x{size[2]} does not fit them ({e})") from None
    return model


def resolve(ckpt: Checkpoint, arch: str | None, config: dict | None) -> Detection:
    """Format and config of ``ckpt``: given, stored in its metadata, or detected."""
    sd = ckpt.state_dict
    if arch is None and ckpt.arch:
        fmt = get_format(ckpt.arch)
        det = Detection(fmt, {**(ckpt.config or {}), **(config or {})}, "stored in the file's vismlp_deploy metadata",
                        "certain", named=(ckpt.meta or {}).get("named_config"))
        return det
    if arch is None:
        det = detect_format(sd)
    else:
        fmt = get_format(arch)
        try:
            inferred = fmt.infer_config(sd)
        except (CheckpointError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            if not config:
                raise CheckpointError(f"cannot infer the {fmt.name} config from this checkpoint ({e}); "
                                      "pass --config with the constructor arguments") from None
            return Detection(fmt, dict(config), "format given with --arch, config given with --config", "certain")
        det = finish(fmt, inferred, sd, "format given with --arch; config from tensor shapes", verified=True)
    if config:
        det.config.update(config)
        det.notes = [n for n in det.notes if n.split("=", 1)[0] not in config]
        det.how += f"; {', '.join(config)} given with --config"
        if arch is not None and not det.notes:
            det.confidence = "certain"
    return det


def build_and_load(fmt: CheckpointFormat, config: dict, state_dict: Mapping[str, Tensor],
                   notes: list[str] | None = None, max_memory: int | None = None,
                   input_size: tuple[int, int, int] | None = None) -> nn.Module:
    """Build ``fmt`` with ``config`` and load ``state_dict`` strictly, with readable errors.

    Everything is checked on a meta-device build before any memory is spent: every key must be present
    and used, every shape must match (the message lists the keys), the values must suit the model
    (:func:`check_values`) and weights plus a batch-1 forward must fit ``max_memory`` (bytes; None: half
    the available memory, see ``models.footprint``) at ``input_size`` (C, H, W; default: the config's).
    Only a missing BatchNorm ``num_batches_tracked``
    counter is filled (with 0, recorded in ``notes``): it plays no part in eval mode.
    """
    try:
        skeleton = build_on_meta(fmt, config)
        input_size = input_size or input_size_of(fmt, config)
    except UserError as e:
        raise CheckpointError(str(e)) from None
    try:
        mapped = dict(fmt.to_model_keys(state_dict))
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"the checkpoint keys do not follow the {fmt.name} layout "
                              f"({type(e).__name__}: {e})") from None
    expected = skeleton.state_dict()
    problem = describe_mismatch({k: tuple(v.shape) for k, v in expected.items()},
                                {k: tuple(v.shape) for k, v in mapped.items()})
    if problem:
        raise CheckpointError(f"checkpoint does not fit {fmt.name} {config}: {problem}")
    filled = [k for k in expected if k not in mapped]  # only num_batches_tracked survive describe_mismatch
    for k in filled:
        mapped[k] = torch.zeros(expected[k].shape, dtype=expected[k].dtype)
    if filled and notes is not None:
        notes.append(f"{len(filled)} BatchNorm num_batches_tracked counters missing; set to 0 (unused in eval mode)")
    check_values(expected, mapped)
    try:
        check_footprint(fmt, config, input_size, max_bytes=max_memory, model=skeleton)
    except UserError as e:
        raise CheckpointError(str(e)) from None
    try:
        model = fmt.build(dict(config))
    except (TypeError, ValueError, AssertionError, KeyError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"cannot build {fmt.name} with config {config}: {type(e).__name__}: {e}") from None
    model.load_state_dict(mapped, strict=True)
    model.arch, model.config = fmt.name, dict(config)
    model.input_size = input_size
    return model.float().eval()


def check_values(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> None:
    """Refuse values that ``load_state_dict`` would silently cast or that no trained network has, naming the
    keys: a dtype of another kind than the model's tensor (integer or complex weights, float counters),
    NaN/Inf, negative BatchNorm ``running_var``. ``expected``: the model's state_dict (meta tensors do)."""
    kinds = {k: (_kind(expected[k]), _kind(v)) for k, v in got.items() if k in expected}
    wrong = [f"{k} ({str(got[k].dtype).removeprefix('torch.')}, model has {want})" for k, (want, have) in kinds.items()
             if want != have]
    if wrong:
        raise CheckpointError(f"checkpoint has tensors of the wrong kind in {len(wrong)} places: {preview(wrong, 4)}; "
                              "a trained network stores floating-point weights and integer counters")
    bad = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for k, v in got.items()
           if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint has NaN/Inf weights in {len(bad)} tensors: {preview(bad, 4)}")
    negative = [f"{k} ({int((v < 0).sum())} of {v.numel()})" for k, v in got.items()
                if k.endswith("running_var") and v.is_floating_point() and bool((v < 0).any())]
    if negative:
        raise CheckpointError(f"checkpoint has negative BatchNorm variances in {len(negative)} tensors: "
                              f"{preview(negative, 4)}; a variance is never below 0")


def _kind(t: Tensor) -> str:
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "float"
    return "bool" if t.dtype == torch.bool else "integer"


def _config_source(ckpt: Checkpoint, config: dict | None) -> str:
    if config:
        return "given with --config" + (" (merged over the inferred config)" if not ckpt.config else "")
    if ckpt.config is not None and ckpt.arch:
        return "stored in the file's vismlp_deploy metadata"
    return "inferred from tensor shapes"
