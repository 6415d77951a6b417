"""bench: timing statistics, interleaving, the sweep's records and ratios, CSV/PNG/markdown, CLI --json.

Functional only: nothing here asserts a speed.
"""
from __future__ import annotations

import csv
import json

import pytest
from helpers import load_script
from tiny_model import tiny, tiny_checkpoint

from vismlp_deploy.benchmark.peak import ort_gemm_peak
from vismlp_deploy.benchmark.report import CSV_FIELDS, write_csv, write_markdown, write_png
from vismlp_deploy.benchmark.run import bench
from vismlp_deploy.benchmark.sweep import BenchResult, Ratio, Record
from vismlp_deploy.benchmark.timing import Candidate, Clock, Timing, measure, paired_ratios
from vismlp_deploy.cli import main

target_lines = load_script("zoo_report").target_lines
RECORD_FIELDS = {"backend", "form", "batch", "precision", "device", "images_per_sec", "latency_ms", "gflops_per_sec"}
FAST = dict(batch_sizes=(1, 2), repeats=2, min_repeats=1, warmup=1, peak_sizes=(128,))


@pytest.fixture(scope="module")
def result() -> BenchResult:
    return bench(tiny(), backends=("torch", "onnxruntime", "tensorrt"), **FAST)


def test_timing_quantiles():
    t = Timing([0.004, 0.001, 0.003, 0.002, 0.005])
    assert t.median == 0.003
    assert t.quantile(0.0) == 0.001 and t.quantile(1.0) == 0.005
    assert t.quantile(0.9) == pytest.approx(0.0046)
    assert t.latency_ms() == pytest.approx({"median": 3.0, "p90": 4.6, "p99": 4.96})
    assert t.spread == pytest.approx((0.004 - 0.002) / 0.003)


def test_measure_interleaves_and_rotates():
    calls = []
    cands = {n: Candidate(lambda n=n: calls.append(n), Clock()) for n in "ab"}
    timings = measure(cands, warmup=1, repeats=4)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then rotated rounds
    assert all(len(t.samples) == 4 for t in timings.values())


def test_paired_ratios_cancel_drift():
    # the machine slows down 3x over the rounds; deploy is 2x faster within every round
    train = Timing([0.2, 0.4, 0.6])
    deploy = Timing([0.1, 0.2, 0.3])
    assert paired_ratios(train, deploy).samples == pytest.approx([2.0, 2.0, 2.0])
    with pytest.raises(ValueError):
        paired_ratios(train, Timing([0.1]))


def test_records_ratios_and_peak(result):
    assert len(result.records) == 2 * 2 * 2  # backends that ran × forms × batch sizes
    for r in result.records:
        d = r.to_dict()
        assert RECORD_FIELDS <= set(d) and set(d["latency_ms"]) == {"median", "p90", "p99"}
        assert d["images_per_sec"] == pytest.approx(r.batch / (d["latency_ms"]["median"] / 1e3))
        assert r.gflops_per_sec > 0 and r.fraction_of_peak == pytest.approx(r.gflops_per_sec / result.gemm_peak_gflops)
    recs = {(r.backend, r.form, r.batch): r for r in result.records}
    assert len(result.ratios) == 4
    for q in result.ratios:
        assert q.q25 <= q.deploy_over_train <= q.q75
        train, deploy = recs[(q.backend, "train", q.batch)], recs[(q.backend, "deploy", q.batch)]
        # deploy at the GEMM peak: its FLOPs per batch / peak, against the measured train time
        best_deploy_s = q.batch * deploy.flops_per_image / (result.gemm_peak_gflops * 1e9)
        assert q.gemm_bound == pytest.approx(train.latency_ms["median"] / 1e3 / best_deploy_s)
    assert result.gemm_peak_gflops > 0
    # TensorRT cannot run on CPU: reported, not silently dropped
    assert {(s.backend, s.form) for s in result.skipped} == {("tensorrt", "train"), ("tensorrt", "deploy")}
    assert all("runs on cuda, not cpu" in s.reason for s in result.skipped)
    doc = json.loads(json.dumps(result.to_dict()))
    assert {"results", "ratios", "gemm_peak_gflops"} <= set(doc)


def test_csv_png_markdown(result, tmp_path):
    write_csv(result, tmp_path / "b.csv")
    rows = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert len(rows) == len(result.records) and tuple(rows[0]) == CSV_FIELDS
    assert all(r["deploy_over_train"] for r in rows)
    write_png(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_markdown(result, tmp_path / "b.md", command="vismlp-deploy bench zoo", csv_name="b.csv", png_name="b.png",
                   targets=target_lines(result))
    md = (tmp_path / "b.md").read_text()
    assert "vismlp-deploy bench zoo" in md and "![" in md and "| Tiny | onnxruntime | fp32 | 2 |" in md
    assert "tensorrt runs on cuda, not cpu" in md


def test_targets_report_what_was_measured(result):
    slow = Ratio("Tiny", "torch", 8, "fp32", 0.9, 0.85, 0.95)
    lines = target_lines(BenchResult(records=result.records, ratios=[*result.ratios, slow], machine=result.machine))
    text = "\n".join(lines)
    # the tiny model's own ratios are timing noise: count them, do not assume them
    fast = sum(r.deploy_over_train >= 1.0 for r in result.ratios)
    assert f"{fast} of {len(result.ratios) + 1} measured ratios are ≥ 1.0" in text
    assert "| Tiny | torch | fp32 | 8 | 0.900 | 0.850 – 0.950 |" in text
    assert "| resmlp_12 | not measured |" in text


def test_ratio_target_against_gemm_bound(result):
    def rec(form, ips):
        return Record("resmlp_12", "resmlp", "onnxruntime", form, 8, "fp32", "cpu", [3, 224, 224], ips,
                      {"median": 8e3 / ips, "p90": 0, "p99": 0}, 0.0, 3, 10**9, None, None)

    ratios = [Ratio("resmlp_12", "onnxruntime", 8, "fp32", 1.05, 1.0, 1.1, gemm_bound=1.08)]
    text = "\n".join(target_lines(BenchResult(records=[rec("train", 10.0), rec("deploy", 10.5)], ratios=ratios,
                                               machine={"device": "cpu"})))
    assert ("| resmlp_12 | resmlp | 1.05 | 1.00 – 1.10 | 1.08 | ≥ 1.1 | **not met** (target above the GEMM bound) |"
            in text)
    ratios[0].gemm_bound = 1.5
    text = "\n".join(target_lines(BenchResult(records=[rec("train", 10.0)], ratios=ratios, machine={"device": "cpu"})))
    assert "| 1.50 | ≥ 1.1 | **not met** |" in text


def test_cli_bench_json_csv_png(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pth"
    tiny_checkpoint(ckpt)
    rc = main(["bench", str(ckpt), "--backends", "torch,onnxruntime", "--batch-sizes", "1,2", "--repeats", "2",
               "--warmup", "1", "--threads", "1", "--json", "--csv", str(tmp_path / "r.csv"),
               "--png", str(tmp_path / "r.png")])
    out = capsys.readouterr().out
    doc = json.loads(out)  # exactly one document
    assert rc == 0 and len(doc["results"]) == 8 and len(doc["ratios"]) == 4 and doc["gemm_peak_gflops"] > 0
    assert all(RECORD_FIELDS <= set(r) for r in doc["results"])
    assert set(doc["ratios"][0]) >= {"backend", "batch", "precision", "deploy_over_train"}
    assert doc["machine"]["threads"] == 1
    assert (tmp_path / "r.csv").exists() and (tmp_path / "r.png").exists()


def test_cli_bench_bad_arguments_exit_2(capsys):
    assert main(["bench", "resmlp_12", "--backends", "tflite"]) == 2
    assert main(["bench", "no_such_model"]) == 2
    assert main(["bench", "resmlp_12", "--batch-sizes", "0"]) == 2
    assert main(["bench", "resmlp_12", "--backends", "tensorrt"]) == 2  # cannot run on a CPU: said before any work


def test_ort_gemm_peak_measures_mlas():
    peak = ort_gemm_peak(sizes=(128,), repeats=2, threads=1)
    assert peak.gflops > 0 and peak.kernel == "onnxruntime MatMul" and peak.size == 128


def test_bench_zoo_exports_ahead_then_times(tmp_path, monkeypatch, capsys):
    """`bench-zoo`: ONNX files come from the worker pool (the sweep exports nothing itself), reports are written."""
    import vismlp_deploy.export.onnx as onnx_export

    def no_export(*a, **k):
        raise AssertionError("the sweep exported in-process: the pool's files were not used")

    monkeypatch.setattr(onnx_export, "export_onnx", no_export)
    rc = main(["bench-zoo", "--models", "mixer_s32", "--backends", "onnxruntime", "--threads", "1",
               "--repeats", "3", "--warmup", "1", "--max-time", "0.1", "--export-workers", "1",
               "--out-dir", str(tmp_path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and not doc["skipped"], doc["skipped"]
    assert {(r["form"], r["batch"]) for r in doc["results"]} == {("train", 8), ("deploy", 8)}
    assert doc["gemm_peaks"]["fp32"]["kernel"] in ("torch.mm", "onnxruntime MatMul")
    assert set(doc["wall_s"]) == {"export", "sweep"} and doc["settings"]["export_workers"] == 1
    rows = list(csv.DictReader(open(tmp_path / "benchmarks.csv")))
    assert len(rows) == 2 and all(float(r["gemm_bound"]) > 0 for r in rows)
    assert "mixer_s32" in (tmp_path / "benchmarks.md").read_text() and (tmp_path / "benchmarks.png").exists()


def test_ort_runner_spinning_switch(tmp_path):
    from vismlp_deploy.export.onnx import export_onnx
    from vismlp_deploy.runtime.ort_runner import OrtRunner

    path = export_onnx(tiny(), tmp_path / "t.onnx")
    key = "session.intra_op.allow_spinning"
    assert OrtRunner(path, threads=1, spin=False).session.get_session_options().get_session_config_entry(key) == "0"
    # not set: ONNX Runtime's default (spinning) applies
    with pytest.raises(RuntimeError, match="does not have configuration"):
        OrtRunner(path, threads=1).session.get_session_options().get_session_config_entry(key)
