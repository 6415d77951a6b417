"""``vismlp-deploy inspect MODEL``: what the model is and what converting it will do."""
from __future__ import annotations

import argparse

from rich.table import Table

from ..reparam.report import ReparamReport
from ..runtime.source import Source
from .common import print_json, print_table, say, status, styled
from .model_args import add_model_arguments, load_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)


def run(args: argparse.Namespace) -> int:
    with status("reading, detecting, planning the re-parameterization"):
        source = load_model(args, args.model)
        doc = describe(source)
    if args.json:
        print_json(doc)
        return 0
    say(styled(str(args.model), "bold"), f" ({source.kind})")
    info = source.info
    if info is not None:
        strip = f", prefix {'+'.join(info.stripped)} removed" if info.stripped else ""
        say(f"{info.container}; weights: {info.weights}{strip}")
        say("detected as ", styled(info.label, "bold"), f" — confidence {info.confidence}")
        say(f"how: {info.how}")
        for note in info.notes:
            say(styled("note: ", "yellow"), note)
    if "arch" in doc:
        say(f"format {doc['arch']}; config ({doc.get('config_source', 'stored')}): {doc.get('config')}")
    say(f"input size: {'x'.join(map(str, source.input_size))}")
    if source.kind == "onnx":
        say(f"ONNX: {doc['onnx']['nodes']} nodes, form {source.onnx_form}, "
            f"{'Q/DQ int8' if doc['onnx']['quantized'] else 'float'} graph")
        if source.meta.get("reparam"):
            say(f"re-parameterization: {source.meta['reparam']}")
        return 0
    if source.kind == "deploy artifact":
        stored = source.meta.get("report")
        say("already re-parameterized" + ("; its report:" if stored else " (no report stored)"))
        if stored:
            print_report(ReparamReport.from_dict(stored))
        return 0
    print_report(source.deploy.reparam_report)
    for line in doc["weight_sqnr"]["notes"]:  # where a fold made a weight harder to quantize to int8
        say(styled("int8 note: ", "yellow"), line)
    return 0


def describe(source: Source) -> dict:
    """The ``--json`` document of ``inspect``."""
    doc: dict = {"model": source.name, "kind": source.kind, "input_size": list(source.input_size)}
    model = source.train or source.deploy
    if model is not None:
        doc.update(arch=getattr(model, "arch", None), config=getattr(model, "config", None))
    if source.info is not None:
        i = source.info
        doc.update(weights=i.weights, container=i.container, stripped_prefixes=i.stripped, named_config=i.named,
                   detected_as=i.label, confidence=i.confidence, arch_detection=i.how, config_source=i.config_source,
                   notes=i.notes)
    if source.kind == "onnx":
        from ..export.onnx import onnx_summary

        doc.update(metadata=source.meta, onnx=onnx_summary(source.onnx_path))
    elif source.kind == "deploy artifact":
        doc["report"] = source.meta.get("report")
    else:
        from ..verification.weight_sqnr import weight_sqnr_report

        doc["report"] = source.deploy.reparam_report.to_dict()
        sqnr = weight_sqnr_report(source.train, source.deploy)
        doc["weight_sqnr"] = {**sqnr.to_dict(), "notes": sqnr.lines()}
    return doc


def print_report(report: ReparamReport) -> None:
    """Folds by kind, and what was left in place with the reason (identical rows grouped)."""
    flops = ""
    if report.flops_before:
        flops = f", GFLOPs {report.flops_before / 1e9:.3f} -> {report.flops_after / 1e9:.3f}"
    say(f"parameters {report.params_before:,} -> {report.params_after:,}{flops}")
    t = Table(title="exact folds")
    t.add_column("kind")
    t.add_column("count", justify="right")
    for kind, n in sorted(report.folded.items()):
        t.add_row(kind, str(n))
    print_table(t)
    if report.left:
        lt = Table(title="left in place (--json lists every module)")
        for col in ("module", "kind", "why"):
            lt.add_column(col, overflow="fold")
        for path, kind, reason, n in report.left_groups():
            lt.add_row(f"{path} (×{n})" if n > 1 else path, kind, reason)
        print_table(lt)
