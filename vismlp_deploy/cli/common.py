"""What every subcommand shares: console and JSON output, tables, option types, safe outputs.

Output policy: human output goes to stderr (``--json`` stdout stays one clean document);
user-supplied text is never read as rich markup or emoji (the console has both off, and
styling goes through ``Text``), so a file called ``a[/bold].pth`` prints as it is.
Outputs are checked before any work starts and written through a temporary file beside
them that is renamed into place only when complete (removed on any error, on SIGTERM and
SIGHUP too); an existing output is replaced only with ``--force``; new files get the mode
the umask allows.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..errors import UserError

# soft_wrap: an error stays one line however long (scripts and tests read it as one line)
console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
VERBOSITY = {"level": 0}  # -q: -1, default 0, -v: 1 (set by cli.main)


def live(json: bool = False) -> bool:
    """Whether spinners and progress bars may draw: a terminal, not --json, not -q (a log gets none)."""
    return console.is_terminal and not json and VERBOSITY["level"] >= 0


def status(message: str):
    """A spinner with ``message`` while a block runs (nothing where :func:`live` says no)."""
    return console.status(message) if live() else nullcontext()


def say(*parts: str | tuple[str, str], level: int = 0) -> None:
    """Print one line of plain and ``(text, style)`` parts, unless ``-q`` silences this ``level``."""
    if VERBOSITY["level"] >= level:
        console.print(Text.assemble(*parts))


def styled(text: str, style: str) -> Text:
    return Text(text, style=style)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=_jsonable, allow_nan=True) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    if isinstance(x, (tuple, set)):
        return list(x)
    return str(x)


def print_table(table: Table) -> None:
    """The table, or, where it would not fit the console (a pipe or CI log is 80 columns), each row
    as ``column: value`` lines: numbers are never truncated to ``5.…``."""
    if VERBOSITY["level"] < 0:
        return
    natural = Measurement.get(console, console.options.update_width(1 << 16), table).maximum
    if natural <= console.width:
        console.print(table)
        return
    if table.title:
        console.print(Text(str(table.title), style="bold"))
    names = [str(c.header) for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    for r in range(table.row_count):
        for i, name in enumerate(names):
            console.print(Text.assemble("- " if i == 0 else "  ", f"{name}: ", _plain(cells[i][r])))


def _plain(cell: Any) -> Text | str:
    return cell if isinstance(cell, Text) else str(cell)


# ------------------------------------------------------------------------------ option types

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def bounded_int(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer from {lo} to {hi}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def nonnegative_int(text: str) -> int:
    return bounded_int(0, 1 << 31)(text)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (tolerances, times): NaN would pass nothing and fail nothing."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """``1,8,32`` -> (1, 8, 32): batch sizes, each from 1 to 65536."""
    try:
        values = tuple(bounded_int(1, 65536)(v.strip()) for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers from 1 to 65536, got {text!r}")
    return values


def name_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return values


def three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def nonzero_three_floats(text: str) -> tuple[float, float, float]:
    values = three_floats(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"a standard deviation must be > 0, got {text!r}")
    return values


def input_size(text: str) -> tuple[int, int]:
    """``224`` or ``224x192`` (H x W) -> (H, W)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 32 or 224x192), got {text!r}")
    h = int(m.group(1))
    w = int(m.group(2) or h)
    if not (1 <= h <= 16384 and 1 <= w <= 16384):
        raise argparse.ArgumentTypeError(f"each side must be from 1 to 16384 pixels, got {text!r}")
    return h, w


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether it is usable is checked before the work starts)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def check_device(name: str) -> None:
    """UserError unless ``name`` can run here."""
    if name == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"device {name!r} is not usable here: torch.cuda.is_available() is False "
                        f"(torch {torch.__version__}, {build})")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """``8G``, ``512M``, ``1.5g``, ``1000000`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 8G or 512M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_json_arg(text: str | None, what: str) -> dict | None:
    """``--config`` takes inline JSON or a path to a JSON file."""
    if text is None:
        return None
    p = Path(text)
    try:
        raw = p.read_text() if p.is_file() else text
        value = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: neither a JSON file nor valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: expected a JSON object")
    return value


# ------------------------------------------------------------------------------ outputs

def check_output(path: Path, force: bool, *, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output before any work: exists without --force, is a directory, is an input,
    or its directory is missing or not writable."""
    if len(path.name.encode()) > 255:
        raise UserError(f"output file name is too long ({len(path.name.encode())} bytes; the limit is 255)")
    if path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name")
    if any(_same(path, i) for i in inputs):
        raise UserError(f"output {path} is the input file; give another name")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output directory {parent} is not writable")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def os_error_message(e: OSError, path: Path) -> str:
    """One line for an OS error while writing ``path``."""
    reasons = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ENAMETOOLONG: "the file name is too long", errno.EDQUOT: "disk quota exceeded"}
    return f"cannot write {path}: {reasons.get(e.errno, e.strerror or str(e))}"


@contextmanager
def atomic_output(path: Path, force: bool, *, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    The temporary name is short (a long output name must not make it too long), it is removed
    on any exception (``cli.main`` turns SIGTERM/SIGHUP into one), and the final file gets the
    mode the umask allows (mkstemp would leave 0600).
    """
    check_output(path, force, inputs=inputs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vismlp-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(os_error_message(e, path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        raise UserError(os_error_message(e, path)) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
