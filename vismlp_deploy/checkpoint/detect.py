"""Which format and config is a state_dict? Key tests, config inference, a shape check, a named config.

Driver over the registered formats:

1. every format whose cheap key test ``matches(sd)`` passes infers its constructor arguments;
2. the candidate is *verified*: the model of that config is built on the meta device (no
   memory, no init cost) and every key and shape of ``to_model_keys(sd)`` must fit it;
3. exactly one verified candidate is the detection (none: the reasons; several: the
   candidates, and ``--arch`` picks);
4. the named configs of the family (``models.registry.CONFIGS``) whose model has the same
   shapes name the result ("resmlp_12"); one of the same format also supplies the
   arguments the weights cannot tell (an activation), and a note says so.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..models.registry import CONFIGS, FORMATS, CheckpointFormat, formats
from .io import preview

CLASS_KEYS = ("num_classes", "num_class", "n_classes")  # the spellings of the class count upstream
Shapes = dict[str, tuple[int, ...]]


@dataclass
class Detection:
    """What a checkpoint is, how that was found out and how sure it is.

    confidence: ``certain`` (metadata or given by the user), ``high`` (keys of one format,
    every shape checked, nothing assumed), ``medium`` (shapes fit, some arguments are not
    stored in the weights: see ``notes``), ``low`` (the shapes could not be checked).
    """

    format: CheckpointFormat
    config: dict
    how: str  # one line for `inspect`
    confidence: str = "high"
    named: str | None = None  # the named config (CONFIGS) with the same network
    named_format: str | None = None  # its format, when it differs from ``format``
    notes: list[str] = field(default_factory=list)

    def label(self) -> str:
        """``resmlp_12 (timm-resmlp)``; the format alone when no named config fits."""
        if self.named is None:
            return self.format.name
        if self.named_format and self.named_format != self.format.name:
            return f"{self.format.name} (the network of {self.named}, {self.named_format})"
        return f"{self.named} ({self.format.name})"


# --------------------------------------------------------------------------- shapes

_SHAPES: dict[tuple[str, str], Shapes | None] = {}


def expected_shapes(fmt: CheckpointFormat, config: Mapping[str, Any]) -> Shapes | None:
    """Key -> shape of the model ``fmt.build(config)``, built on the meta device; None if it cannot be."""
    key = (fmt.name, _canon(config))
    if key not in _SHAPES:
        try:
            with torch.device("meta"):
                model = fmt.build(dict(config))
            _SHAPES[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        except Exception:  # noqa: BLE001 - a config the family rejects, or a build that needs real data
            _SHAPES[key] = None
    return _SHAPES[key]


def describe_mismatch(expected: Shapes, got: Shapes) -> str | None:
    """None if ``got`` fits ``expected`` key for key; else which keys are missing/unexpected/mis-shaped.

    A missing ``num_batches_tracked`` is tolerated (older checkpoints lack it; it does not
    affect eval-mode outputs): the loader fills it and says so.
    """
    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(got[k]) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {preview(unexpected)}")
    if shapes:
        k = shapes[0]
        more = f" (+{len(shapes) - 1} more mismatched)" if len(shapes) > 1 else ""
        parts.append(f"shape mismatch at {k}: model expects {tuple(expected[k])}, checkpoint has {tuple(got[k])}{more}")
    return "; ".join(parts) or None


def mapped_shapes(fmt: CheckpointFormat, sd: Mapping[str, Tensor]) -> Shapes:
    """Shapes of ``sd`` under the model's key names (``to_model_keys``)."""
    try:
        mapped = fmt.to_model_keys(sd)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise CheckpointError(f"the keys do not follow the {fmt.name} layout ({type(e).__name__}: {e})") from None
    return {k: tuple(v.shape) for k, v in mapped.items()}


# --------------------------------------------------------------------------- detection

def detect_format(state_dict: Mapping[str, Tensor]) -> Detection:
    """The single registered format whose keys match and whose inferred config fits every shape."""
    tried: list[str] = []
    fits: list[tuple[CheckpointFormat, dict, bool]] = []
    for fmt in formats().values():
        if not _matches(fmt, state_dict):
            continue
        try:
            config = fmt.infer_config(state_dict)
            verified = _verify(fmt, config, state_dict)
        except CheckpointError as e:
            tried.append(f"{fmt.name}: {e}")
            continue
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
            tried.append(f"{fmt.name}: cannot infer its config ({type(e).__name__}: {e})")
            continue
        fits.append((fmt, config, verified))
    if not fits:
        if tried:
            raise CheckpointError(f"cannot detect the architecture: {'; '.join(tried)}. Pass --arch (and --config)")
        raise CheckpointError("no supported key layout matches this checkpoint "
                              f"(keys: {preview(sorted(state_dict), 4)}); "
                              "`vismlp-deploy zoo` lists the formats, --arch picks one")
    if len(fits) > 1:
        cands = "; ".join(f"{f.name} {c}" for f, c, _ in fits)
        raise CheckpointError(f"ambiguous checkpoint: it fits {len(fits)} formats ({cands}); pass --arch to choose")
    fmt, config, verified = fits[0]
    others = sum(1 for f in FORMATS.values() if f is not fmt)
    check = (f"all {len(state_dict)} tensors fit" if verified
             else "shapes not checked: the model cannot be built on the meta device")
    how = f"from key names and tensor shapes: only {fmt.name} fits ({others} other formats ruled out); {check}"
    return finish(fmt, config, state_dict, how, verified)


def finish(fmt: CheckpointFormat, config: dict, state_dict: Mapping[str, Tensor], how: str,
           verified: bool) -> Detection:
    """Name the config (CONFIGS), let a same-format named config fill what weights cannot tell, add notes."""
    det = Detection(fmt, dict(config), how, "high" if verified else "low")
    match = match_named(fmt, config)
    if match is not None:
        det.named, named_fmt, filled = match
        det.named_format = named_fmt if named_fmt != fmt.name else None
        for k, v in filled.items():
            det.config[k] = v
            det.notes.append(f"{k}={v!r}: not determined by the weights; taken from the named config {det.named}")
    assumed = fmt.assumptions(det.config) if fmt.assumptions else {}
    det.notes += [f"{k}={det.config.get(k)!r}: {why}" for k, why in assumed.items()
                  if k not in (match[2] if match else {})]
    if det.notes and det.confidence == "high":
        det.confidence = "medium"
    return det


def match_named(fmt: CheckpointFormat, config: dict) -> tuple[str, str, dict] | None:
    """(name, its format, arguments it fills in) of the named config with this network, if any.

    Candidates are the family's named configs whose model has exactly the shapes of
    ``config`` (class count taken from ``config``). Same-format ones win (they can fill in
    arguments); among those, the one agreeing with ``config`` on the most arguments. A tie
    with conflicting fills is left unnamed: guessing there would be silent.
    """
    target = expected_shapes(fmt, config)
    if target is None:
        return None
    n_cls = next((config[k] for k in CLASS_KEYS if k in config), None)
    same: list[tuple[int, str, dict]] = []
    other: list[tuple[str, str]] = []
    for nc in CONFIGS.values():
        nfmt = FORMATS.get(nc.format)
        if nfmt is None or nfmt.family != fmt.family:
            continue
        ncfg = {k: (n_cls if k in CLASS_KEYS and n_cls is not None else v) for k, v in nc.config.items()}
        if nfmt is fmt:
            merged = {**config, **ncfg}
            if expected_shapes(fmt, merged) == target:
                filled = {k: v for k, v in merged.items() if _canon(config.get(k, _MISSING)) != _canon(v)}
                agree = sum(1 for k in ncfg if k in config and _canon(config[k]) == _canon(ncfg[k]))
                same.append((agree, nc.name, filled))
        elif expected_shapes(nfmt, ncfg) == target:
            other.append((nc.name, nc.format))
    if same:
        same.sort(key=lambda t: -t[0])
        best = [s for s in same if s[0] == same[0][0]]
        if len({_canon(s[2]) for s in best}) > 1:
            return None
        return best[0][1], fmt.name, best[0][2]
    if len(other) == 1:
        return other[0][0], other[0][1], {}
    return None


# --------------------------------------------------------------------------- helpers

_MISSING = object()


def _matches(fmt: CheckpointFormat, sd: Mapping[str, Tensor]) -> bool:
    try:
        return bool(fmt.matches(sd))
    except Exception:  # noqa: BLE001 - a key test that trips over foreign keys simply does not match
        return False


def _verify(fmt: CheckpointFormat, config: dict, sd: Mapping[str, Tensor]) -> bool:
    """True if every key and shape fits the built model; False if it cannot be built on meta; raises on misfit."""
    expected = expected_shapes(fmt, config)
    if expected is None:
        return False
    problem = describe_mismatch(expected, mapped_shapes(fmt, sd))
    if problem:
        raise CheckpointError(f"inferred config {config} does not fit: {problem}")
    return True


def _canon(x: Any) -> str:
    """Order- and tuple/list-insensitive text of a config value, for comparisons and cache keys."""
    if x is _MISSING:
        return "<missing>"
    return json.dumps(x, sort_keys=True, default=str)
