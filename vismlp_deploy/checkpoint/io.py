"""Reading checkpoint files safely: weights_only unpickling, wrappers, DDP prefixes, safetensors."""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError

# Keys under which training scripts wrap the state_dict, in the order they are preferred.
_WRAPPERS = ("state_dict", "model", "module", "net", "params")
_EMA_WRAPPERS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict")
META_KEY = "vismlp_deploy"  # what this package stores beside the weights


@dataclass
class Checkpoint:
    state_dict: dict[str, Tensor]
    arch: str | None = None  # from our own metadata, when present
    config: dict | None = None
    source: str = "state_dict"  # which entry was used, for messages
    meta: dict | None = None


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, ema: bool = False, trust_pickle: bool = False) -> Checkpoint:
    """Read a file or take an in-memory dict; return the (unwrapped) state_dict and metadata."""
    if isinstance(source, Mapping):
        return unwrap(source, ema=ema)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}")
    if path.suffix == ".safetensors":
        return unwrap(_read_safetensors(path), ema=ema)
    return unwrap(_read_torch(path, trust_pickle), ema=ema)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorsError
    from safetensors.torch import load_file, safe_open

    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorsError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if META_KEY in meta:
        import json

        return {"state_dict": sd, META_KEY: json.loads(meta[META_KEY])}
    return sd


def _read_torch(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: refusing to unpickle code (weights_only load failed: {_first_line(e)}). "
                "Only pass --trust-pickle for files from a source you trust."
            ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary code ran; report whatever it raised
        raise CheckpointError(f"{path}: cannot be loaded even with --trust-pickle ({_first_line(e)})") from None
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def unwrap(obj: Any, *, ema: bool = False) -> Checkpoint:
    """Find the state_dict inside a training checkpoint and strip DDP ``module.`` prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict or a dict wrapping one")
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), Mapping) else None
    candidates = (_EMA_WRAPPERS + _WRAPPERS) if ema else _WRAPPERS
    source = "state_dict"
    sd: Any = obj
    if not _is_state_dict(obj):
        for key in candidates:
            if key in obj and isinstance(obj[key], Mapping) and _is_state_dict(obj[key]):
                sd, source = obj[key], key
                break
        else:
            if ema:
                raise CheckpointError(f"--ema asked for, but no EMA weights found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
            raise CheckpointError(f"no state_dict found in checkpoint (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    elif ema:
        raise CheckpointError("--ema asked for, but the file is a plain state_dict without EMA weights")
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors")
    return Checkpoint(sd, meta.get("arch") if meta else None, meta.get("config") if meta else None, source, dict(meta) if meta else None)


def _is_state_dict(obj: Mapping) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, Tensor) for v in values) >= max(1, len(values) // 2)
