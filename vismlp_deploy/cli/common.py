"""What every subcommand shares: console output, JSON output, atomic writes, error policy."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console

from ..errors import UserError

# Human output goes to stderr so that `--json` stdout stays one clean document.
# soft_wrap: an error stays one line however long (scripts and tests read it as one line).
console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, (tuple, set)):
        return list(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


def check_writable(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless --force; the directory must exist."""
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.exists():
        raise UserError(f"output directory {path.parent} does not exist")


@contextmanager
def atomic_output(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    check_writable(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def parse_json_arg(text: str | None, what: str) -> dict | None:
    """``--config`` takes inline JSON or a path to a JSON file."""
    if text is None:
        return None
    p = Path(text)
    try:
        raw = p.read_text() if p.is_file() else text
        value = json.loads(raw)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: neither a JSON file nor valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: expected a JSON object")
    return value
