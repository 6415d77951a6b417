"""``vismlp-deploy`` command line. Thin: parse, call the API, print.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage (one readable line), 3 an
internal error (a bug: one line, the traceback with ``--debug``), 130/143 interrupted or
terminated. ``--debug``, ``--json``, ``-q`` and ``-v`` go before or after the subcommand.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
import warnings

from rich.text import Text

from .. import __version__
from ..errors import UserError, VerificationError, VisMLPWarning
from .common import VERBOSITY, console

# subcommand -> (module, one line of help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "zoo": ("zoo_cmd", "list formats and named configs (params, GFLOPs); --init writes a random checkpoint"),
    "inspect": ("inspect_cmd", "what a model is and what converting it will fold, leave, and why"),
    "convert": ("convert_cmd",
                "re-parameterize and export (pt, onnx, trt), proving every stage against the train form"),
    "verify": ("verify_cmd", "judge runners (train, deploy, ONNX Runtime, TensorRT …) against a reference"),
    "bench": ("bench_cmd", "images/s and latency per backend x form x batch x precision, against a measured GEMM peak"),
    "bench-zoo": ("bench_zoo_cmd", "bench every named config (train vs deploy) and write a report"),
}

EPILOG = """\
MODEL is a checkpoint (.pth/.pt/.bin/.safetensors: official, timm or this package's), a deploy
artifact (.deploy.pt), an .onnx file, or a named config (random weights; see `zoo`).

examples:
  vismlp-deploy zoo
  vismlp-deploy inspect resmlp_12.pth
  vismlp-deploy convert resmlp_12.pth --to onnx
  vismlp-deploy convert runs/*.pth --to onnx --input-size 32 --force
  vismlp-deploy convert model.pth --to onnx --precision int8 --calib calib_images/
  vismlp-deploy convert model.pth --to trt --precision fp16 --dynamic-batch 1:8:32
  vismlp-deploy verify model.onnx --against model.pth --atol 1e-5 --rtol 1e-5
  vismlp-deploy bench resmlp_12 --backends torch,onnxruntime --batch-sizes 1,8 --json

exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error, 130 interrupted
"""


class Terminated(BaseException):
    """SIGTERM/SIGHUP, raised in the main thread so that every ``finally`` removes its temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: exit 2, one line
        console.print(Text.assemble(("error: ", "red"), f"{message} (see `{self.prog} --help`)"))
        sys.exit(2)


def _global_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings", **d)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout", **d)
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors (and the JSON document)", **d)
    p.add_argument("-v", "--verbose", action="store_true", help="print more detail (and third-party warnings)", **d)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vismlp-deploy", allow_abbrev=False, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     description="Exact re-parameterization and deployment of vision-MLP networks.")
    parser.add_argument("--version", action="version", version=f"vismlp-deploy {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"{__name__}.{module}")
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _global_options(p, suppress=True)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    VERBOSITY["level"] = -1 if args.quiet else (1 if args.verbose else 0)
    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = _run(args)
        _print_warnings(caught, args, code)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def _run(args: argparse.Namespace) -> int:
    """The one exception boundary: known errors are bad input (2) or failed verification (1);
    anything else is a bug (3). ``--debug`` adds the traceback and keeps the exit code."""
    try:
        return args._run(args)
    except (UserError, FileExistsError) as e:
        return _fail(args, 2, "error: ", e)
    except MemoryError as e:
        return _fail(args, 2, "error: ", f"out of memory ({e or 'allocation failed'}); see --max-memory")
    except VerificationError as e:
        return _fail(args, 1, "verification failed: ", e)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Terminated as e:
        console.print(f"terminated by signal {e.signum}; partial outputs removed")
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001 - the boundary: a bug, said in one line
        return _fail(args, 3, "internal error: ", f"{type(e).__name__}: {_first_line(e)} (run with --debug for the "
                                                  "traceback, and please report it)")


def _fail(args: argparse.Namespace, code: int, label: str, message) -> int:
    if args.debug:
        traceback.print_exc(file=sys.stderr)
    console.print(Text.assemble((label, "red"), _first_line(message) if not isinstance(message, str) else message))
    return code


def _first_line(e) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _print_warnings(caught: list[warnings.WarningMessage], args: argparse.Namespace, code: int) -> None:
    """This package's warnings as ``warning:`` lines (unless -q, or the command failed: then the
    error is the one line); other libraries' warnings only with -v/--debug."""
    for w in caught:
        ours = issubclass(w.category, VisMLPWarning)
        if (ours and code == 0 and not args.quiet) or args.verbose or args.debug:
            console.print(Text.assemble(("warning: ", "yellow"), _first_line(w.message)))
