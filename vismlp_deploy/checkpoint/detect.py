"""Which format is a state_dict? Key tests first, then each candidate's config inference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from ..errors import CheckpointError
from ..models.registry import FORMATS, CheckpointFormat, _ensure_loaded


@dataclass
class Detection:
    format: CheckpointFormat
    config: dict
    how: str  # one line for `inspect`


def detect_format(state_dict: Mapping[str, Tensor]) -> Detection:
    """The single format whose key test matches and whose config can be inferred."""
    _ensure_loaded()
    found, errors = [], []
    for fmt in FORMATS.values():
        if not fmt.matches(state_dict):
            continue
        try:
            found.append(Detection(fmt, fmt.infer_config(state_dict), "detected from key names and shapes"))
        except CheckpointError as e:
            errors.append(f"{fmt.name}: {e}")
    if len(found) == 1:
        return found[0]
    if not found:
        hint = f" ({'; '.join(errors)})" if errors else ""
        raise CheckpointError(f"cannot detect the architecture from the checkpoint keys{hint}; pass --arch (see `vismlp-deploy zoo`)")
    raise CheckpointError(f"ambiguous checkpoint: matches {', '.join(d.format.name for d in found)}; pass --arch")
