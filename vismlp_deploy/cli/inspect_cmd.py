"""``vismlp-deploy inspect CKPT``: what the file is and what converting it will do."""
from __future__ import annotations

import argparse

from rich.table import Table

from ..checkpoint.detect import detect_format
from ..checkpoint.io import read_checkpoint
from ..reparam import reparameterize
from .common import console, print_json, parse_json_arg
from .load_args import add_checkpoint_arguments, load_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    with console.status("reading checkpoint"):
        ckpt = read_checkpoint(args.checkpoint, ema=args.ema, trust_pickle=args.trust_pickle)
        if args.arch:
            how = "given with --arch"
        elif ckpt.arch:
            how = "stored in the checkpoint's vismlp_deploy metadata"
        else:
            how = detect_format(ckpt.state_dict).how
        config_how = "given with --config" if args.config else ("stored in metadata" if ckpt.config else "inferred from tensor shapes")
    with console.status("building model and planning the re-parameterization"):
        model = load_from_args(args)
        deploy = reparameterize(model)
    report = deploy.reparam_report
    doc = {"checkpoint": str(args.checkpoint), "weights": ckpt.source, "arch": model.arch, "arch_detection": how,
           "config": model.config, "config_source": config_how, "input_size": list(model.input_size),
           "report": report.to_dict()}
    if parse_json_arg(args.config, "--config") is None and hasattr(model, "config_notes"):
        doc["notes"] = model.config_notes
    if args.json:
        print_json(doc)
        return 0
    console.print(f"[bold]{args.checkpoint}[/bold] ({ckpt.source})")
    console.print(f"architecture: [bold]{model.arch}[/bold] — {how}")
    console.print(f"config ({config_how}): {model.config}")
    for note in doc.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
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
        lt = Table(title="left in place")
        lt.add_column("module")
        lt.add_column("kind")
        lt.add_column("why")
        for x in report.left:
            lt.add_row(x.path, x.kind, x.reason)
        console.print(lt)
