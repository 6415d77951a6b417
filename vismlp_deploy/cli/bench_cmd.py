"""``vismlp-deploy bench MODEL|zoo``: images/s and latency per backend × form × batch × precision."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import UserError
from .common import console, print_json
from .verify_cmd import add_source_arguments, source_from_args

# `bench zoo` on a 2-core CPU: ONNX Runtime and eager torch, fp32, the batches the targets are stated at
# (8: deploy/train ratios for every config; 16 in addition for the models of the GEMM-peak target),
# 3 rounds minimum and a capped measuring time
ZOO_DEFAULTS = {"backends": "onnxruntime,torch", "batch_sizes": "8", "repeats": 20, "max_time": 2.0, "warmup": 1}
DEFAULTS = {"backends": "torch,torch-compile,onnxruntime,tensorrt", "batch_sizes": "1,8,32", "repeats": 10,
            "max_time": 10.0, "warmup": 2}


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.epilog = ("MODEL 'zoo' sweeps every named config (--families to narrow) and writes benchmarks.md/.csv/.png "
                f"into --out-dir; its defaults: {ZOO_DEFAULTS}, plus batch 16 for the models of the GEMM-peak "
                "target unless --batch-sizes is given")
    p.add_argument("--backends", help=f"comma-separated subset of torch,torch-compile,onnxruntime,tensorrt "
                                      f"(default {DEFAULTS['backends']}; what cannot run here is reported as skipped)")
    p.add_argument("--batch-sizes", type=_ints, help=f"comma-separated (default {DEFAULTS['batch_sizes']})")
    p.add_argument("--precision", default="fp32", help="comma-separated subset of fp32,fp16,bf16 (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: torch's current count)")
    p.add_argument("--warmup", type=int, help=f"warm-up calls per form (default {DEFAULTS['warmup']})")
    p.add_argument("--repeats", type=int, help=f"interleaved timed rounds (default {DEFAULTS['repeats']})")
    p.add_argument("--max-time", type=float, help="seconds after which a group stops repeating (at least 3 rounds; "
                                                  f"default {DEFAULTS['max_time']})")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA torch runners: time CUDA graph replays")
    p.add_argument("--families", help="zoo: comma-separated families (default all)")
    p.add_argument("--models", help="zoo: comma-separated named configs (default all of --families)")
    p.add_argument("--export-workers", type=int, help="zoo: processes that export the ONNX files before the timing "
                                                      "starts (default: the CPU count, at most 4)")
    p.add_argument("--out-dir", type=Path, default=Path("docs"), help="zoo: where benchmarks.md/.csv/.png go (default docs)")
    p.add_argument("--csv", type=Path, help="write one CSV row per measurement")
    p.add_argument("--png", type=Path, help="write a plot of images/s vs batch size")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _settings(args: argparse.Namespace, zoo: bool) -> dict:
    d = ZOO_DEFAULTS if zoo else DEFAULTS
    precisions = tuple(x.strip() for x in args.precision.split(",") if x.strip())
    bad = [x for x in precisions if x not in ("fp32", "fp16", "bf16")]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r}; choose from fp32, fp16, bf16")
    backends = tuple(x.strip() for x in (args.backends or d["backends"]).split(",") if x.strip())
    from ..runtime.factory import BACKENDS

    if any(b not in BACKENDS for b in backends):
        raise UserError(f"unknown backend in {','.join(backends)}; choose from {', '.join(BACKENDS)}")
    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise UserError(f"device {args.device!r} is not usable here (torch.cuda.is_available() is "
                            f"{torch.cuda.is_available()})")
    return {"backends": backends, "batch_sizes": args.batch_sizes or _ints(d["batch_sizes"]), "precisions": precisions,
            "device": args.device, "threads": args.threads, "warmup": d["warmup"] if args.warmup is None else args.warmup,
            "repeats": args.repeats or d["repeats"], "max_time_s": args.max_time or d["max_time"],
            "cuda_graphs": args.cuda_graphs}


def run(args: argparse.Namespace) -> int:
    from ..benchmark.run import bench_zoo, zoo_names
    from ..benchmark.sweep import SweepConfig, run_sweep

    zoo = args.model == "zoo" and not Path("zoo").exists()
    settings = _settings(args, zoo)
    if zoo:
        families = [f.strip() for f in args.families.split(",")] if args.families else None
        names = zoo_names(families)
        if args.models:
            wanted = [m.strip() for m in args.models.split(",") if m.strip()]
            unknown = [m for m in wanted if m not in names]
            if unknown:
                raise UserError(f"unknown or filtered-out named configs: {', '.join(unknown)}")
            names = wanted
        if not names:
            raise UserError(f"no named configs in families {args.families}")
        if not args.out_dir.is_dir():
            raise UserError(f"output directory {args.out_dir} does not exist")
        if not args.batch_sizes:
            from ..benchmark.targets import PEAK_BATCH, PEAK_MODELS

            settings["extra_batch_sizes"] = {m: (PEAK_BATCH,) for m in PEAK_MODELS if m in names}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        export_task = measure_task = None

        def on_export(name: str, total: int) -> None:  # after each model's two exports
            nonlocal export_task
            if export_task is None:
                export_task = progress.add_task("exporting", total=total)
            progress.update(export_task, advance=1, description=f"exported {name} (ONNX, both forms)")

        def on_step(desc: str, total: int) -> None:  # before each measured group
            nonlocal measure_task
            if measure_task is None:
                measure_task = progress.add_task(desc, total=total)
            else:
                progress.advance(measure_task)
            progress.update(measure_task, description=desc)

        if zoo:
            result = bench_zoo(names, seed=args.seed, on_step=on_step, export_workers=args.export_workers,
                               on_export=on_export, **settings)
        else:
            source = source_from_args(args)
            result = run_sweep([source], SweepConfig(seed=args.seed, **settings), 1, on_step)
    if zoo:
        _write_zoo(result, args.out_dir, len(names) == len(zoo_names()), "vismlp-deploy " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                   else f"vismlp-deploy bench zoo --precision {args.precision}")
    _write_outputs(result, args.csv, args.png)
    if args.json:
        print_json(result.to_dict())
    else:
        _print(result)
    return 0


def _write_outputs(result, csv: Path | None, png: Path | None) -> None:
    from ..benchmark.report import write_csv, write_png

    if csv:
        write_csv(result, csv)
    if png:
        write_png(result, png)


def _write_zoo(result, out_dir: Path, everything: bool, command: str) -> None:
    from ..benchmark.report import write_csv, write_markdown, write_png
    from ..benchmark.targets import target_lines

    write_csv(result, out_dir / "benchmarks.csv")
    write_png(result, out_dir / "benchmarks.png")
    what = "Every named config of every family" if everything else "The named configs listed in the command below"
    intro = [f"{what}, train form against deploy form, measured by `bench zoo` on the machine below. Weights are "
             "random (`randomize_`), which does not change the speed.", ""]
    if not result.machine.get("gpu"):
        intro += ["CUDA paths (CUDA-event timing, `--cuda-graphs` via `torch.cuda.CUDAGraph`, TensorRT) exist "
                  "but were not run for this report (no GPU).", ""]
    write_markdown(result, out_dir / "benchmarks.md", command=command, csv_name="benchmarks.csv",
                   png_name="benchmarks.png", intro=intro, targets=target_lines(result))
    console.print(f"wrote {out_dir / 'benchmarks.md'}, benchmarks.csv, benchmarks.png")


def _print(result) -> None:
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
        t.add_row(r.model, r.backend, r.precision, str(r.batch), r.form, f"{r.images_per_sec:.1f}", f"{lat['median']:.2f}",
                  f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{r.spread:.1%}",
                  "–" if r.gflops_per_sec is None else f"{r.gflops_per_sec:.1f}",
                  "–" if r.fraction_of_peak is None else f"{r.fraction_of_peak:.0%}",
                  "" if ratio is None else f"{ratio.deploy_over_train:.2f}x")
    console.print(t)
    for s in result.skipped:
        console.print(f"[yellow]skipped[/yellow] {s.model} {s.backend} {s.precision} {s.form}"
                      f"{'' if s.batch is None else f' batch {s.batch}'}: {s.reason}")
