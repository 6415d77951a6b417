"""``convert --to pt|onnx|trt``: staged proofs, exit codes, artifacts left behind."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from helpers import assert_close
from test_export_onnx import Toy

from vismlp_deploy.cli import main
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.models.registry import FORMATS, register_format
from vismlp_deploy.runtime.ort_runner import OrtRunner

ARCH = "test-convert-toy"


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint of the hand-made model under a temporarily registered format."""
    register_format(ARCH, family="toy", build=lambda cfg: Toy(**cfg), matches=lambda sd: "mlp1.norm.alpha" in sd,
                    infer_config=lambda sd: {"dim": sd["stem.conv.weight"].shape[0]},
                    input_size=lambda cfg: (3, 16, 16), description="test model")
    path = tmp_path / "toy.pth"
    torch.save(randomize_(Toy(), seed=3).state_dict(), path)
    yield path
    del FORMATS[ARCH]


def _convert(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(["convert", *map(str, argv), "--arch", ARCH, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def _stage_rows(doc: dict) -> list[str]:
    for row in doc["proof"]:
        assert {"max_abs", "rel", "cosine", "top1", "tolerance", "passed"} <= set(row)
    return [row["candidate"] for row in doc["proof"]]


def test_to_onnx_proves_every_stage(ckpt, capsys):
    code, doc, _ = _convert(capsys, ckpt, "--to", "onnx")
    assert code == 0 and doc["passed"]
    assert _stage_rows(doc) == ["deploy (torch fp32)", "onnxruntime (cpu fp32)"]
    assert all(r["rel"] <= 1e-5 and r["top1"] == 1.0 for r in doc["proof"])
    path = ckpt.with_name("toy.onnx")
    assert doc["artifacts"] == {"onnx": str(path)} and doc["onnx"]["simplified"]
    onnx.checker.check_model(str(path))
    train = randomize_(Toy(), seed=3).eval()
    for b in (1, 7):
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            assert_close(OrtRunner(path).run(x), train(x))


def test_to_onnx_static_batch(ckpt, capsys):
    code, doc, _ = _convert(capsys, ckpt, "--to", "onnx", "--static-batch", "2", "--out", ckpt.with_name("s.onnx"))
    assert code == 0 and doc["passed"] and doc["onnx"]["dynamic_batch"] is False
    assert OrtRunner(ckpt.with_name("s.onnx")).static_batch == 2


@pytest.mark.skipif(torch.cuda.is_available() and __import__("importlib").util.find_spec("tensorrt") is not None,
                    reason="TensorRT and a GPU are present: --to trt builds an engine here")
def test_to_trt_without_tensorrt_exits_2_and_keeps_the_onnx(ckpt, capsys):
    code, doc, err = _convert(capsys, ckpt, "--to", "trt", "--dynamic-batch", "1:4:8")
    assert code == 2
    assert "pip install tensorrt" in err or "CUDA" in err
    onnx_path = ckpt.with_name("toy.onnx")
    assert doc["artifacts"] == {"onnx": str(onnx_path)} and "error" in doc
    assert _stage_rows(doc) == ["deploy (torch fp32)", "onnxruntime (cpu fp32)"] and doc["passed"]
    onnx.checker.check_model(str(onnx_path))
    assert OrtRunner(onnx_path).run(torch.randn(3, 3, 16, 16)).shape == (3, 10)
    assert not ckpt.with_name("toy.engine").exists()


@pytest.mark.parametrize("flag, typing", [((), None), (("--weak-typing",), False)])
def test_weak_typing_reaches_the_engine_build(ckpt, capsys, monkeypatch, flag, typing):
    """``--weak-typing`` asks build_engine for the weakly typed network; without it the builder decides."""
    from vismlp_deploy.errors import UserError
    from vismlp_deploy.export import tensorrt

    seen = {}

    def fake_build(onnx_path, engine, **kw):
        seen.update(kw)
        raise UserError("stop here: no TensorRT in this test")
    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    code, _, err = _convert(capsys, ckpt, "--to", "trt", *flag)
    assert code == 2 and "stop here" in err and seen["strongly_typed"] is typing


def test_to_pt_still_works_and_outputs_are_not_overwritten(ckpt, capsys):
    code, doc, _ = _convert(capsys, ckpt, "--to", "pt")
    assert code == 0 and _stage_rows(doc) == ["deploy (torch fp32)"] and ckpt.with_name("toy.deploy.pt").is_file()
    code, doc, err = _convert(capsys, ckpt, "--to", "pt")
    assert code == 2 and doc is None and "--force" in err


def test_bad_profile_is_a_usage_error(ckpt, capsys):
    code, doc, err = _convert(capsys, ckpt, "--to", "onnx", "--dynamic-batch", "8:1:2")
    assert code == 2 and doc is None and "MIN <= OPT <= MAX" in err
    assert not ckpt.with_name("toy.onnx").exists()


def test_human_output_prints_the_proof_table(ckpt, capsys):
    assert main(["convert", str(ckpt), "--arch", ARCH, "--to", "onnx"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "onnxruntime" in err and "FAIL" not in err and "pass" in err and "dynamo exporter" in err


def test_default_names_keep_the_whole_stem(tmp_path, capsys):
    """``run.ep10.pth`` and ``run.ep20.pth`` must not both become ``run.onnx``."""
    from tiny_model import tiny_checkpoint

    for name in ("run.ep10.pth", "run.ep20.pth"):
        tiny_checkpoint(tmp_path / name)
    code = main(["convert", str(tmp_path / "run.ep*.pth"), "--to", "onnx", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["passed"]
    assert [r["artifacts"]["onnx"] for r in doc["results"]] == [str(tmp_path / "run.ep10.onnx"),
                                                                  str(tmp_path / "run.ep20.onnx")]


def test_several_models_one_line_each_and_the_worst_exit_code(tmp_path, capsys):
    from tiny_model import tiny_checkpoint

    tiny_checkpoint(tmp_path / "good.pth")
    (tmp_path / "bad.pth").write_bytes(b"")
    code = main(["convert", str(tmp_path / "good.pth"), str(tmp_path / "bad.pth"), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2
    assert err[0].startswith("ok ") and "good.deploy.pt" in err[0]
    assert err[1].startswith("error ") and "is empty" in err[1]
    assert (tmp_path / "good.deploy.pt").is_file() and not (tmp_path / "bad.deploy.pt").exists()


def test_a_named_config_converts_like_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["convert", "mixer_s32", "--config", '{"num_blocks": 1, "num_classes": 10}', "--input-size", "64",
                 "--to", "onnx", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["passed"] and doc["artifacts"] == {"onnx": "mixer_s32.onnx"}
    assert OrtRunner(tmp_path / "mixer_s32.onnx").run(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_a_deploy_artifact_exports_against_its_own_form(ckpt, capsys):
    assert _convert(capsys, ckpt, "--to", "pt")[0] == 0
    code = main(["convert", str(ckpt.with_name("toy.deploy.pt")), "--to", "onnx", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["candidate"] for r in doc["proof"]] == ["onnxruntime (cpu fp32)"]
    assert doc["proof"][0]["reference"] == "deploy (torch fp32)" and ckpt.with_name("toy.onnx").is_file()


def test_int8_from_an_onnx_file_and_an_int8_graph_is_not_quantized_again(ckpt, tmp_path, capsys):
    """--to onnx --precision int8 of an fp32 .onnx quantizes it; a Q/DQ .onnx is refused for --to onnx and needs no
    --calib for --to trt (without TensorRT that stops at exit 2 after the checks, with nothing new written)."""
    import numpy as np

    calib = tmp_path / "calib.npy"
    np.save(calib, torch.randn(300, 3, 16, 16, generator=torch.Generator().manual_seed(0)).numpy())
    assert _convert(capsys, ckpt, "--to", "onnx")[0] == 0
    fp32 = ckpt.with_name("toy.onnx")
    code = main(["convert", str(fp32), "--to", "onnx", "--precision", "int8", "--calib", str(calib),
                 "--calib-holdout", "100", "--min-agreement", "0", "--json"])
    doc = json.loads(capsys.readouterr().out)
    int8 = ckpt.with_name("toy.int8.onnx")
    assert code == 0 and doc["artifacts"] == {"onnx_int8": str(int8)} and OrtRunner(int8).precision == "int8"
    assert doc["proof"][0]["inputs"] == "held-out" and doc["proof"][0]["precision"] == "int8"
    assert main(["convert", str(int8), "--to", "onnx", "--precision", "int8", "--calib", str(calib)]) == 2
    assert "already an int8" in capsys.readouterr().err
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", str(int8), "--to", "trt", "--precision", "int8"]) == 2
    assert "--calib" not in capsys.readouterr().err and sorted(p.name for p in tmp_path.iterdir()) == before
