"""Checkpoint arguments shared by convert/inspect/verify/bench, and the loading step."""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..checkpoint.load import load_checkpoint
from .common import console, parse_json_arg


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint (.pth/.pt/.bin/.safetensors), a plain or wrapped state_dict")
    p.add_argument("--arch", help="checkpoint format, e.g. timm-resmlp (default: detected; see `zoo`)")
    p.add_argument("--config", help="constructor arguments as JSON or a JSON file; a partial one overrides only "
                                    "the arguments it names, e.g. '{\"act_layer\": \"ReLU\"}' (default: inferred from shapes)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling code (full pickled modules); only for files you trust")


def load_from_args(args: argparse.Namespace, announce: bool = True) -> nn.Module:
    """Load the train model; unless ``--json``/``announce=False``, say what was loaded (stderr)."""
    model = load_checkpoint(args.checkpoint, arch=args.arch, config=parse_json_arg(args.config, "--config"),
                            ema=args.ema, trust_pickle=args.trust_pickle)
    if announce and not getattr(args, "json", False):
        console.print(f"loaded {model.checkpoint_info.summary()}", markup=False)
        for note in model.checkpoint_info.notes:
            console.print(f"note: {note}", markup=False)
    return model
