"""``vismlp-deploy bench-zoo``: every named config (or a subset), train form against deploy form, with a report."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..errors import UserError
from .bench_cmd import add_timing_arguments, print_result, progress_bar, step_callback, sweep_settings
from .common import atomic_output, check_output, name_list, positive_int, print_json, say
from .model_args import SEED

# a 2-core CPU: ONNX Runtime and eager torch, fp32, batch 8, a capped measuring time
DEFAULTS = {"backends": ("onnxruntime", "torch"), "batch_sizes": (8,), "repeats": 20, "max_time": 2.0, "warmup": 1}
FILES = ("benchmarks.md", "benchmarks.csv", "benchmarks.png")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Writes benchmarks.md (machine, versions, command, results), benchmarks.csv and benchmarks.png into "
                "--out-dir. Weights are random (randomize_), which does not change the speed; every ONNX file is "
                "exported first, by --export-workers processes, so the timing runs alone.\n\nexamples:\n"
                "  vismlp-deploy bench-zoo --families resmlp,mixer\n"
                "  vismlp-deploy bench-zoo --models resmlp_12,convmixer_768_32 --batch-sizes 1,8 --out-dir zoo")
    add_timing_arguments(p, DEFAULTS)
    p.set_defaults(backends=DEFAULTS["backends"])
    p.add_argument("--families", type=name_list, help="comma-separated families (default all; see `zoo`)")
    p.add_argument("--models", type=name_list, help="comma-separated named configs (default all of --families)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights and inputs")
    p.add_argument("--export-workers", type=positive_int,
                   help="processes that export the ONNX files before the timing (default: the CPU count, at most 4)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-zoo"),
                   help="where the report goes (default ./bench-zoo, made if missing)")


def selected_names(families: tuple[str, ...] | None, models: tuple[str, ...] | None) -> list[str]:
    from ..benchmark.run import zoo_names

    names = zoo_names(list(families) if families else None)
    if not names:
        raise UserError(f"no named configs in families {', '.join(families or ())}; `zoo` lists the families")
    if models:
        unknown = [m for m in models if m not in names]
        if unknown:
            raise UserError(f"unknown or filtered-out named configs: {', '.join(unknown)}")
        names = list(models)
    return names


def run(args: argparse.Namespace) -> int:
    from ..benchmark.run import bench_zoo, zoo_names

    settings = sweep_settings(args, DEFAULTS)
    names = selected_names(args.families, args.models)
    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out} is not a directory")
    if not out.parent.is_dir():
        raise UserError(f"the parent of --out-dir {out} does not exist")
    for name in FILES:
        if out.is_dir():
            check_output(out / name, args.force)
    with progress_bar(args.json) as progress:
        exported = progress.add_task("exporting ONNX (both forms)", total=len(names)) if not args.json else None
        result = bench_zoo(names, seed=args.seed, on_step=step_callback(progress), export_workers=args.export_workers,
                           on_export=lambda name, total: progress.advance(exported) if exported is not None else None,
                           **settings)
    out.mkdir(exist_ok=True)
    command = ("vismlp-deploy " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench-zoo"]
               else "vismlp-deploy bench-zoo")
    write_report(result, out, command, everything=len(names) == len(zoo_names()), force=args.force)
    if args.json:
        print_json(result.to_dict())
    else:
        print_result(result)
        say(f"wrote {out / FILES[0]}, {FILES[1]}, {FILES[2]}")
    return 0


def write_report(result, out: Path, command: str, *, everything: bool, force: bool,
                 targets: list[str] | None = None) -> None:
    """benchmarks.md/.csv/.png of a zoo sweep into ``out`` (``targets``: markdown lines of a project's own targets)."""
    from ..benchmark.report import write_csv, write_markdown, write_png

    what = "Every named config of every family" if everything else "The named configs listed in the command below"
    intro = [f"{what}, train form against deploy form, measured by `bench-zoo` on the machine below. Weights are "
             "random (`randomize_`), which does not change the speed.", ""]
    if not result.machine.get("gpu"):
        intro += ["CUDA paths (CUDA-event timing, `--cuda-graphs` via `torch.cuda.CUDAGraph`, TensorRT) exist "
                  "but were not run for this report (no GPU).", ""]
    with atomic_output(out / FILES[1], force) as tmp:
        write_csv(result, tmp)
    with atomic_output(out / FILES[2], force) as tmp:
        write_png(result, tmp)
    with atomic_output(out / FILES[0], force) as tmp:
        write_markdown(result, tmp, command=command, csv_name=FILES[1], png_name=FILES[2], intro=intro, targets=targets)
