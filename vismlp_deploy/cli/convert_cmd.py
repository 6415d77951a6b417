"""``vismlp-deploy convert CKPT --to pt|onnx|trt``: re-parameterize, export, prove."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import VerificationError
from ..export.torch_artifact import save_model
from ..reparam import reparameterize
from ..verify.proof import proof_inputs, proof_table, prove_stage
from .common import atomic_output, check_writable, console, print_json
from .inspect_cmd import _print_report
from .load_args import add_checkpoint_arguments, load_from_args

SUFFIX = {"pt": ".deploy.pt", "onnx": ".onnx", "trt": ".engine"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--to", choices=sorted(SUFFIX), default="pt", help="artifact to produce (default pt)")
    p.add_argument("--out", type=Path, help="output path (default: CKPT stem + .deploy.pt/.onnx/.engine)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--proof-batch", type=int, default=8, help="images in the equivalence proof batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the proof inputs")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def default_out(ckpt: Path, to: str) -> Path:
    stem = ckpt.name.split(".")[0]
    return ckpt.with_name(stem + SUFFIX[to])


def run(args: argparse.Namespace) -> int:
    out = args.out or default_out(args.checkpoint, args.to)
    check_writable(out, args.force)  # fail before any work
    timings: dict[str, float] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=args.json) as progress:
        def step(desc: str):
            return progress.add_task(desc, total=None)

        t0 = time.perf_counter()
        task = step("loading checkpoint")
        train = load_from_args(args)
        timings["load_s"] = time.perf_counter() - t0
        progress.remove_task(task)

        t0 = time.perf_counter()
        task = step("re-parameterizing")
        deploy = reparameterize(train)
        timings["reparameterize_s"] = time.perf_counter() - t0
        progress.remove_task(task)

        task = step("proving equivalence")
        x = proof_inputs(train.input_size, args.proof_batch, args.seed)
        import torch

        with torch.inference_mode():
            ref = train(x)
        proofs = [prove_stage("deploy (torch fp32)", deploy, x, ref)]
        progress.remove_task(task)

        if not all(p.passed for p in proofs):
            _print(args, out, train, deploy, proofs, timings, written=False)
            raise VerificationError("the deploy form does not reproduce the train form; nothing was written")

        task = step(f"writing {out}")
        deploy.arch, deploy.config, deploy.input_size = train.arch, train.config, train.input_size
        with atomic_output(out, args.force) as tmp:
            save_model(deploy, tmp, form="deploy", extra={"report": deploy.reparam_report.to_dict()})
        progress.remove_task(task)
    _print(args, out, train, deploy, proofs, timings, written=True)
    return 0


def _print(args, out, train, deploy, proofs, timings, written: bool) -> None:
    if args.json:
        print_json({"checkpoint": str(args.checkpoint), "arch": train.arch, "config": train.config,
                    "output": str(out) if written else None, "to": args.to,
                    "report": deploy.reparam_report.to_dict(), "proof": [p.to_dict() for p in proofs],
                    "passed": all(p.passed for p in proofs), "timings": timings})
        return
    console.print(f"[bold]{train.arch}[/bold] {train.config}")
    _print_report(deploy.reparam_report)
    console.print(proof_table(proofs))
    if written:
        console.print(f"wrote [bold]{out}[/bold] (reparameterized in {timings['reparameterize_s']:.2f} s)")
