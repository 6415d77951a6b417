"""``vismlp-deploy`` command line. Thin: parse, call the API, print.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage (one readable line; the
traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import UserError, VerificationError
from rich.markup import escape

from .common import console

# subcommand module -> one line of help; each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "zoo": "list supported formats and named configs; --init writes a random checkpoint",
    "inspect": "show the detected architecture, config and what will be folded",
    "convert": "re-parameterize a checkpoint and export it (pt, onnx, trt) with an equivalence proof",
    "verify": "compare train form, deploy form, ONNX Runtime and TensorRT on random and real images",
    "bench": "images/s and latency per backend x form x batch x precision, against a measured GEMM peak",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: exit 2, one line
        self.print_usage(sys.stderr)
        console.print(f"[red]error:[/red] {escape(message)}")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vismlp-deploy", description="Exact re-parameterization and deployment of vision-MLP networks.")
    parser.add_argument("--version", action="version", version=f"vismlp-deploy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        mod = importlib.import_module(f"{__name__}.{name}_cmd")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (UserError, FileExistsError) as e:
        if args.debug:
            raise
        console.print(f"[red]error:[/red] {escape(str(e))}")
        return 2
    except VerificationError as e:
        if args.debug:
            raise
        console.print(f"[red]verification failed:[/red] {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
