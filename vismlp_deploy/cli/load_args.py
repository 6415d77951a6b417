"""Checkpoint arguments shared by convert/inspect/verify/bench, and the loading step."""
from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..checkpoint.load import load_checkpoint
from .common import parse_json_arg


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="checkpoint (.pth/.pt/.safetensors), a plain or wrapped state_dict")
    p.add_argument("--arch", help="checkpoint format, e.g. timm-resmlp (default: detected; see `zoo`)")
    p.add_argument("--config", help="constructor arguments as JSON or a JSON file (default: inferred from shapes)")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a training checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling code (full pickled modules); only for files you trust")


def load_from_args(args: argparse.Namespace) -> nn.Module:
    return load_checkpoint(args.checkpoint, arch=args.arch, config=parse_json_arg(args.config, "--config"),
                           ema=args.ema, trust_pickle=args.trust_pickle)
