"""``vismlp-deploy verify MODEL``: judge runners (train, deploy, ONNX Runtime, TensorRT …) against a reference."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from ..errors import UserError, VerificationError
from ..precision import PRECISIONS
from ..runtime.backends import backends_help
from .common import (
    atomic_output,
    bounded_int,
    check_device,
    check_output,
    device,
    name_list,
    nonnegative_float,
    print_json,
    print_table,
    say,
    status,
    styled,
)
from .convert_cmd import add_calibration_arguments
from .model_args import add_model_arguments, check_batch_memory, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.epilog = ("examples:\n  vismlp-deploy verify resmlp_12.pth\n"
                "  vismlp-deploy verify model.onnx --against model.pth --atol 1e-5 --rtol 1e-5\n"
                "  vismlp-deploy verify model.pth --runners train,deploy,onnxruntime:train --bisect\n"
                "  vismlp-deploy verify model.pth --precision int8 --calib images/ --images images/")
    p.add_argument("--runners", type=name_list,
                   help="comma-separated, the first is the reference (with --against: all are candidates): train, "
                        "deploy, a backend (its deploy form) or BACKEND:FORM. Default: train, then the deploy form on "
                        f"every default backend that runs here. Backends: {backends_help()}")
    p.add_argument("--against", metavar="CHECKPOINT",
                   help="judge MODEL (an .onnx file, a deploy artifact) against this checkpoint's train form")
    p.add_argument("--images", default="default",
                   help="folder of real images, 'default' (scikit-image samples if installed, else matplotlib's), "
                        "or 'none'")
    p.add_argument("--proof-batch", type=bounded_int(1, 4096), default=8, help="random images (default 8)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="precision of the candidates "
                                                                                  "(the reference runs fp32)")
    p.add_argument("--tolerance", type=nonnegative_float,
                   help="max|y - ref| / max|ref| allowed (default: the precision's)")
    p.add_argument("--atol", type=nonnegative_float, help="element-wise absolute tolerance (Polygraphy's: an element "
                                                          "fails only if it exceeds both --atol and --rtol)")
    p.add_argument("--rtol", type=nonnegative_float, help="element-wise relative tolerance (see --atol)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--bisect", action="store_true",
                   help="also compare train vs deploy at every shared block boundary and name the first that diverges")
    p.add_argument("--save-inputs", type=Path, metavar="NPZ", help="write the input sets to an .npz")
    p.add_argument("--load-inputs", type=Path, metavar="NPZ", help="run on the input sets of an .npz instead")
    p.add_argument("--save-outputs", type=Path, metavar="NPZ", help="write every runner's outputs to an .npz")
    p.add_argument("--force", action="store_true", help="overwrite existing --save-* files")
    add_calibration_arguments(p, guard=False)


def run(args: argparse.Namespace) -> int:
    from ..verification.compare import verify
    from ..verification.inputs import save_npz

    check_device(args.device)
    for path in (args.save_inputs, args.save_outputs):
        if path is not None:
            check_output(path, args.force)
    with status("loading and re-parameterizing"):
        source = load_model(args, args.model)
        check_batch_memory(args, source, args.proof_batch)
        against = load_model(args, args.against) if args.against else None
        calibration = _calibration(args, source)
    with status("running and comparing"):
        result = verify(source, args.runners, against=against, precision=args.precision, tolerance=args.tolerance,
                        atol=args.atol, rtol=args.rtol, device=args.device, batch=args.proof_batch, seed=args.seed,
                        images=None if args.images == "none" else args.images, mean=args.mean, std=args.std,
                        load_inputs=args.load_inputs, calibration=calibration,
                        keep_outputs=args.save_outputs is not None)
    for path, arrays in ((args.save_inputs, result.input_arrays), (args.save_outputs, result.outputs)):
        if path is not None:
            with atomic_output(path, args.force) as tmp:
                save_npz(tmp, arrays)
    doc = result.to_dict()
    bis = _bisect(args, source, result) if args.bisect else None
    if bis is not None:
        doc["bisect"] = bis.to_dict()
    if args.json:
        print_json(doc)
    else:
        _print(result, bis)
    if not result.passed or (bis is not None and bis.first_divergent):
        raise VerificationError(_failure(result, bis))
    return 0


def _calibration(args: argparse.Namespace, source):
    if args.precision != "int8" or args.calib is None:
        return None
    from ..calibration import load_calibration

    calib, _ = load_calibration(args.calib, source.input_size, args.calib_count, args.mean, args.std)
    return calib


def _bisect(args: argparse.Namespace, source, result):
    from ..precision import get_precision
    from ..verification.bisect import bisect

    if source.train is None or source.deploy is None:
        raise UserError("--bisect compares the train and deploy forms: give a checkpoint or a named config")
    x = result.input_arrays.get("random")
    if x is None:
        x = next(iter(result.input_arrays.values()))
    return bisect(source.train, source.deploy, x, args.tolerance or get_precision("fp32").tolerance)


def _failure(result, bis) -> str:
    bad = [f"{c.candidate} on {c.inputs} ({'; '.join(c.failures)})" for c in result.comparisons if not c.passed]
    if not result.comparisons:
        bad.append("nothing was compared")
    if bis is not None and bis.first_divergent:
        bad.append(f"train and deploy forms first diverge at {bis.first_divergent}")
    return "; ".join(bad)


def _print(result, bis) -> None:
    for name, about in result.inputs.items():
        say(f"{name}: {about}")
    t = Table(title=f"{result.model}: each runner against {result.reference}")
    for col in ("runner", "prec", "inputs", "max abs", "mean abs", "rel err", "cosine", "SQNR dB", "top-1", "top-5",
                "min tol", "tol", "result"):
        t.add_column(col, justify="left" if col in ("runner", "prec", "inputs", "result") else "right")
    for c in result.comparisons:
        s = c.stats
        t.add_row(c.candidate, c.precision, c.inputs, f"{s.max_abs:.2e}", f"{s.mean_abs:.2e}", f"{s.rel:.2e}",
                  f"{s.cosine:.8f}", f"{s.sqnr_db:.1f}", f"{s.top1:.0%}", "–" if s.top5 is None else f"{s.top5:.0%}",
                  f"{s.min_tolerance:.1e}", f"{c.tolerance:g}",
                  styled("pass", "green") if c.passed else styled("FAIL: " + "; ".join(c.failures), "red"))
    print_table(t)
    if bis is None:
        return
    bt = Table(title="bisection: deploy vs train at shared block boundaries")
    for col in ("boundary", "rel err", "cosine", "result"):
        bt.add_column(col)
    for b in bis.boundaries:
        if b.stats is None:
            bt.add_row(b.name, "–", "–", f"skipped: {b.note}")
            continue
        if b.persistent:
            mark = styled("diverged" + (" <- first divergent" if b.name == bis.first_divergent else ""), "bold red")
        elif b.diverged:
            mark = styled(f"differs, recovers: {b.note}", "yellow")
        else:
            mark = "ok"
        bt.add_row(b.name, f"{b.stats.rel:.2e}", f"{b.stats.cosine:.8f}", mark)
    print_table(bt)
    if bis.first_divergent:
        say("first divergent module: ", styled(bis.first_divergent, "bold"))
    elif any(b.diverged for b in bis.boundaries):
        say("no persistent divergence: the boundaries that differ agree again later (folds across them)")
    else:
        say("no divergence at any boundary")
