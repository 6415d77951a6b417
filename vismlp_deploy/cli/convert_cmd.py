"""``vismlp-deploy convert MODEL... --to pt|onnx|trt``: re-parameterize, export, prove.

Stages run in order and each produced stage is proven against the reference (the train
form in fp32; a deploy artifact's own form; a given ONNX file on ONNX Runtime):
train -> deploy -> ONNX Runtime (fp32) -> [int8 Q/DQ] -> TensorRT. A stage that fails its
proof leaves no artifact of its own (exit 1); ``--to trt`` writes and proves the ONNX before
it needs TensorRT, so a missing TensorRT or GPU (exit 2) loses nothing. Several MODELs
convert one after the other, one result line each; the exit code is the worst of them.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import UserError, VerificationError
from ..precision import PRECISIONS
from ..runtime.source import Source
from ..verification.compare import Comparison
from ..verification.inputs import random_images
from ..verification.proof import prove_stage
from .common import bounded_int, check_output, console, live, print_json, print_table, say, styled
from .inspect_cmd import print_report
from .model_args import add_model_arguments, check_batch_memory, load_model, model_specs

SUFFIX = {"pt": ".deploy.pt", "onnx": ".onnx", "trt": ".engine"}
PROOF_HELDOUT = 500  # held-out calibration inputs the int8 stage of the proof is judged on
TARGET_PRECISIONS = {"pt": ("fp32",), "onnx": ("fp32", "int8"), "trt": ("fp32", "tf32", "fp16", "bf16", "int8")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..export.onnx import DEFAULT_OPSET, OPSETS

    add_model_arguments(p, many=True)
    p.epilog = ("examples:\n  vismlp-deploy convert resmlp_12.pth --to onnx\n"
                "  vismlp-deploy convert runs/*.pth --to onnx --out-dir exported/\n"
                "  vismlp-deploy convert model.pth --to onnx --precision int8 --calib images/ --calib-count 256\n"
                "  vismlp-deploy convert model.pth --to trt --precision fp16 --dynamic-batch 1:16:64\n"
                "  vismlp-deploy convert model.onnx --to trt   (an existing ONNX: the engine only)")
    p.add_argument("--to", choices=sorted(SUFFIX), default="pt", help="artifact to produce (default pt)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path,
                     help="output path, one MODEL only (default: MODEL's name with the artifact's suffix, beside it; "
                          "--to trt also keeps the ONNX beside the engine)")
    out.add_argument("--out-dir", type=Path, help="directory for the outputs (default: beside each MODEL)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--precision", choices=list(PRECISIONS), help="precision of the artifact: onnx fp32 or int8 (Q/DQ); "
                                                                 "trt fp32, tf32, fp16, bf16 or int8 (default fp32; "
                                                                 "trt: fp16)")
    p.add_argument("--proof-batch", type=bounded_int(1, 4096), default=8,
                   help="random images in the equivalence proof (default 8)")
    g = p.add_argument_group("onnx / trt")
    batch = g.add_mutually_exclusive_group()
    batch.add_argument("--static-batch", type=bounded_int(1, 65536), metavar="N",
                       help="export a static batch of N instead of a dynamic one")
    batch.add_argument("--dynamic-batch", default="1:8:32", metavar="MIN:OPT:MAX",
                       help="dynamic batch; MIN:OPT:MAX is the TensorRT optimization profile (default 1:8:32)")
    g.add_argument("--opset", type=int, choices=OPSETS, default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET})")
    g.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    g.add_argument("--workspace-gib", type=bounded_int(1, 1024), default=4, help="TensorRT workspace limit (default 4)")
    g.add_argument("--timing-cache", type=Path,
                   help="TensorRT timing cache file (default: per version/GPU in ~/.cache)")
    g.add_argument("--weak-typing", action="store_true",
                   help="TensorRT 10 only: build weakly typed (precision builder flags; TensorRT picks each "
                        "layer's precision). Default: strongly typed, the ONNX fixes every precision")
    add_calibration_arguments(p)


def add_calibration_arguments(p: argparse.ArgumentParser, guard: bool = True) -> None:
    """--calib & co (int8; ``guard``: the accuracy guard's --min-agreement), and the image normalization."""
    from ..verification.images import IMAGENET_MEAN, IMAGENET_STD
    from .common import fraction, nonzero_three_floats, three_floats

    g = p.add_argument_group("real images and int8 calibration")
    g.add_argument("--calib", type=Path, metavar="PATH",
                   help="calibration inputs: a directory of images (flat or one sub-folder per class), or a .npy/.npz "
                        "of preprocessed (N, C, H, W) float32 inputs; needed for --precision int8")
    g.add_argument("--calib-count", type=bounded_int(1, 1 << 20), default=256,
                   help="calibration inputs to use (default 256)")
    if guard:
        g.add_argument("--calib-holdout", type=bounded_int(0, 1 << 20), default=1000,
                       help="further inputs of --calib, never calibrated on, on which the accuracy guard measures "
                            "agreement with fp32 (default 1000; use images like the deployment data)")
    if guard:
        g.add_argument("--min-agreement", type=fraction, default=0.99,
                       help="int8: top-1 agreement with fp32 required on held-out images; below it the most sensitive "
                            "nodes stay float until it is met (0: no fallback; default 0.99)")
    g.add_argument("--mean", type=three_floats, default=IMAGENET_MEAN, help="image normalization mean R,G,B "
                                                                            "(default ImageNet's)")
    g.add_argument("--std", type=nonzero_three_floats, default=IMAGENET_STD, help="image normalization std R,G,B "
                                                                                  "(default ImageNet's)")


def default_out(spec: str, to: str, precision: str, out_dir: Path | None) -> Path:
    """MODEL's whole name minus its last suffix (and ``.deploy``), with the artifact's suffix:
    ``run.ep10.pth`` -> ``run.ep10.onnx``; a named config goes into the current directory."""
    path = Path(spec)
    stem = path.stem if path.suffix else path.name
    stem = stem.removesuffix(".deploy")
    suffix = (".int8" if precision == "int8" and to == "onnx" else "") + SUFFIX[to]
    folder = out_dir if out_dir is not None else (path.parent if path.is_file() else Path("."))
    return folder / (stem + suffix)


def _precision(args: argparse.Namespace) -> str:
    p = args.precision or ("fp16" if args.to == "trt" else "fp32")
    if p not in TARGET_PRECISIONS[args.to]:
        raise UserError(f"--to {args.to} makes {', '.join(TARGET_PRECISIONS[args.to])} artifacts, not {p}"
                        + ("; the ONNX graph of fp16/bf16 is made by the TensorRT build (--to trt)"
                           if args.to == "onnx" else ""))
    return p


def run(args: argparse.Namespace) -> int:
    from ..export.tensorrt import parse_dynamic_batch

    precision = _precision(args)
    specs = model_specs(args)
    if args.out is not None and len(specs) > 1:
        raise UserError(f"--out names one output, but {len(specs)} models were given; use --out-dir")
    if args.out_dir is not None and not args.out_dir.is_dir():
        raise UserError(f"--out-dir {args.out_dir} is not a directory")
    profile = (args.static_batch,) * 3 if args.static_batch else parse_dynamic_batch(args.dynamic_batch)
    plans = [_plan(args, spec, precision) for spec in specs]  # every output checked before any work
    if len(plans) == 1:
        doc: dict = {}
        try:
            _convert(args, plans[0], profile, doc)
        finally:  # --json: the document, also of a conversion stopped by an error (what was proven, written)
            if args.json and doc.get("proof") is not None:
                print_json(doc)
        return 0
    return _convert_many(args, plans, profile)


def _plan(args: argparse.Namespace, spec: str, precision: str) -> dict:
    """What converting ``spec`` will write, checked before any work starts."""
    from ..export.onnx import is_quantized

    out = args.out or default_out(spec, args.to, precision, args.out_dir)
    onnx_out = out
    if args.to == "trt":
        onnx_out = out.with_suffix(".int8.onnx" if precision == "int8" else ".onnx")
    if Path(spec).suffix == ".onnx" and Path(spec).is_file():
        if is_quantized(spec) and (args.to == "onnx" or precision != "int8"):
            raise UserError(f"{spec} is already an int8 (Q/DQ) graph: build it --to trt --precision int8")
        if args.to == "trt" and (precision != "int8" or is_quantized(spec)):
            onnx_out = None  # the given ONNX is the engine's source (an fp32 one is quantized beside the engine)
    if precision == "int8" and onnx_out is not None and args.calib is None:
        raise UserError("--precision int8 needs calibration inputs: --calib DIR_OR_NPY")
    if onnx_out == out and args.to == "trt":
        raise UserError(f"--out {out}: the engine would overwrite the ONNX it is built from; give it another suffix "
                        "(e.g. .engine)")
    outputs = [p for p in {out, onnx_out} if p is not None] if args.to != "pt" else [out]
    given = (Path(spec),) if Path(spec).is_file() else ()
    for path in outputs:
        check_output(path, args.force, inputs=given)
    return {"spec": spec, "out": out, "onnx_out": onnx_out, "precision": precision}


def _convert_many(args: argparse.Namespace, plans: list[dict], profile) -> int:
    docs, worst = [], 0
    for plan in plans:
        doc: dict = {}
        try:
            _convert(args, plan, profile, doc, quiet=True)
            code = 0
        except (VerificationError, UserError) as e:
            doc.update(model=plan["spec"], passed=False, error=str(e))
            code = 1 if isinstance(e, VerificationError) else 2
        worst = max(worst, code)
        docs.append(doc)
        if not args.json:
            mark = styled("ok", "green") if code == 0 else styled("FAIL" if code == 1 else "error", "red")
            what = ", ".join(doc.get("artifacts", {}).values()) if code == 0 else doc["error"]
            say(mark, f" {plan['spec']}: {what}", level=-1)
    if args.json:
        print_json({"results": docs, "passed": worst == 0})
    return worst


class _Stages:
    """Runs the named stages of one conversion under a spinner, timing each into ``doc``."""

    def __init__(self, doc: dict, progress: Progress):
        self.doc, self.progress = doc, progress

    def __call__(self, desc: str, key: str, fn: Callable):
        task = self.progress.add_task(desc, total=None)
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.doc["timings"][key] = time.perf_counter() - t0
            self.progress.remove_task(task)


def _convert(args: argparse.Namespace, plan: dict, profile, doc: dict, quiet: bool = False) -> None:
    """Convert one MODEL, filling ``doc`` (the --json document) as the stages run."""
    from ..export.onnx import is_quantized
    out, onnx_out, precision = plan["out"], plan["onnx_out"], plan["precision"]
    doc.update({"model": plan["spec"], "to": args.to, "precision": precision, "artifacts": {}, "timings": {}})
    proofs: list[Comparison] = []
    with ExitStack() as stack:
        progress = stack.enter_context(Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                                                TimeElapsedColumn(), console=console, transient=True,
                                                disable=quiet or not live(args.json)))
        stage = _Stages(doc, progress)
        source: Source = stage(f"loading {plan['spec']}", "load_s", lambda: load_model(args, plan["spec"]))
        if source.kind == "onnx" and args.to != "trt" and not (args.to == "onnx" and precision == "int8"):
            raise UserError(f"{source.name} is already an ONNX model: "
                            "convert it --to trt, or --to onnx --precision int8")
        if source.kind == "deploy artifact" and args.to == "pt":
            raise UserError(f"{source.name} is already a deploy artifact (.deploy.pt); "
                            "convert it --to onnx or --to trt")
        check_batch_memory(args, source, max(args.proof_batch, args.static_batch or 2))
        deploy = stage("re-parameterizing", "reparameterize_s", lambda: source.deploy)
        model = source.train or deploy
        if model is not None:
            doc.update(arch=getattr(model, "arch", None), config=getattr(model, "config", None))
        if deploy is not None and source.train is not None:
            doc["report"] = deploy.reparam_report.to_dict()
        x = random_images(source.input_size, args.proof_batch, args.seed)
        reference, ref_name = _reference(source)
        with torch.inference_mode():
            ref = reference(x)

        def prove(name: str, run_fn, stage_precision: str = "fp32", artifacts: tuple[Path, ...] = (),
                  inputs: tuple[torch.Tensor, str] | None = None) -> None:
            """Judge stage ``name`` on the random proof batch, or on ``inputs`` (images, their name)."""
            if inputs is None:
                proofs.append(prove_stage(name, run_fn, x, ref, stage_precision, reference=ref_name))
            else:
                with torch.inference_mode():
                    own_ref = reference(inputs[0])
                proofs.append(prove_stage(name, run_fn, inputs[0], own_ref, stage_precision, reference=ref_name,
                                          inputs=inputs[1], min_top1=args.min_agreement))
            if not proofs[-1].passed:
                for a in artifacts:  # a stage that fails its proof leaves nothing behind
                    for f in (a, Path(f"{a}.data"), Path(f"{a}.json")):
                        f.unlink(missing_ok=True)
                _finish(args, doc, source, proofs, quiet)
                raise VerificationError(f"stage '{name}' does not reproduce the reference "
                                        f"({'; '.join(proofs[-1].failures)}); its artifact was not kept")

        if deploy is not None and source.train is not None:
            stage("proving the deploy form", "prove_deploy_s", lambda: prove("deploy (torch fp32)", deploy))
        # int8: the fp32 export is an intermediate (the Q/DQ graph is what is kept)
        workdir = tempfile.TemporaryDirectory(prefix="vismlp-convert-")
        stack.callback(workdir.cleanup)
        fp32_onnx = Path(workdir.name) / "fp32.onnx" if precision == "int8" else onnx_out
        if args.to == "pt":
            stage(f"writing {out}", "write_s", lambda: _write_pt(deploy, out, args.force))
            doc["artifacts"]["pt"] = str(out)
        elif source.kind != "onnx":
            _onnx_stage(args, doc, deploy, fp32_onnx, stage, prove, keep=precision != "int8")
        onnx_path = source.onnx_path if source.kind == "onnx" else fp32_onnx
        if precision == "int8" and not is_quantized(onnx_path):
            onnx_path = _int8_stage(args, doc, source, onnx_path, out if args.to == "onnx" else onnx_out, stage, prove)
        if args.to == "trt":
            try:
                _trt_stage(args, doc, onnx_path, out, profile, precision, stage, prove)
            except UserError as e:  # TensorRT/GPU missing or build refused: the proof so far still prints
                doc["error"] = str(e)
                _finish(args, doc, source, proofs, quiet)
                raise
    _finish(args, doc, source, proofs, quiet)


def _reference(source: Source) -> tuple[Callable, str]:
    """The function every stage is proven against, and its name."""
    if source.train is not None:
        return source.train, "train (torch fp32)"
    if source.deploy is not None:
        return source.deploy, "deploy (torch fp32)"
    from ..runtime.ort_runner import OrtRunner

    return OrtRunner(source.onnx_path).run, f"{source.name} (onnxruntime fp32)"


def _write_pt(deploy, out: Path, force: bool) -> None:
    from ..export.torch_artifact import save_model
    from .common import atomic_output

    with atomic_output(out, force) as tmp:
        save_model(deploy, tmp, form="deploy", extra={"report": deploy.reparam_report.to_dict()})


def _onnx_stage(args, doc, deploy, onnx_out: Path, stage, prove, keep: bool) -> None:
    """Export the deploy form to ``onnx_out`` and prove it (``keep``: an artifact, not an intermediate)."""
    from ..export.onnx import export_onnx_info
    from ..runtime.ort_runner import OrtRunner

    info = stage(f"exporting {onnx_out}", "onnx_export_s", lambda: export_onnx_info(
        deploy, onnx_out, opset=args.opset, dynamic_batch=args.static_batch is None, batch=args.static_batch or 1,
        simplify=not args.no_simplify))
    if keep:
        doc["artifacts"]["onnx"] = str(onnx_out)
    doc["onnx"] = info.to_dict()
    runner = OrtRunner(onnx_out, "cpu")
    stage("proving ONNX Runtime", "prove_onnx_s",
          lambda: prove("onnxruntime (cpu fp32)", runner.run, "fp32", (onnx_out,)))


def _int8_stage(args, doc, source: Source, fp32_onnx: Path, int8_out: Path, stage, prove) -> Path:
    """Quantize ``fp32_onnx`` to a Q/DQ graph with the accuracy guard (held-out real images) and prove it."""
    from ..calibration import load_calibration_split
    from ..export.quantize import quantize_onnx
    from ..runtime.ort_runner import OrtRunner

    split = stage(f"reading calibration inputs {args.calib}", "calib_s", lambda: load_calibration_split(
        args.calib, source.input_size, args.calib_count, args.calib_holdout, args.mean, args.std))
    result = stage("quantizing to int8 (Q/DQ), measuring agreement on held-out inputs", "quantize_s",
                   lambda: quantize_onnx(fp32_onnx, int8_out, split.calibration, split.holdout,
                                         min_agreement=args.min_agreement))
    doc["artifacts"]["onnx_int8"] = str(int8_out)
    doc["int8"] = {"calibration": split.to_dict(), **result.to_dict()}
    if source.train is not None and source.deploy is not None:
        from ..verification.weight_sqnr import weight_sqnr_report

        report = weight_sqnr_report(source.train, source.deploy)
        doc["int8"]["weight_sqnr"] = {**report.to_dict(), "notes": report.lines()}
    runner = OrtRunner(int8_out, "cpu")
    # judged on real held-out images (random inputs are not what a calibrated graph is made for)
    held = (torch.from_numpy(split.holdout[:PROOF_HELDOUT]), "held-out") if len(split.holdout) else None
    stage("proving the int8 graph", "prove_int8_s", lambda: prove("onnxruntime (cpu int8)", runner.run, "int8",
                                                                  (int8_out,), held))
    if result.passed is False:
        int8_out.unlink(missing_ok=True)
        raise VerificationError(f"int8 top-1 agreement {result.stats.top1:.2%} on {result.holdout} held-out inputs "
                                f"does not reach --min-agreement {args.min_agreement:.2%} with 95 % confidence, even "
                                f"with {len(result.fallback_nodes)} node(s) kept in float; the int8 ONNX was not kept")
    return int8_out


def _trt_stage(args, doc, onnx_path: Path, engine: Path, profile, precision: str, stage, prove) -> None:
    from ..export.tensorrt import build_engine, metadata_path
    from ..runtime.trt_runner import TrtRunner

    stage(f"building {engine} ({precision})", "engine_build_s", lambda: build_engine(
        onnx_path, engine, precision=precision, dynamic_batch=profile, workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache, strongly_typed=False if args.weak_typing else None,
        log=lambda m: say(m) if not args.json else None))
    doc["artifacts"]["engine"] = str(engine)
    doc["artifacts"]["engine_metadata"] = str(metadata_path(engine))
    runner = TrtRunner(engine)
    # a failed proof also removes the ONNX that AutoCast converted for an fp16/bf16 build
    made = (engine, engine.with_suffix(f".{precision}.onnx"))
    stage("proving TensorRT", "prove_trt_s", lambda: prove(f"tensorrt ({precision})", runner.run, precision, made))


def _finish(args, doc: dict, source: Source, proofs: list[Comparison], quiet: bool) -> None:
    doc["proof"] = [p.to_dict() for p in proofs]
    doc["passed"] = all(p.passed for p in proofs)
    if args.json or quiet:
        return
    if doc.get("arch"):
        say(styled(doc["arch"], "bold"), f" {doc.get('config')}")
    if source.train is not None and source.deploy is not None:
        print_report(source.deploy.reparam_report)
    if proofs:
        print_table(proof_table(proofs))
    for kind, path in doc["artifacts"].items():
        say(f"wrote {kind}: ", styled(path, "bold"))
    if "onnx" in doc:
        o = doc["onnx"]
        say(f"ONNX: opset {o['opset']}, {o['exporter']} exporter, {o['nodes']} nodes, "
            f"{'simplified' if o['simplified'] else 'not simplified'}, "
            f"{'dynamic' if o['dynamic_batch'] else 'static'} batch")
    if "int8" in doc:
        q = doc["int8"]
        if q["measured"]:
            say(f"int8: top-1 agreement {q['stats']['top1']:.2%} with fp32 on {q['holdout']} held-out inputs "
                f"(95 % lower bound {q['agreement_lower_bound']:.2%}, target {q['min_agreement']:.0%})")
        for node in q["float_nodes"]:
            say(f"  kept in float: {node['name']} ({node['op_type']}): {node['reason']}", level=1)
        say(f"int8: {q['quantized_nodes']} node(s) quantized, {len(q['float_nodes'])} kept in float (-v lists them)")
        for line in q.get("weight_sqnr", {}).get("notes", []):
            say(styled("note: ", "yellow"), line)
    if "reparameterize_s" in doc["timings"] and source.train is not None:
        say(f"re-parameterized in {doc['timings']['reparameterize_s']:.2f} s")


def proof_table(proofs: list[Comparison]) -> Table:
    ref = proofs[0].reference if proofs else "reference"
    t = Table(title=f"equivalence proof (reference: {ref})")
    for col in ("stage", "inputs", "max abs", "rel err", "cosine", "SQNR dB", "top-1", "targets", "result"):
        t.add_column(col, justify="left" if col in ("stage", "inputs", "targets", "result") else "right")
    for p in proofs:
        s = p.stats
        targets = [f"rel ≤ {p.tolerance:g}"] + ([f"cos ≥ {p.min_cosine:g}"] if p.min_cosine else []) \
            + ([f"SQNR ≥ {p.min_sqnr_db:g} dB"] if p.min_sqnr_db else []) \
            + ([f"top-1 ≥ {p.min_top1:.0%}"] if p.min_top1 else [])
        t.add_row(p.candidate, p.inputs, f"{s.max_abs:.2e}", f"{s.rel:.2e}", f"{s.cosine:.8f}", f"{s.sqnr_db:.1f}",
                  f"{s.top1:.0%}", ", ".join(targets), styled("pass", "green") if p.passed else styled("FAIL", "red"))
    return t
