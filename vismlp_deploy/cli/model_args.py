"""The MODEL argument every command takes, the options that say how to read it, and the loading step."""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

from ..runtime.source import Source, load_source
from .common import bounded_int, byte_size, input_size, parse_json_arg

MODEL_HELP = ("checkpoint (.pth/.pt/.bin/.safetensors), deploy artifact (.deploy.pt), .onnx file, "
              "or a named config (random weights; see `zoo`)")
SEED = bounded_int(0, 2**63 - 1)


def add_model_arguments(p: argparse.ArgumentParser, *, many: bool = False) -> None:
    """MODEL (or MODEL... with ``many``; globs are expanded) and how to read it."""
    p.add_argument("models" if many else "model", nargs="+" if many else None, metavar="MODEL",
                   help=MODEL_HELP + (" (several, or a glob)" if many else ""))
    g = p.add_argument_group("reading the model")
    g.add_argument("--arch", help="checkpoint format, e.g. timm-resmlp (default: detected; see `zoo`)")
    g.add_argument("--config", help="constructor arguments as JSON or a JSON file; a partial one overrides only the "
                                    "arguments it names, e.g. '{\"act_layer\": \"ReLU\"}' (default: inferred from "
                                    "shapes; for a named config: its own)")
    g.add_argument("--input-size", type=input_size, metavar="H[xW]",
                   help="input size to run and export at (channels come from the checkpoint); only where the "
                        "network allows it (default: the size the checkpoint or config records)")
    g.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling code (full pickled modules); only for files you trust")
    g.add_argument("--seed", type=SEED, default=0, help="seed of random weights (named configs) and random inputs")
    g.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                   help="refuse models whose estimated weights + activations exceed SIZE, e.g. 16G "
                        "(default: half the memory available)")


def model_specs(args: argparse.Namespace) -> list[str]:
    """The MODEL arguments, with globs the shell did not expand expanded (in order, no repeats)."""
    specs = args.models if hasattr(args, "models") else [args.model]
    out: list[str] = []
    for spec in specs:
        matches = sorted(glob.glob(spec)) if glob.has_magic(spec) and not Path(spec).exists() else [spec]
        out += [m for m in (matches or [spec]) if m not in out]
    return out


def load_model(args: argparse.Namespace, spec: str | Path) -> Source:
    """``spec`` resolved with the reading options of ``args``."""
    return load_source(spec, arch=args.arch, config=parse_json_arg(args.config, "--config"), ema=args.ema,
                       trust_pickle=args.trust_pickle, seed=args.seed, input_size=args.input_size,
                       max_memory=args.max_memory)


def check_batch_memory(args: argparse.Namespace, source: Source, batch: int) -> None:
    """UserError (with the estimate) if ``source``'s model at ``batch`` would not fit ``--max-memory``."""
    from ..models.footprint import check_footprint
    from ..models.registry import get_format

    model = source.train if source.train is not None else source._deploy
    if model is None or not getattr(model, "arch", None) or batch <= 1:
        return  # batch 1 was checked when the model was loaded; an ONNX file's inputs were checked too
    check_footprint(get_format(model.arch), model.config, tuple(source.input_size), batch=batch,
                    max_bytes=args.max_memory)
