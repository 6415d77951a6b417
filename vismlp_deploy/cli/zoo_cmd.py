"""``vismlp-deploy zoo``: list formats and named configs; ``--init NAME`` writes a random checkpoint of one."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from ..errors import UserError
from ..export.torch_artifact import save_model
from ..models.cost import config_cost
from ..models.init import randomize_
from ..models.registry import configs, create_model, formats, get_config
from ..reparam.report import count_params
from .common import atomic_output, input_size, print_json, print_table, say, status
from .model_args import SEED


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = "examples:\n  vismlp-deploy zoo\n  vismlp-deploy zoo --init resmlp_12 --set num_classes=10 --out r12.pth"
    p.add_argument("--init", metavar="NAME", help="write a randomly initialised checkpoint of this named config")
    p.add_argument("--out", type=Path, help="output path for --init (default NAME.pth)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random weights and norm statistics")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a constructor argument of --init's config, e.g. --set num_classes=10 (JSON values)")
    p.add_argument("--input-size", type=input_size, metavar="H[xW]", help="--init: build for this input size")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    if args.init:
        return _init(args)
    if args.set or args.out or args.input_size:
        raise UserError("--set, --out and --input-size go with --init NAME")
    rows = []
    with status("counting parameters and FLOPs (meta tensors)"):
        costs = {c.name: config_cost(c.format, c.config) for c in configs().values()}
    for c in configs().values():
        params, flops = costs[c.name]
        fmt = formats()[c.format]
        rows.append({"name": c.name, "format": c.format, "family": fmt.family, "params": params, "gflops": flops / 1e9,
                     "input_size": list(fmt.input_size(c.config)), "description": c.description})
    fmts = [{"name": f.name, "family": f.family, "description": f.description} for f in formats().values()]
    if args.json:
        print_json({"configs": rows, "formats": fmts})
        return 0
    table = Table(title="named configs (train form; vismlp-deploy zoo --init NAME)")
    for col in ("name", "family", "format", "input", "params (M)", "GFLOPs"):
        table.add_column(col, justify="right" if col in ("params (M)", "GFLOPs") else "left")
    for r in sorted(rows, key=lambda r: (r["family"], r["name"])):
        table.add_row(r["name"], r["family"], r["format"], "x".join(map(str, r["input_size"])),
                      f"{r['params'] / 1e6:.1f}", f"{r['gflops']:.2f}")
    print_table(table)
    ftable = Table(title="checkpoint formats (--arch)")
    for col in ("format", "family", "description"):
        ftable.add_column(col)
    for f in sorted(fmts, key=lambda f: f["name"]):
        ftable.add_row(f["name"], f["family"], f["description"])
    print_table(ftable)
    return 0


def parse_overrides(items: list[str], base: dict, name: str) -> dict:
    """``KEY=VALUE`` items -> overrides of ``base``: the key must exist, the value (JSON, else a
    string) must have the type of the value it replaces, and a positive number stays positive."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        if key not in base:
            raise UserError(f"--set {key}: {name} has no argument {key!r} (it has {', '.join(sorted(base))})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        old = base[key]
        same = (isinstance(old, bool) == isinstance(value, bool)) and (
            isinstance(value, type(old)) or (isinstance(old, float) and isinstance(value, int)) or old is None)
        if not same:
            raise UserError(f"--set {key}={text}: expected a {type(old).__name__} like {json.dumps(old)}")
        if isinstance(old, (int, float)) and not isinstance(old, bool) and old > 0 and not value > 0:
            raise UserError(f"--set {key}={text}: must be > 0")
        out[key] = value
    return out


def _init(args: argparse.Namespace) -> int:
    nc = get_config(args.init)
    overrides = parse_overrides(args.set, nc.config, nc.name)
    out = args.out or Path(f"{args.init}.pth")
    with atomic_output(out, args.force) as tmp:  # checked before anything is built
        model = randomize_(create_model(args.init, input_size=args.input_size, **overrides), seed=args.seed)
        save_model(model, tmp, form="train", extra={"named_config": args.init, "seed": args.seed})
    info = {"path": str(out), "name": args.init, "arch": model.arch, "config": model.config,
            "input_size": list(model.input_size), "params": count_params(model)}
    if args.json:
        print_json(info)
    else:
        say(f"wrote {out}: {args.init} ({model.arch}), {info['params']:,} parameters, "
            f"random weights (seed {args.seed})")
    return 0
