"""The project's zoo benchmark report: every named config, train vs deploy, with this project's speed targets.

    python benchmarks/zoo_report.py [--out-dir docs] [--threads 2] [--force] [bench-zoo options...]

Runs the same sweep as ``vismlp-deploy bench-zoo`` (adding batch 16 for the models of the
GEMM-peak target) and writes docs/benchmarks.md/.csv/.png with a "Targets" section that reads
each target off the measured numbers (reported as measured; nothing is tuned to them). The
targets are the project's, not the library's: they live here, not in the package.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vismlp_deploy.benchmark.sweep import BenchResult

# deploy/train images/s on ONNX Runtime CPU, batch 8, fp32 (224 px configs)
RATIO_TARGETS = {"repmlpnet": 1.3, "convmixer": 1.15, "resmlp": 1.1}
RATIO_AT = {"backend": "onnxruntime", "batch": 8, "precision": "fp32", "device": "cpu"}
# FC-dominated deploy models: fraction of the GEMM peak in their best backend at batch 16
PEAK_MODELS = ("resmlp_12", "mixer_b16", "repmlpnet_t224")
PEAK_TARGET, PEAK_BATCH = 0.85, 16


def _met(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def target_lines(result: BenchResult) -> list[str]:
    """Markdown: one table per target, one row per model, measured value next to the target."""
    lines = []
    slower = [r for r in result.ratios if r.deploy_over_train < 1.0]
    lines += [f"**Deploy never slower than train** (every backend, batch, precision): "
              f"{len(result.ratios) - len(slower)} of {len(result.ratios)} measured ratios are ≥ 1.0."]
    if slower:
        noise = sum(r.q75 >= 1.0 for r in slower)
        lines += [f"Of the {len(slower)} below 1.0, {noise} have a per-round upper quartile ≥ 1.0 (deploy won at "
                  "least a quarter of the rounds: a difference inside the round-to-round noise).", "",
                  "| model | backend | prec | batch | deploy/train | per-round quartiles |",
                  "|---|---|---|--:|--:|--:|"]
        lines += [f"| {r.model} | {r.backend} | {r.precision} | {r.batch} | {r.deploy_over_train:.3f} "
                  f"| {r.q25:.3f} – {r.q75:.3f} |" for r in sorted(slower, key=lambda r: r.deploy_over_train)]
    on_cpu = result.machine.get("device") == "cpu"
    lines += ["", f"**Deploy/train on ONNX Runtime CPU, batch {RATIO_AT['batch']}, fp32** (224 px configs). "
              "*GEMM bound*: the ratio a deploy form would reach if it ran its FLOPs (all of them: convolutions "
              "and matmuls) at the GEMM peak measured in this run, i.e. the most any exact deploy form can gain "
              "here; a target above it cannot be met on this machine by an exact transformation.", "",
              "| model | family | deploy/train | per-round quartiles | GEMM bound | target | |",
              "|---|---|--:|--:|--:|--:|---|"]
    measured: set[str] = set()
    families = {r.model: r.family for r in result.records}
    sizes = {r.model: r.input_size[-1] for r in result.records}
    for r in result.ratios:
        fam = families.get(r.model)
        at = (r.backend, r.batch, r.precision) == (RATIO_AT["backend"], RATIO_AT["batch"], RATIO_AT["precision"])
        if at and on_cpu and fam in RATIO_TARGETS and sizes.get(r.model) == 224:
            target = RATIO_TARGETS[fam]
            verdict = _met(r.deploy_over_train >= target)
            if r.deploy_over_train < target and r.gemm_bound is not None and r.gemm_bound < target:
                verdict += " (target above the GEMM bound)"
            bound = "–" if r.gemm_bound is None else f"{r.gemm_bound:.2f}"
            lines.append(f"| {r.model} | {fam} | {r.deploy_over_train:.2f} | {r.q25:.2f} – {r.q75:.2f} | {bound} "
                         f"| ≥ {target} | {verdict} |")
            measured.add(fam)
    missing = sorted(set(RATIO_TARGETS) - measured)
    if missing:
        lines.append(f"| ({', '.join(missing)}) | | not measured in this sweep | | | | – |")
    lines += ["", f"**Fraction of the GEMM peak, FC-dominated deploy models, best backend, batch {PEAK_BATCH}:**", "",
              "| model | best backend | deploy GFLOP/s | % of peak | target | |", "|---|---|--:|--:|--:|---|"]
    for name in PEAK_MODELS:
        recs = [r for r in result.records if r.model == name and r.form == "deploy" and r.batch == PEAK_BATCH
                and r.fraction_of_peak is not None]
        if not recs:
            lines.append(f"| {name} | not measured | | | ≥ {PEAK_TARGET:.0%} | – |")
            continue
        best = max(recs, key=lambda r: r.fraction_of_peak)
        lines.append(f"| {name} | {best.backend} {best.precision} | {best.gflops_per_sec:.1f} "
                     f"| {best.fraction_of_peak:.0%} | ≥ {PEAK_TARGET:.0%} "
                     f"| {_met(best.fraction_of_peak >= PEAK_TARGET)} |")
    return lines



def main(argv: list[str] | None = None) -> int:
    from vismlp_deploy.benchmark.run import bench_zoo, zoo_names
    from vismlp_deploy.cli.bench_cmd import progress_bar, step_callback, sweep_settings
    from vismlp_deploy.cli.bench_zoo_cmd import DEFAULTS, add_arguments, selected_names, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(out_dir=Path("docs"), json=False)
    args = parser.parse_args(argv)
    names = selected_names(args.families, args.models)
    settings = sweep_settings(args, DEFAULTS)
    if args.batch_sizes is None:  # the stated batches: 8 for every ratio, 16 more for the GEMM-peak models
        settings["extra_batch_sizes"] = {m: (PEAK_BATCH,) for m in PEAK_MODELS if m in names}
    with progress_bar(False) as progress:
        result = bench_zoo(names, seed=args.seed, on_step=step_callback(progress),
                           export_workers=args.export_workers, **settings)
    args.out_dir.mkdir(exist_ok=True)
    write_report(result, args.out_dir, "python benchmarks/zoo_report.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                       else argv),
                 everything=len(names) == len(zoo_names()), force=args.force, targets=target_lines(result))
    print(f"wrote {args.out_dir / 'benchmarks.md'} ({DEFAULTS['batch_sizes']} + extra batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
