"""The backend registry: a backend registered in one place appears in verify, bench and --help.

The new backend here is a real one, not a mock: the deploy form in float64 (an exact reference
runner), wrapped by a Runner subclass that counts its lifecycle calls.
"""
from __future__ import annotations

import json

import pytest
import torch
from tiny_model import tiny, tiny_checkpoint

from vismlp_deploy.benchmark.run import bench
from vismlp_deploy.cli import build_parser, main
from vismlp_deploy.runtime import backends as B
from vismlp_deploy.runtime.base import Runner
from vismlp_deploy.runtime.source import as_source
from vismlp_deploy.verification.compare import default_runners, verify


class Float64Runner(Runner):
    """A torch form run in float64 on the CPU; counts activate/deactivate."""

    events: list[str] = []

    def __init__(self, model: torch.nn.Module, name: str):
        self.model, self.name = model.double().eval(), name

    def _activate(self) -> None:
        self.events.append("activate")

    def _deactivate(self) -> None:
        self.events.append("deactivate")

    def run_native(self, batch):
        with torch.inference_mode():
            return self.model(batch.double())


@pytest.fixture
def f64_backend():
    Float64Runner.events = []
    B.register_backend("torch-f64", description="the torch form in float64", precisions=("fp32",), devices=("cpu",),
                       make=lambda factory, form, precision: Float64Runner(factory.module(form), f"torch-f64-{form}"))
    yield B.BACKENDS["torch-f64"]
    del B.BACKENDS["torch-f64"]


def test_registered_backend_runs_in_verify_with_its_lifecycle(f64_backend):
    res = verify(tiny(), ("train", "torch-f64", "torch-f64:train"), images=None, batch=3)
    assert [c.candidate for c in res.comparisons] == ["torch-f64", "torch-f64:train"]
    assert res.passed and all(c.stats.rel <= 1e-5 for c in res.comparisons)
    assert Float64Runner.events == ["activate", "activate", "deactivate", "deactivate"]


def test_registered_backend_is_a_default_where_it_can_run(f64_backend):
    src = as_source(tiny())
    assert "torch-f64" in default_runners(src, "cpu", "fp32")
    assert "torch-f64" not in default_runners(src, "cpu", "int8")  # it does not run int8
    assert "torch-f64" not in B.default_backends("cuda")


def test_registered_backend_is_benchmarked(f64_backend):
    result = bench(tiny(), backends=("torch-f64",), batch_sizes=(2,), repeats=2, min_repeats=1, warmup=1,
                   peak_sizes=(64,))
    assert {(r.backend, r.form) for r in result.records} == {("torch-f64", "train"), ("torch-f64", "deploy")}
    assert len(result.ratios) == 1 and not result.skipped


def test_registered_backend_appears_in_help_and_the_cli(f64_backend, tmp_path, capsys):
    sub = {a.dest: a for a in build_parser()._actions if a.dest == "command"}["command"]
    for command in ("verify", "bench"):
        assert "torch-f64" in sub.choices[command].format_help()
    ckpt = tmp_path / "t.pth"
    tiny_checkpoint(ckpt)
    assert main(["verify", str(ckpt), "--runners", "train,torch-f64", "--images", "none", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["candidate"] for c in doc["comparisons"]] == ["torch-f64"] and doc["passed"]


def test_registry_refuses_names_that_break_the_runner_grammar():
    for bad in ("train", "a:b", "x,y"):
        with pytest.raises(ValueError):
            B.register_backend(bad, description="", precisions=("fp32",), devices=("cpu",), make=lambda *a: None)
    with pytest.raises(ValueError, match="twice"):
        B.register_backend("torch", description="", precisions=("fp32",), devices=("cpu",), make=lambda *a: None)


def test_why_not_explains_device_precision_and_availability():
    ort = B.get_backend("onnxruntime")
    assert ort.why_not("cpu", "fp32") is None
    assert "not bf16" in ort.why_not("cpu", "bf16")
    assert "runs on cuda, not cpu" in B.get_backend("tensorrt").why_not("cpu")
    assert "CUDA" in B.get_backend("torch").why_not("cpu", "tf32")
