"""Reading checkpoint files safely: sniffing, weights_only unpickling, wrappers, prefixes, safetensors.

Nothing here ever runs code from a file unless ``trust_pickle=True``: torch files are read
with ``weights_only=True`` (plus a tiny allowlist of inert containers training scripts
store next to the weights), and a file that needs more is refused with the globals it
would import. Every failure is a :class:`CheckpointError` with one readable line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import CheckpointError

# Keys under which training scripts wrap the state_dict, in the order they are preferred.
_WRAPPERS = ("state_dict", "model", "module", "net", "network", "model_state_dict", "params", "weights")
_EMA_WRAPPERS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict", "model_ema_state_dict", "ema_model")
# Prefixes that wrap every key: DDP/DataParallel, torch.compile, Lightning modules.
_PREFIXES = ("module.", "_orig_mod.", "model.")
META_KEY = "vismlp_deploy"  # what this package stores beside the weights
# Inert classes found in real training checkpoints (timm and DeiT store the argparse
# namespace under "args"); unpickling them sets attributes only, it calls no code.
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


@dataclass
class Checkpoint:
    """An unwrapped state_dict and what is known about where it came from."""

    state_dict: dict[str, Tensor]
    arch: str | None = None  # from our own metadata, when present
    config: dict | None = None
    source: str = "state_dict"  # which entry of the file was used ("model_ema", …), for messages
    meta: dict | None = None
    container: str = "in-memory"  # "torch zip", "torch legacy", "safetensors", "pickled module", …
    stripped: list[str] = field(default_factory=list)  # key prefixes removed ("module.")
    notes: list[str] = field(default_factory=list)  # things the user should know (EMA present, …)


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any], *, ema: bool = False,
                    trust_pickle: bool = False) -> Checkpoint:
    """Read a file (or take an in-memory dict) and return the unwrapped state_dict and metadata.

    ema: use the EMA weights of a training checkpoint (error if it has none).
    trust_pickle: allow unpickling code (full pickled modules); refused otherwise.
    """
    if isinstance(source, Mapping):
        return unwrap(source, ema=ema)
    path = Path(source)
    kind = sniff(path)
    if kind == "safetensors":
        obj, container = _read_safetensors(path), "safetensors"
    else:
        obj, container = _read_torch(path, trust_pickle, kind)
    ckpt = unwrap(obj, ema=ema)
    ckpt.container = container
    return ckpt


# --------------------------------------------------------------------------- file kinds

_SIGNATURES = {  # what people pass by mistake, for a useful message
    b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"\x89HDF": "an HDF5 file (Keras?)",
    b"\x93NUMPY": "a NumPy .npy array", b"GIF8": "a GIF image", b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive (decompress it first)", b"ustar": "a tar archive",
}


def sniff(path: Path) -> str:
    """``"zip"`` (torch.save), ``"pickle"`` (legacy torch.save / raw pickle) or ``"safetensors"``.

    Decided from the first bytes, not the suffix; anything else is refused with what it looks like.
    """
    if not path.exists():
        raise CheckpointError(f"no such file: {path}")
    if not path.is_file():
        raise CheckpointError(f"not a file: {path}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted save or copy?")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol >= 2 opcode
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return "safetensors"
        raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size - 8})")
    what = next((w for sig, w in _SIGNATURES.items() if head.startswith(sig)), None)
    if what is None and head.startswith(b"\x08") and path.suffix == ".onnx":
        what = "an ONNX model (already exported)"
    if what is None:
        what = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "an unknown binary format"
    raise CheckpointError(f"{path} is not a checkpoint: it looks like {what}; "
                          "expected a torch.save file (.pth/.pt/.bin) or a .safetensors file")


# --------------------------------------------------------------------------- readers

def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors runs no file code: any failure means a bad file
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({_first_line(e)})") from None
    if META_KEY in meta:
        try:
            return {"state_dict": sd, META_KEY: json.loads(meta[META_KEY])}
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: corrupt {META_KEY} metadata in the safetensors header") from None
    return sd


def _read_torch(path: Path, trust_pickle: bool, kind: str) -> tuple[Any, str]:
    container = "torch zip" if kind == "zip" else "pickle"
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), container
    except Exception as e:  # noqa: BLE001 - weights_only runs no file code: any failure means a bad file
        needs = _code_needed(path, kind, e)
        if needs is None:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_inner_reason(e)})") from None
    if not trust_pickle:
        raise CheckpointError(
            f"{path}: refusing to load: unpickling it needs code execution ({needs}); "
            "a plain state_dict or a .safetensors file needs none. Pass --trust-pickle only if you trust its source"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary code ran; report whatever it raised
        raise CheckpointError(f"{path}: cannot be loaded even with --trust-pickle ({type(e).__name__}: {_first_line(e)})") from None
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), f"pickled module {type(obj).__module__}.{type(obj).__qualname__}"
    return obj, f"{container} (unpickled with --trust-pickle)"


def _code_needed(path: Path, kind: str, e: Exception) -> str | None:
    """What code a weights_only failure wanted to run, or None if the file is simply broken."""
    import pickle

    if not isinstance(e, pickle.UnpicklingError):
        return None
    found: list[str] = []
    if kind == "zip":
        try:
            safe = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
            found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in safe]
        except Exception:  # noqa: BLE001 - fall back to the error text
            found = []
    text = str(e)
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", text)
    if found:
        return "imports " + ", ".join(dict.fromkeys(found))
    if m := re.search(r"Unsupported operand (\d+)", text):
        import pickletools

        op = {o.code: o.name for o in pickletools.opcodes}.get(chr(int(m.group(1))))
        # a real opcode the restricted unpickler lacks (e.g. protocol 4 FRAME) vs garbage bytes
        return f"pickle instruction {op} is not supported by the safe loader" if op else None
    return None


def _inner_reason(e: BaseException) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch wraps the real reason in a long paragraph
        text = text.split("WeightsUnpickler error:", 1)[1]
    return f"{type(e).__name__}: {_first_line_of(text)}" if text.strip() else type(e).__name__


def _first_line(e: BaseException) -> str:
    return _first_line_of(str(e)) or type(e).__name__


def _first_line_of(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


# --------------------------------------------------------------------------- unwrapping

def unwrap(obj: Any, *, ema: bool = False) -> Checkpoint:
    """Find the state_dict inside a training checkpoint and strip whole-dict key prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict or a dict wrapping one")
    meta = obj.get(META_KEY) if isinstance(obj.get(META_KEY), Mapping) else None
    notes: list[str] = []
    if _is_state_dict(obj):
        if ema:
            raise CheckpointError("--ema asked for, but the file is a plain state_dict without EMA weights")
        sd, source = obj, "state_dict"
    else:
        found = {k: inner for k in _EMA_WRAPPERS + _WRAPPERS if k in obj and (inner := _inner_state_dict(obj[k])) is not None}
        emas = [k for k in _EMA_WRAPPERS if k in found]
        plain = [k for k in _WRAPPERS if k in found]
        top = ", ".join(map(str, list(obj)[:12]))
        if ema:
            if not emas:
                raise CheckpointError(f"--ema asked for, but the checkpoint has no EMA weights (top-level keys: {top})")
            source = emas[0]
        elif plain:
            source = plain[0]
            if emas:
                notes.append(f"the file also holds EMA weights ({emas[0]!r}); pass --ema to use them")
        elif emas:
            raise CheckpointError(f"the checkpoint holds only EMA weights ({emas[0]!r}); pass --ema to use them")
        else:
            raise CheckpointError(f"no state_dict found in the checkpoint (top-level keys: {top})")
        sd = found[source]
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors")
    tensors, stripped = _strip_prefixes(tensors)
    return Checkpoint(tensors, meta.get("arch") if meta else None, meta.get("config") if meta else None,
                      source, dict(meta) if meta else None, stripped=stripped, notes=notes)


def _inner_state_dict(value: Any) -> Mapping | None:
    """``value`` if it is a state_dict, or the state_dict one wrapper level below it."""
    if not isinstance(value, Mapping):
        return None
    if _is_state_dict(value):
        return value
    for key in _WRAPPERS:
        inner = value.get(key)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return inner
    return None


def _strip_prefixes(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    return sd, stripped


def _is_state_dict(obj: Mapping) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, Tensor) for v in values) >= max(1, len(values) // 2)
