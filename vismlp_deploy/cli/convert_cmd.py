"""``vismlp-deploy convert CKPT --to pt|onnx|trt``: re-parameterize, export, prove.

Stages run in order and each produced stage is proven against the train form
(train -> deploy -> ONNX Runtime -> TensorRT). A stage that fails its proof leaves no
artifact of its own (exit 1); ``--to trt`` writes and proves the ONNX before it needs
TensorRT, so a missing TensorRT or GPU (exit 2) loses nothing.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..errors import UserError, VerificationError
from ..export.torch_artifact import save_model
from ..reparam import reparameterize
from ..verification.proof import proof_inputs, proof_table, prove_stage
from .common import atomic_output, check_writable, console, print_json
from .inspect_cmd import _print_report
from .load_args import add_checkpoint_arguments, load_from_args

SUFFIX = {"pt": ".deploy.pt", "onnx": ".onnx", "trt": ".engine"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.onnx import DEFAULT_OPSET, OPSETS
    from ..export.tensorrt import PRECISIONS

    add_checkpoint_arguments(p)
    p.add_argument("--to", choices=sorted(SUFFIX), default="pt", help="artifact to produce (default pt)")
    p.add_argument("--out", type=Path, help="output path (default: CKPT stem + .deploy.pt/.onnx/.engine; "
                                            "--to trt also writes the ONNX beside the engine)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--proof-batch", type=int, default=8, help="images in the equivalence proof batch (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the proof inputs")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    g = p.add_argument_group("onnx / trt")
    batch = g.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="export a static batch of this size instead of a dynamic one")
    batch.add_argument("--dynamic-batch", default="1:8:32", metavar="MIN:OPT:MAX",
                       help="dynamic batch; MIN:OPT:MAX is the TensorRT optimization profile (default 1:8:32)")
    g.add_argument("--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    g.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    g.add_argument("--precision", choices=PRECISIONS, default="fp16", help="TensorRT engine precision (default fp16)")
    g.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT workspace limit in GiB (default 4)")
    g.add_argument("--timing-cache", type=Path, help="TensorRT timing cache file (default: per version/GPU in ~/.cache)")


def default_out(ckpt: Path, to: str) -> Path:
    stem = ckpt.name.split(".")[0]
    return ckpt.with_name(stem + SUFFIX[to])


def run(args: argparse.Namespace) -> int:
    from ..export.tensorrt import parse_dynamic_batch

    out = args.out or default_out(args.checkpoint, args.to)
    onnx_out = out if args.to == "onnx" else out.with_suffix(".onnx")
    for path in {out, onnx_out} if args.to != "pt" else {out}:
        check_writable(path, args.force)  # fail before any work
    profile = (args.batch,) * 3 if args.batch else parse_dynamic_batch(args.dynamic_batch)
    doc = {"checkpoint": str(args.checkpoint), "to": args.to, "artifacts": {}, "timings": {}}
    proofs: list = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=args.json) as progress:
        def stage(desc: str, key: str, fn):
            task = progress.add_task(desc, total=None)
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                doc["timings"][key] = time.perf_counter() - t0
                progress.remove_task(task)

        train = stage("loading checkpoint", "load_s", lambda: load_from_args(args))
        deploy = stage("re-parameterizing", "reparameterize_s", lambda: reparameterize(train))
        deploy.arch, deploy.config, deploy.input_size = train.arch, train.config, train.input_size
        doc.update(arch=train.arch, config=train.config, report=deploy.reparam_report.to_dict())
        x = proof_inputs(train.input_size, args.proof_batch, args.seed)
        with torch.inference_mode():
            ref = train(x)

        def prove(name: str, run_fn, precision: str = "fp32", artifacts: tuple[Path, ...] = ()) -> None:
            proofs.append(prove_stage(name, run_fn, x, ref, precision))
            if not proofs[-1].passed:
                for a in artifacts:  # a stage that fails its proof leaves nothing behind
                    for f in (a, Path(f"{a}.data"), Path(f"{a}.json")):
                        f.unlink(missing_ok=True)
                _finish(args, doc, train, deploy, proofs)
                raise VerificationError(f"stage '{name}' does not reproduce the train form; its artifact was not kept")

        stage("proving the deploy form", "prove_deploy_s", lambda: prove("deploy (torch fp32)", deploy))
        if args.to == "pt":
            def write_pt():
                with atomic_output(out, args.force) as tmp:
                    save_model(deploy, tmp, form="deploy", extra={"report": deploy.reparam_report.to_dict()})
            stage(f"writing {out}", "write_s", write_pt)
            doc["artifacts"]["pt"] = str(out)
        else:
            _onnx_stages(args, doc, deploy, onnx_out, stage, prove)
        if args.to == "trt":
            try:
                _trt_stages(args, doc, onnx_out, out, profile, stage, prove)
            except UserError as e:  # TensorRT/GPU missing or build refused: the proof so far still prints
                doc["error"] = str(e)
                _finish(args, doc, train, deploy, proofs)
                raise
    _finish(args, doc, train, deploy, proofs)
    return 0


def _onnx_stages(args, doc, deploy, onnx_out: Path, stage, prove) -> None:
    from ..export.onnx import export_onnx_info
    from ..runtime.ort_runner import OrtRunner

    info = stage(f"exporting {onnx_out}", "onnx_export_s", lambda: export_onnx_info(
        deploy, onnx_out, opset=args.opset, dynamic_batch=args.batch is None, batch=args.batch or 1,
        simplify=not args.no_simplify))
    for note in info.warnings:
        console.print(f"[yellow]warning:[/yellow] {note}")
    doc["artifacts"]["onnx"] = str(onnx_out)
    doc["onnx"] = info.to_dict()
    runner = OrtRunner(onnx_out, "cpu")
    stage("proving ONNX Runtime", "prove_onnx_s", lambda: prove("onnxruntime (cpu fp32)", runner.run, "fp32", (onnx_out,)))


def _trt_stages(args, doc, onnx_out: Path, engine: Path, profile, stage, prove) -> None:
    from ..export.tensorrt import build_engine, metadata_path
    from ..runtime.trt_runner import TrtRunner

    stage(f"building {engine} ({args.precision})", "engine_build_s", lambda: build_engine(
        onnx_out, engine, precision=args.precision, dynamic_batch=profile, workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache, log=lambda m: console.print(m) if not args.json else None))
    doc["artifacts"]["engine"] = str(engine)
    doc["artifacts"]["engine_metadata"] = str(metadata_path(engine))
    runner = TrtRunner(engine)
    stage("proving TensorRT", "prove_trt_s",
          lambda: prove(f"tensorrt ({args.precision})", runner.run, args.precision, (engine,)))


def _finish(args, doc: dict, train, deploy, proofs) -> None:
    doc["proof"] = [p.to_dict() for p in proofs]
    doc["passed"] = all(p.passed for p in proofs)
    if args.json:
        print_json(doc)
        return
    console.print(f"[bold]{train.arch}[/bold] {train.config}")
    _print_report(deploy.reparam_report)
    console.print(proof_table(proofs))
    for kind, path in doc["artifacts"].items():
        console.print(f"wrote {kind}: [bold]{path}[/bold]")
    if "onnx" in doc:
        o = doc["onnx"]
        console.print(f"ONNX: opset {o['opset']}, {o['exporter']} exporter, {o['nodes']} nodes, "
                      f"{'simplified' if o['simplified'] else 'not simplified'}, "
                      f"{'dynamic' if o['dynamic_batch'] else 'static'} batch")
    console.print(f"re-parameterized in {doc['timings']['reparameterize_s']:.2f} s")
