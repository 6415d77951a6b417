"""``vismlp-deploy inspect CKPT``: what the file is and what converting it will do."""
from __future__ import annotations

import argparse
import re

from rich.markup import escape
from rich.table import Table

from ..reparam import reparameterize
from .common import console, print_json
from .load_args import add_checkpoint_arguments, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    with console.status("reading checkpoint, detecting, planning the re-parameterization"):
        model = load_from_args(args, announce=False)
        deploy = reparameterize(model)
    info = model.checkpoint_info
    report = deploy.reparam_report
    doc = {"checkpoint": str(args.checkpoint), "weights": info.weights, "container": info.container,
           "stripped_prefixes": info.stripped, "arch": model.arch, "named_config": info.named,
           "detected_as": info.label, "confidence": info.confidence, "arch_detection": info.how,
           "config": model.config, "config_source": info.config_source, "notes": info.notes,
           "input_size": list(model.input_size), "report": report.to_dict()}
    if args.json:
        print_json(doc)
        return 0
    strip = f", prefix {'+'.join(info.stripped)} removed" if info.stripped else ""
    console.print(f"[bold]{args.checkpoint}[/bold] ({info.container}; weights: {info.weights}{strip})")
    console.print(f"detected as [bold]{info.label}[/bold] — confidence {info.confidence}")
    console.print(f"how: {info.how}", markup=False)
    console.print(f"config ({info.config_source}): {model.config}", markup=False)
    for note in info.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    console.print(f"input size: {'x'.join(map(str, model.input_size))}")
    _print_report(report)
    return 0


def _print_report(report) -> None:
    flops = ""
    if report.flops_before:
        flops = f", GFLOPs {report.flops_before / 1e9:.3f} -> {report.flops_after / 1e9:.3f}"
    console.print(f"parameters {report.params_before:,} -> {report.params_after:,}{flops}")
    t = Table(title="exact folds")
    t.add_column("kind")
    t.add_column("count", justify="right")
    for kind, n in sorted(report.folded.items()):
        t.add_row(kind, str(n))
    console.print(t)
    if report.left:
        # blocks.0.x … blocks.11.x with the same reason read as one row: blocks.*.x (×12)
        groups: dict[tuple[str, str, str], int] = {}
        for x in report.left:
            key = (re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", x.path), x.kind, x.reason)
            groups[key] = groups.get(key, 0) + 1
        lt = Table(title="left in place (--json lists every module)")
        lt.add_column("module")
        lt.add_column("kind")
        lt.add_column("why")
        for (path, kind, reason), n in groups.items():
            lt.add_row(f"{path} (×{n})" if n > 1 else path, kind, reason)
        console.print(lt)
