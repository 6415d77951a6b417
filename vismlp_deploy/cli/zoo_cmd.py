"""``vismlp-deploy zoo``: list formats and named configs; ``--init NAME --out PATH`` writes one."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from ..export.torch_artifact import save_model
from ..models.init import randomize_
from ..models.registry import CONFIGS, FORMATS, _ensure_loaded, create_model, get_format
from ..reparam.report import count_params
from .common import atomic_output, console, print_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", metavar="NAME", help="write a randomly initialised checkpoint of this named config")
    p.add_argument("--out", type=Path, help="output path for --init (default NAME.pth)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and norm statistics")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a constructor argument, e.g. --set num_classes=10 (JSON values)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def run(args: argparse.Namespace) -> int:
    _ensure_loaded()
    if args.init:
        return _init(args)
    rows = [{"name": c.name, "format": c.format, "family": FORMATS[c.format].family,
             "input_size": list(get_format(c.format).input_size(c.config)), "description": c.description}
            for c in CONFIGS.values()]
    formats = [{"name": f.name, "family": f.family, "description": f.description} for f in FORMATS.values()]
    if args.json:
        print_json({"configs": rows, "formats": formats})
        return 0
    table = Table(title="named configs (vismlp-deploy zoo --init NAME)")
    for col in ("name", "family", "format", "input"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["family"], r["name"])):
        table.add_row(r["name"], r["family"], r["format"], "x".join(map(str, r["input_size"])))
    console.print(table)
    ftable = Table(title="checkpoint formats (--arch)")
    ftable.add_column("format")
    ftable.add_column("family")
    ftable.add_column("description")
    for f in sorted(formats, key=lambda f: f["name"]):
        ftable.add_row(f["name"], f["family"], f["description"])
    console.print(ftable)
    return 0


def _init(args: argparse.Namespace) -> int:
    import json

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    model = randomize_(create_model(args.init, **overrides), seed=args.seed)
    model.input_size = tuple(get_format(model.arch).input_size(model.config))
    out = args.out or Path(f"{args.init}.pth")
    with console.status(f"writing {out}"), atomic_output(out, args.force) as tmp:
        save_model(model, tmp, form="train", extra={"named_config": args.init, "seed": args.seed})
    info = {"path": str(out), "name": args.init, "arch": model.arch, "config": model.config, "params": count_params(model)}
    if args.json:
        print_json(info)
    else:
        console.print(f"wrote {out}: {args.init} ({model.arch}), {info['params']:,} parameters, random weights (seed {args.seed})")
    return 0
