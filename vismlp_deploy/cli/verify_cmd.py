"""``vismlp-deploy verify MODEL``: train form vs deploy form vs ONNX Runtime vs TensorRT, on random and real images."""
from __future__ import annotations

import argparse

from rich.table import Table

from ..errors import UserError, VerificationError
from ..verification.images import IMAGENET_MEAN, IMAGENET_STD
from ..precision import PRECISIONS
from .common import console, parse_json_arg, print_json


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The model argument shared by ``verify`` and ``bench``."""
    p.add_argument("model", help="checkpoint (.pth/.pt/.safetensors), deploy artifact (.deploy.pt), "
                                 ".onnx file, or a named config (random weights; see `zoo`)")
    p.add_argument("--arch", help="checkpoint format, e.g. timm-resmlp (default: detected)")
    p.add_argument("--config", help="constructor arguments as JSON or a JSON file (default: inferred from shapes)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling code; only for files you trust")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (named configs) and random inputs")


def source_from_args(args: argparse.Namespace):
    from ..runtime.source import load_source

    return load_source(args.model, arch=args.arch, config=parse_json_arg(args.config, "--config"), ema=args.ema,
                       trust_pickle=args.trust_pickle, seed=args.seed)


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)
    p.add_argument("--runners", default="train,deploy,onnxruntime",
                   help="comma-separated, first = reference: train, deploy, onnxruntime, tensorrt or BACKEND:FORM "
                        "(e.g. onnxruntime:train, torch-compile:deploy); default train,deploy,onnxruntime")
    p.add_argument("--images", default="default",
                   help="folder of real images, 'default' (scikit-image samples if installed, else matplotlib's), or 'none'")
    p.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, help="normalization mean R,G,B (default ImageNet)")
    p.add_argument("--std", type=_floats, default=IMAGENET_STD, help="normalization std R,G,B (default ImageNet)")
    p.add_argument("--batch", type=int, default=8, help="random images in the comparison (default 8)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="precision of the candidates")
    p.add_argument("--tolerance", type=float, help="max|y - ref| / max|ref| allowed (default by precision)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--bisect", action="store_true",
                   help="also compare train vs deploy at every shared block boundary and name the first that diverges")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    from ..verification.compare import input_sets, verify

    runners = tuple(r.strip() for r in args.runners.split(",") if r.strip())
    images = None if args.images == "none" else args.images
    with console.status("loading and re-parameterizing"):
        source = source_from_args(args)
    with console.status("running and comparing"):
        result = verify(source, runners, precision=args.precision, tolerance=args.tolerance, device=args.device,
                        batch=args.batch, seed=args.seed, images=images, mean=args.mean, std=args.std)
    doc = result.to_dict()
    bis = None
    if args.bisect:
        if source.train is None or source.deploy is None:
            raise UserError("--bisect compares the train and deploy forms: give a checkpoint or a named config")
        from ..verification.bisect import bisect

        x = input_sets(source.input_size, batch=args.batch, seed=args.seed, images=None)[0]["random"]
        bis = bisect(source.train, source.deploy, x, args.tolerance or PRECISIONS["fp32"].tolerance)
        doc["bisect"] = bis.to_dict()
    if args.json:
        print_json(doc)
    else:
        _print(result, bis)
    if not result.passed or (bis is not None and bis.first_divergent):
        raise VerificationError(_failure(result, bis))
    return 0


def _failure(result, bis) -> str:
    bad = [f"{c.candidate} on {c.inputs} (rel {c.stats.rel:.2e} > {c.tolerance:.0e})" for c in result.comparisons if not c.passed]
    if bis is not None and bis.first_divergent:
        bad.append(f"train and deploy forms first diverge at {bis.first_divergent}")
    return "; ".join(bad)


def _print(result, bis) -> None:
    for name, about in result.inputs.items():
        console.print(f"{name}: {about}")
    t = Table(title=f"{result.model}: each runner against {result.reference}")
    for col in ("runner", "inputs", "max abs", "mean abs", "median abs", "rel err", "max elem rel", "cosine",
                "top-1", "top-5", "min tol", "tol", "result"):
        t.add_column(col, justify="left" if col in ("runner", "inputs", "result") else "right")
    for c in result.comparisons:
        s = c.stats
        t.add_row(c.candidate, c.inputs, f"{s.max_abs:.2e}", f"{s.mean_abs:.2e}", f"{s.median_abs:.2e}", f"{s.rel:.2e}",
                  f"{s.max_elementwise_rel:.2e}", f"{s.cosine:.8f}", f"{s.top1:.0%}",
                  "–" if s.top5 is None else f"{s.top5:.0%}", f"{s.min_tolerance:.1e}", f"{c.tolerance:.0e}",
                  "[green]pass[/green]" if c.passed else "[red]FAIL[/red]")
    console.print(t)
    if bis is None:
        return
    bt = Table(title="bisection: deploy vs train at shared block boundaries")
    for col in ("boundary", "rel err", "cosine", "result"):
        bt.add_column(col)
    for b in bis.boundaries:
        if b.stats is None:
            bt.add_row(b.name, "–", "–", f"skipped: {b.note}")
        else:
            mark = "[red]diverged[/red]" if b.diverged else "ok"
            if b.name == bis.first_divergent:
                mark += " [bold red]<- first divergent[/bold red]"
            bt.add_row(b.name, f"{b.stats.rel:.2e}", f"{b.stats.cosine:.8f}", mark)
    console.print(bt)
    console.print(f"first divergent module: [bold]{bis.first_divergent}[/bold]" if bis.first_divergent
                  else "no persistent divergence between the forms")
