"""Output of a sweep: CSV (one row per record), PNG (images/s vs batch), markdown report."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

from .sweep import BenchResult, Record

CSV_FIELDS = ("model", "family", "backend", "form", "batch", "precision", "device", "input_size", "images_per_sec",
              "latency_ms_median", "latency_ms_p90", "latency_ms_p99", "spread", "repeats", "flops_per_image",
              "gflops_per_sec", "fraction_of_peak", "deploy_over_train", "deploy_over_train_q25",
              "deploy_over_train_q75", "gemm_bound")


def write_csv(result: BenchResult, path: Path) -> None:
    ratios = result.ratio_index()
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result.records:
            row = {k: v for k, v in r.to_dict().items() if k in CSV_FIELDS}
            row.update({f"latency_ms_{k}": round(v, 4) for k, v in r.latency_ms.items()})
            row["input_size"] = "x".join(map(str, r.input_size))
            row["images_per_sec"] = round(r.images_per_sec, 3)
            row["spread"] = round(r.spread, 4)
            row["gflops_per_sec"] = None if r.gflops_per_sec is None else round(r.gflops_per_sec, 3)
            row["fraction_of_peak"] = None if r.fraction_of_peak is None else round(r.fraction_of_peak, 4)
            q = ratios.get((r.model, r.backend, r.batch, r.precision))
            if q is not None:
                row.update(deploy_over_train=round(q.deploy_over_train, 4), deploy_over_train_q25=round(q.q25, 4),
                           deploy_over_train_q75=round(q.q75, 4),
                           gemm_bound=None if q.gemm_bound is None else round(q.gemm_bound, 4))
            w.writerow(row)


def write_png(result: BenchResult, path: Path) -> None:
    """One panel per model: images/s (log) vs batch size; colour = backend/precision, line = form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in result.records)) or ["(no results)"]
    cols = min(4, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    series = list(dict.fromkeys((r.backend, r.precision) for r in result.records))
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(series)}
    for ax, model in zip(axes.flat, models):
        for (backend, precision) in series:
            for form, style in (("train", "--"), ("deploy", "-")):
                pts = sorted((r.batch, r.images_per_sec) for r in result.records
                             if (r.model, r.backend, r.precision, r.form) == (model, backend, precision, form))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[(backend, precision)],
                            label=f"{backend} {precision} {form}")
        ax.set_title(model, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size", fontsize=8)
        ax.set_ylabel("images/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    dev = result.machine.get("gpu") or result.machine.get("cpu", "")
    # wrapped to the figure's width, and saved with a tight bounding box: nothing is clipped, one panel or many
    title = (f"images/s vs batch (dashed: train form, solid: deploy form) — {dev}, "
             f"{result.machine.get('threads')} threads")
    fig.suptitle(textwrap.fill(title, width=int(16 * 4.2 * cols)), fontsize=10)
    fig.tight_layout()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0),
                   ncol=max(1, min(len(labels), 2 * cols)), fontsize=8, frameon=False)
    fig.savefig(path, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def records_table(result: BenchResult) -> list[str]:
    """Markdown rows: one line per (model, backend, precision, batch) with both forms side by side."""
    ratios = result.ratio_index()
    by_key: dict[tuple, dict[str, Record]] = {}
    for r in result.records:
        by_key.setdefault((r.model, r.backend, r.precision, r.batch), {})[r.form] = r
    lines = ["| model | backend | prec | batch | train img/s | deploy img/s | deploy/train | deploy p50 / p99 ms "
             "| deploy GFLOP/s | % of GEMM peak |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for (model, backend, precision, batch), forms in by_key.items():
        t, d = forms.get("train"), forms.get("deploy")
        q = ratios.get((model, backend, batch, precision))
        ratio = q and q.deploy_over_train
        lat = f"{d.latency_ms['median']:.2f} / {d.latency_ms['p99']:.2f}" if d else "–"
        lines.append(f"| {model} | {backend} | {precision} | {batch} | {_fmt(t and t.images_per_sec, '.1f')} "
                     f"| {_fmt(d and d.images_per_sec, '.1f')} | {_fmt(ratio, '.2f')} | {lat} "
                     f"| {_fmt(d and d.gflops_per_sec, '.1f')} "
                     f"| {_fmt(d and d.fraction_of_peak and 100 * d.fraction_of_peak, '.0f')} |")
    return lines


def write_markdown(result: BenchResult, path: Path, *, command: str, csv_name: str, png_name: str,
                   intro: list[str] | None = None, targets: list[str] | None = None) -> None:
    m = result.machine
    peaks = ", ".join(f"{p}: {pk.gflops:.1f} GFLOP/s ({pk.kernel}, n={pk.size})" for p, pk in result.peaks.items())
    s = result.settings
    lines = ["# Benchmarks", "", *(intro or []),
             "## How these numbers were made", "", "```", command, "```", "",
             f"- CPU: {m.get('cpu')} ({m.get('cpu_count')} logical CPUs), {m.get('threads')} threads for torch and "
             f"ONNX Runtime; 1-minute load average at the start: {m.get('load_average')} (a value above the thread "
             "count would mean the CPUs were shared)",
             *([f"- GPU: {m['gpu']} (CUDA {m.get('cuda')}, TF32 matmul {m.get('tf32_matmul')})"]
               if m.get("gpu") else []),
             f"- {m.get('platform')}, Python {m.get('python')}, torch {m.get('torch')}, "
             f"onnxruntime {m.get('onnxruntime')}, onnx {m.get('onnx')}, vismlp-deploy {m.get('vismlp_deploy')}",
             "- GEMM peak measured in the same run, at its start and end (square `torch.mm`, and ONNX Runtime "
             f"`MatMul` when it is benchmarked; best of kernels × sizes × repeats): {peaks}",
             f"- timing: {s.get('warmup')} warm-up calls per form, then up to {s.get('repeats')} interleaved rounds "
             f"(at least {s.get('min_repeats')}, stopping after {s.get('max_time_s')} s per group); train and deploy "
             "forms alternate call by call, and `deploy/train` is the median of the per-round ratios (train time / "
             "deploy time of calls made back to back), so machine drift cancels inside each ratio",
             *(["- wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.wall_s.items())
                + (f" (the ONNX exports of every form, {s.get('export_workers')} processes, before the timing)"
                   if "export" in result.wall_s else "")] if result.wall_s else []),
             *(["- ONNX Runtime sessions run with intra-op spinning off: the forms alternate call by call, and idle "
                "threads spinning for the next call would take a core from the other form's session"]
               if "onnxruntime" in s.get("backends", ()) else []),
             "- inputs: seeded N(0, 1) images at the model's input size; "
             "weights: `randomize_` (seed 0) for named configs",
             "- GFLOP/s: each form's own FLOPs per image (torch's FlopCounterMode, 2 per multiply-add; "
             "convolutions and matmuls only) × images/s",
             "", f"Raw data: [{csv_name}]({csv_name}).", "", f"![images per second vs batch size]({png_name})", ""]
    if targets:
        lines += ["## Targets", "", *targets, ""]
    lines += ["## Results", "", *records_table(result), ""]
    if result.skipped:
        lines += ["## Not measured", "", "| model | backend | precision | form | batch | reason |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k.model} | {k.backend} | {k.precision} | {k.form} | {k.batch or 'all'} "
                  f"| {k.reason.replace('|', '/')} |" for k in result.skipped]
        lines.append("")
    path.write_text("\n".join(lines))
