"""``vismlp-deploy bench MODEL...``: images/s and latency per backend × form × batch × precision."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import UserError, VisMLPWarning
from ..precision import PRECISIONS
from ..runtime.backends import backends_help, get_backend
from .common import (
    bounded_int,
    check_device,
    check_output,
    console,
    device,
    int_list,
    live,
    name_list,
    nonnegative_int,
    positive_float,
    positive_int,
    print_json,
    print_table,
    say,
    status,
    styled,
)
from .model_args import add_model_arguments, check_batch_memory, load_model, model_specs

DEFAULTS = {"batch_sizes": (1, 8, 32), "repeats": 10, "max_time": 10.0, "warmup": 2}
BATCHES = bounded_int(1, 65536)


def add_timing_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The sweep options shared by ``bench`` and ``bench-zoo``."""
    p.add_argument("--backends", type=name_list,
                   help=f"comma-separated (default: the device's default backends that run here). {backends_help()}")
    p.add_argument("--batch-sizes", type=int_list, metavar="N,N,...",
                   help=f"comma-separated, each 1..65536 (default {','.join(map(str, defaults['batch_sizes']))})")
    p.add_argument("--precision", type=name_list, default=("fp32",),
                   help=f"comma-separated subset of {', '.join(PRECISIONS)} (default fp32)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch and ONNX Runtime (default: torch's)")
    p.add_argument("--warmup", type=nonnegative_int, default=defaults["warmup"],
                   help=f"warm-up calls per form (default {defaults['warmup']})")
    p.add_argument("--repeats", type=bounded_int(1, 100000), default=defaults["repeats"],
                   help=f"interleaved timed rounds (default {defaults['repeats']})")
    p.add_argument("--max-time", type=positive_float, default=defaults["max_time"],
                   help="seconds after which a group stops repeating "
                        f"(at least 3 rounds; default {defaults['max_time']})")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA torch runners: time CUDA graph replays")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, many=True)
    p.epilog = ("examples:\n  vismlp-deploy bench resmlp_12 --backends torch,onnxruntime --batch-sizes 1,8\n"
                "  vismlp-deploy bench model.pth --precision fp32,int8 --backends onnxruntime --csv b.csv --png b.png")
    add_timing_arguments(p, DEFAULTS)
    p.add_argument("--csv", type=Path, help="write one CSV row per measurement")
    p.add_argument("--png", type=Path, help="write a plot of images/s vs batch size")


def sweep_settings(args: argparse.Namespace, defaults: dict = DEFAULTS) -> dict:
    """SweepConfig fields from the options, checked before any work: every backend and precision exists,
    the device is usable, and each asked-for backend can run at least one asked-for precision here."""
    check_device(args.device)
    for p in args.precision:
        if p not in PRECISIONS:
            raise UserError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    for b in args.backends or ():
        backend = get_backend(b)
        if all(backend.why_not(args.device, p) for p in args.precision):
            raise UserError(f"backend {b} cannot run here: {backend.why_not(args.device, args.precision[0])}")
    if args.repeats == 1:
        warnings.warn("--repeats 1: one sample per form, so the spread and the ratio quartiles mean nothing",
                      VisMLPWarning, stacklevel=1)
    return {"backends": args.backends, "batch_sizes": args.batch_sizes or defaults["batch_sizes"],
            "precisions": args.precision, "device": args.device, "threads": args.threads, "warmup": args.warmup,
            "repeats": args.repeats, "max_time_s": args.max_time, "cuda_graphs": args.cuda_graphs}


def progress_bar(json: bool) -> Progress:
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True, disable=not live(json))


def step_callback(progress: Progress):
    """``on_step(description, total)`` for the sweep: one bar, advanced before each measured group."""
    task = None

    def on_step(desc: str, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(desc, total=total)
        else:
            progress.advance(task)
        progress.update(task, description=desc)
    return on_step


def run(args: argparse.Namespace) -> int:
    from ..benchmark.sweep import SweepConfig, run_sweep

    settings = sweep_settings(args)
    for path in (args.csv, args.png):
        if path is not None:
            check_output(path, args.force)
    with status("loading"):
        sources = [load_model(args, spec) for spec in model_specs(args)]
        for source in sources:
            check_batch_memory(args, source, max(settings["batch_sizes"]))
    with progress_bar(args.json) as progress:
        result = run_sweep(sources, SweepConfig(seed=args.seed, **settings), len(sources), step_callback(progress))
    write_outputs(result, args.csv, args.png, args.force)
    if args.json:
        print_json(result.to_dict())
    else:
        print_result(result)
    return 0


def write_outputs(result, csv: Path | None, png: Path | None, force: bool) -> None:
    from ..benchmark.report import write_csv, write_png
    from .common import atomic_output

    for path, write in ((csv, write_csv), (png, write_png)):
        if path is not None:
            with atomic_output(path, force) as tmp:
                write(result, tmp)


def print_result(result) -> None:
    ratios = result.ratio_index()
    peaks = ", ".join(f"{p} {pk.gflops:.1f}" for p, pk in result.peaks.items())
    t = Table(title=f"images/s ({result.machine.get('gpu') or result.machine.get('cpu')}, "
                    f"{result.machine.get('threads')} threads; GEMM peak GFLOP/s: {peaks})")
    for col in ("model", "backend", "prec", "batch", "form", "images/s", "p50 ms", "p90 ms", "p99 ms", "spread",
                "GFLOP/s", "% peak", "deploy/train"):
        t.add_column(col, justify="left" if col in ("model", "backend", "prec", "form") else "right")
    for r in result.records:
        ratio = ratios.get((r.model, r.backend, r.batch, r.precision)) if r.form == "deploy" else None
        lat = r.latency_ms
        t.add_row(r.model, r.backend, r.precision, str(r.batch), r.form, f"{r.images_per_sec:.1f}",
                  f"{lat['median']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r.spread:.1%}",
                  "–" if r.gflops_per_sec is None else f"{r.gflops_per_sec:.1f}",
                  "–" if r.fraction_of_peak is None else f"{r.fraction_of_peak:.0%}",
                  "" if ratio is None else f"{ratio.deploy_over_train:.2f}x")
    print_table(t)
    for s in result.skipped:
        say(styled("skipped ", "yellow"), f"{s.model} {s.backend} {s.precision} {s.form}"
            f"{'' if s.batch is None else f' batch {s.batch}'}: {s.reason}")

