"""Reading checkpoint files safely: sniffing, weights_only unpickling, wrappers, prefixes, safetensors.

Nothing here ever runs code from a file unless ``trust_pickle=True``: torch files are read
with ``weights_only=True`` (plus a tiny allowlist of inert containers training scripts
store next to the weights), and a file that needs more is refused with the globals it
would import. Every failure is a :class:`CheckpointError` with one readable line.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import io
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..errors import CheckpointError, first_line

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


def read_checkpoint(source: str | os.PathLike | Mapping[str, Any] | Checkpoint, *, ema: bool = False,
                    trust_pickle: bool = False) -> Checkpoint:
    """Read a file (or take an in-memory dict) and return the unwrapped state_dict and metadata.

    ema: use the EMA weights of a training checkpoint (error if it has none).
    trust_pickle: allow unpickling code (full pickled modules); refused otherwise.
    """
    if isinstance(source, Checkpoint):  # already read (with its own ema choice)
        return source
    if isinstance(source, Mapping):
        ckpt = unwrap(source, ema=ema)
    else:
        path = Path(source)
        kind = sniff(path)
        if kind == "safetensors":
            obj, container = _read_safetensors(path), "safetensors"
        else:
            obj, container = _read_torch(path, trust_pickle, kind)
        ckpt = unwrap(obj, ema=ema)
        ckpt.container = container
        if (kind == "safetensors") != (path.suffix == ".safetensors"):
            ckpt.notes.append(f"the file is a {container} file although its name ends in {path.suffix or 'nothing'!r}")
    check_tensors(ckpt.state_dict)
    return ckpt


def check_tensors(sd: Mapping[str, Tensor]) -> None:
    """Refuse tensors no trained network stores: sparse, without data (meta device), quantized, and views whose
    elements overlap (a stride-0 ``expand`` declares a huge tensor over a few bytes). Names the keys."""
    found: dict[str, list[str]] = {}
    for k, v in sd.items():
        if v.layout != torch.strided:
            what = f"sparse ({str(v.layout).removeprefix('torch.')})"
        elif v.is_meta:
            what = "meta-device (shape only, no data)"
        elif v.is_quantized:
            what = "quantized"
        elif _overlaps(v):
            what = "stride-0 or self-overlapping (views declaring more elements than they store)"
        else:
            continue
        found.setdefault(what, []).append(f"{k} {tuple(v.shape)}")
    if found:
        parts = "; ".join(f"{what}: {preview(keys, 4)}" for what, keys in found.items())
        raise CheckpointError(f"checkpoint has tensors a trained network never stores: {parts}")


def _overlaps(t: Tensor) -> bool:
    """Do two indices of ``t`` address the same element? Sorted by stride, each dimension must step over
    everything the smaller ones span (sufficient and, for stride-0 or expanded views, the exact test)."""
    if t.numel() <= 1:
        return False
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def preview(keys: list[str], n: int = 6) -> str:
    """The first ``n`` of ``keys`` and how many more, for one-line messages."""
    more = f", … (+{len(keys) - n})" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


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
    if head[:1] == b"\x80":  # PROTO: pickle protocol >= 2
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return "safetensors"
        raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size - 8})")
    what = next((w for sig, w in _SIGNATURES.items() if head.startswith(sig)), None)
    if what is None and head.startswith(b"\x08") and path.suffix == ".onnx":
        what = "an ONNX model (already exported)"
    if what is None and _is_pickle(path):  # protocols 0 and 1 have no header: a complete first pickle tells
        return "pickle"
    if what is None:
        what = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "an unknown binary format"
    raise CheckpointError(f"{path} is not a checkpoint: it looks like {what}; "
                          "expected a torch.save file (.pth/.pt/.bin) or a .safetensors file")


# --------------------------------------------------------------------------- readers

# legacy torch.save: magic number, protocol, system info, the object, storage keys, then raw bytes
_LEGACY_PICKLES = 5
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_INFLATE = 100  # uncompressed / file size of a zip; torch.save stores members uncompressed (1)
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors runs no file code: any failure means a bad file
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({first_line(e)})") from None
    if META_KEY in meta:
        try:
            return {"state_dict": sd, META_KEY: json.loads(meta[META_KEY])}
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: corrupt {META_KEY} metadata in the safetensors header") from None
    return sd


def _read_torch(path: Path, trust_pickle: bool, kind: str) -> tuple[Any, str]:
    if kind == "zip":
        _verify_zip(path)
        container = "torch zip"
    else:
        container = "torch legacy" if _is_torch_legacy(path) else "raw pickle"
    try:
        # an open file, not the path: torch.load reads a path ending in .safetensors as safetensors
        with open(path, "rb") as f, torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # torch's notes on pickle protocols: failures speak for themselves
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(f, map_location="cpu", weights_only=True), container
    except Exception as e:  # noqa: BLE001 - weights_only runs no file code: any failure means a bad file
        needs = _code_needed(path, kind, e)
        if needs is None:
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_inner_reason(e)})") from None
    if not trust_pickle:
        raise CheckpointError(
            f"{path}: refusing to load: only the full unpickler, which can run code, reads it ({needs}); "
            "a plain state_dict or a .safetensors file needs none. Pass --trust-pickle only if you trust its source"
        )
    try:
        with open(path, "rb") as f:
            # torch.load reads torch's own formats; a raw pickle.dump file has no torch header
            obj = pickle.load(f) if container == "raw pickle" else torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - arbitrary code ran; report whatever it raised
        raise CheckpointError(f"{path}: cannot be loaded even with --trust-pickle "
                              f"({type(e).__name__}: {first_line(e)})") from None
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict(), f"pickled module {type(obj).__module__}.{type(obj).__qualname__}"
    return obj, f"{container} (unpickled with --trust-pickle)"


def _verify_zip(path: Path) -> None:
    """Check the CRC-32 of every member (torch's reader does not), so bytes corrupted behind an intact zip
    structure are refused; and refuse members that inflate beyond any real checkpoint (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if sum(m.file_size for m in members) > _MAX_INFLATE * max(1, path.stat().st_size):
                raise CheckpointError(f"{path}: its zip members would inflate more than {_MAX_INFLATE}-fold: "
                                      "not a torch.save file")
            for m in members:
                with z.open(m) as f:
                    while f.read(1 << 24):  # ZipExtFile checks the CRC when it reaches the end
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint "
                              f"({type(e).__name__}: {first_line(e)})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _code_needed(path: Path, kind: str, e: Exception) -> str | None:
    """Why a weights_only failure needs the full unpickler (the unsafe globals it imports, or an instruction
    the safe loader lacks), or None if the file is simply broken. Read from the pickle without running it."""
    if not isinstance(e, pickle.UnpicklingError):
        return None
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                found = _pickle_globals(io.BytesIO(z.read(name)), max_pickles=1)
        else:
            with open(path, "rb") as f:
                found = _pickle_globals(_Capped(f), max_pickles=_LEGACY_PICKLES)
    except (OSError, StopIteration, zipfile.BadZipFile):
        found = []
    unsafe = [g for g in dict.fromkeys(found) if g not in _allowed_globals()]
    if unsafe:
        return "imports " + ", ".join(unsafe)
    if m := re.search(r"Unsupported operand (\d+)", str(e)):
        op = {o.code: o.name for o in pickletools.opcodes}.get(chr(int(m.group(1))))
        # a real opcode the restricted unpickler lacks (e.g. protocol 4 FRAME) vs garbage bytes
        return f"pickle instruction {op} is not supported by the safe loader" if op else None
    return None


def _pickle_globals(f: BinaryIO | _Capped, max_pickles: int) -> list[str]:
    """``module.name`` of every global the pickles at the start of ``f`` import, found by disassembling them
    (pickletools: nothing is executed). STACK_GLOBAL takes its names from the two values pushed before it;
    a name that is not a plain string push is reported as ``<computed>``."""
    found: list[str] = []
    for _ in range(max_pickles):
        pushed: list[str | None] = []  # values pushed so far, strings only (enough for STACK_GLOBAL)
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _pos in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(_py3_name(*arg.split(" ", 1)))
                elif op.name == "STACK_GLOBAL":
                    mod, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
                    found.append(_py3_name(mod, name) if mod and name else "<computed>")
                    pushed[-2:] = [None]
                elif op.name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = pushed[-1] if pushed else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    pushed.append(memo.get(int(arg)))
                elif op.stack_after:
                    pushed.append(None)
        except (ValueError, EOFError):  # the end of the pickles (raw storage bytes follow in legacy files)
            break
    return found


def _py3_name(module: str, name: str) -> str:
    """``module.name`` under Python 3 names (protocols <= 2 write ``__builtin__.set`` for ``builtins.set``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _is_pickle(path: Path) -> bool:
    """Does the file start with a complete pickle (protocols 0 and 1 have no header)?"""
    try:
        with open(path, "rb") as f:
            for _ in pickletools.genops(_Capped(f)):
                pass
        return True
    except (ValueError, EOFError, OSError):
        return False


def _is_torch_legacy(path: Path) -> bool:
    """Is the first pickle of the file torch's legacy magic number (not a plain ``pickle.dump``)?"""
    try:
        with open(path, "rb") as f:
            return any(op.name in ("LONG1", "LONG", "LONG4") and arg == _TORCH_LEGACY_MAGIC
                       for op, arg, _ in pickletools.genops(_Capped(f)))
    except (ValueError, EOFError, OSError):
        return False


class _Capped:
    """A binary file whose reads never ask for more than the bytes left: a hostile pickle can declare any
    length, and ``read(2**60)`` would try to allocate it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.size = f, os.fstat(f.fileno()).st_size
        self.readline = f.readline

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))


def _allowed_globals() -> set[str]:
    """Globals the weights_only unpickler accepts: torch's allowlist and ours."""
    ours = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals()) | ours
    except (ImportError, AttributeError):  # a private API: without it, every global is named
        return ours


def _inner_reason(e: BaseException) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch wraps the real reason in a long paragraph
        text = text.split("WeightsUnpickler error:", 1)[1]
    return f"{type(e).__name__}: {first_line(text)}" if text.strip() else type(e).__name__


# --------------------------------------------------------------------------- unwrapping

def unwrap(obj: Any, *, ema: bool = False) -> Checkpoint:
    """Find the state_dict inside a training checkpoint and strip whole-dict key prefixes."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict or a dict wrapping one")
    meta = check_meta(obj[META_KEY]) if META_KEY in obj else None
    notes: list[str] = []
    if _is_state_dict(obj):
        if ema:
            raise CheckpointError("--ema asked for, but the file is a plain state_dict without EMA weights")
        sd, source = obj, "state_dict"
    else:
        found = {k: inner for k in _EMA_WRAPPERS + _WRAPPERS
                 if k in obj and (inner := _inner_state_dict(obj[k])) is not None}
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
                      source, meta, stripped=stripped, notes=notes)


def check_meta(meta: Any) -> dict:
    """Our ``vismlp_deploy`` metadata, with the types every reader relies on: ``arch``/``form`` strings,
    ``config`` a dict with string keys, ``input_size`` three positive ints (each optional)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"corrupt {META_KEY} metadata in the checkpoint: {what}")

    if not isinstance(meta, Mapping):
        raise bad(f"it is a {type(meta).__name__}, not a dict")
    for key in ("arch", "form", "named_config"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"{key} is a {type(meta[key]).__name__} ({_short(meta[key])}), not a string")
    config = meta.get("config")
    if config is not None and not (isinstance(config, Mapping) and all(isinstance(k, str) for k in config)):
        raise bad(f"config is a {type(config).__name__} ({_short(config)}), not a dict of constructor arguments")
    size = meta.get("input_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 3
                                 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)):
        raise bad(f"input_size is {_short(size)}, not three positive integers (C, H, W)")
    return dict(meta)


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "…"


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
