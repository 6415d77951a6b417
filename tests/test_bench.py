"""bench: timing statistics, interleaving, the sweep's records and ratios, CSV/PNG/markdown, CLI --json.

Functional only: nothing here asserts a speed.
"""
from __future__ import annotations

import csv
import json

import pytest

from tiny_model import tiny, tiny_checkpoint
from vismlp_deploy.bench.report import CSV_FIELDS, write_csv, write_markdown, write_png
from vismlp_deploy.bench.run import bench
from vismlp_deploy.bench.sweep import BenchResult, Ratio
from vismlp_deploy.bench.targets import target_lines
from vismlp_deploy.bench.timing import Candidate, Clock, Timing, measure
from vismlp_deploy.cli import main

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


def test_records_ratios_and_peak(result):
    assert len(result.records) == 2 * 2 * 2  # backends that ran × forms × batch sizes
    for r in result.records:
        d = r.to_dict()
        assert RECORD_FIELDS <= set(d) and set(d["latency_ms"]) == {"median", "p90", "p99"}
        assert d["images_per_sec"] == pytest.approx(r.batch / (d["latency_ms"]["median"] / 1e3))
        assert r.gflops_per_sec > 0 and r.fraction_of_peak == pytest.approx(r.gflops_per_sec / result.gemm_peak_gflops)
    ips = {(r.backend, r.form, r.batch): r.images_per_sec for r in result.records}
    assert len(result.ratios) == 4
    for q in result.ratios:
        assert q.deploy_over_train == pytest.approx(ips[(q.backend, "deploy", q.batch)] / ips[(q.backend, "train", q.batch)])
    assert result.gemm_peak_gflops > 0
    # TensorRT cannot run on CPU: reported, not silently dropped
    assert {(s.backend, s.form) for s in result.skipped} == {("tensorrt", "train"), ("tensorrt", "deploy")}
    assert all("CUDA" in s.reason for s in result.skipped)
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
    assert "TensorRT needs a CUDA device" in md


def test_targets_report_what_was_measured(result):
    slow = Ratio("Tiny", "torch", 8, "fp32", 0.9)
    lines = target_lines(BenchResult(records=result.records, ratios=[*result.ratios, slow], machine=result.machine))
    text = "\n".join(lines)
    # the tiny model's own ratios are timing noise: count them, do not assume them
    fast = sum(r.deploy_over_train >= 1.0 for r in result.ratios)
    assert f"{fast} of {len(result.ratios) + 1} measured ratios are ≥ 1.0" in text
    assert "| Tiny | torch | fp32 | 8 | 0.900 |" in text
    assert "| resmlp_12 | not measured |" in text


def test_cli_bench_json_csv_png(tmp_path, capsys):
    ckpt = tmp_path / "tiny.pth"
    tiny_checkpoint(ckpt)
    rc = main(["bench", str(ckpt), "--backends", "torch,onnxruntime", "--batch-sizes", "1,2", "--repeats", "2",
               "--warmup", "1", "--threads", "1", "--json", "--csv", str(tmp_path / "r.csv"), "--png", str(tmp_path / "r.png")])
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
    with pytest.raises(SystemExit) as e:
        main(["bench", "resmlp_12", "--batch-sizes", "0"])
    assert e.value.code == 2
