"""TensorRT: everything up to the engine build runs here (profile parsing and shapes, metadata,
missing TensorRT / GPU messages, the FP16 audit, FP32 layer pinning); engine build and
runner tests run only where ``tensorrt`` imports and a CUDA GPU is present."""
from __future__ import annotations

import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from helpers import rel_err
from test_export_onnx import toy_pair
from vismlp_deploy.errors import UserError
from vismlp_deploy.export import tensorrt as trt_export
from vismlp_deploy.export.fp16_audit import FP16_MAX, audit_fp16
from vismlp_deploy.export.onnx import export_onnx
from vismlp_deploy.precision import PRECISIONS


def _has_tensorrt_gpu() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"tensorrt is not importable ({e}); TensorRT cannot be installed on this machine"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


NO_TRT = _has_tensorrt_gpu()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"engine tests need TensorRT and a GPU: {NO_TRT}")


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    train, deploy = toy_pair()
    d = tmp_path_factory.mktemp("trt")
    return train, export_onnx(deploy, d / "dyn.onnx"), export_onnx(deploy, d / "static.onnx", dynamic_batch=False, batch=4)


@pytest.mark.parametrize("text,expected", [("1:8:32", (1, 8, 32)), ("4", (4, 4, 4)), ("2:2:2", (2, 2, 2))])
def test_parse_dynamic_batch(text, expected):
    assert trt_export.parse_dynamic_batch(text) == expected


@pytest.mark.parametrize("text", ["8:1:32", "0:1:2", "a:b:c", "1:2", "1:2:3:4", ""])
def test_parse_dynamic_batch_refuses(text):
    with pytest.raises(UserError, match="dynamic-batch"):
        trt_export.parse_dynamic_batch(text)


def test_profile_shapes(toy_onnx):
    _, dyn, static = toy_onnx
    assert trt_export.profile_shapes(dyn, (1, 8, 32)) == {
        "input": "input", "min": (1, 3, 16, 16), "opt": (8, 3, 16, 16), "max": (32, 3, 16, 16)}
    assert trt_export.profile_shapes(dyn, None)["max"] == (32, 3, 16, 16)  # the default 1:8:32
    assert trt_export.profile_shapes(static, None)["min"] == trt_export.profile_shapes(static, None)["max"] == (4, 3, 16, 16)
    with pytest.raises(UserError, match="static batch of 4"):
        trt_export.profile_shapes(static, (1, 8, 32))


def test_engine_metadata_written_beside_plan(toy_onnx, tmp_path):
    _, dyn, _ = toy_onnx
    profile = trt_export.profile_shapes(dyn, (1, 4, 16))
    audit = audit_fp16(onnx.load(str(dyn)))
    meta = trt_export.engine_metadata(dyn, trt_version="10.9.0", gpu="NVIDIA H100", compute_capability="9.0",
                                      precision="fp16", profile=profile, workspace_gib=2.0, strongly_typed=False,
                                      audit=audit, built_from=dyn, build_s=1.5, timing_cache="/tmp/c")
    path = trt_export.write_engine_metadata(tmp_path / "m.engine", meta)
    assert path.name == "m.engine.json"
    back = json.loads(path.read_text())
    assert back["source_onnx_sha256"] == hashlib.sha256(dyn.read_bytes()).hexdigest()
    assert back["profile"] == {"input": "input", "min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [16, 3, 16, 16]}
    assert back["tensorrt"] == "10.9.0" and back["gpu"] == "NVIDIA H100" and back["precision"] == "fp16"
    assert back["model"]["form"] == "deploy" and back["fp16_audit"]["keep_fp32_nodes"]


def test_missing_tensorrt_message(toy_onnx, tmp_path, monkeypatch):
    _, dyn, _ = toy_onnx
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails like on a machine without it
    with pytest.raises(UserError) as e:
        trt_export.build_engine(dyn, tmp_path / "x.engine", precision="fp16")
    msg = str(e.value)
    assert "TensorRT is not installed" in msg and "pip install tensorrt" in msg and str(dyn) in msg
    assert not (tmp_path / "x.engine").exists()


def test_missing_gpu_message(toy_onnx, tmp_path, monkeypatch):
    _, dyn, _ = toy_onnx
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU is usable: TensorRT 10.9.0") as e:
        trt_export.build_engine(dyn, tmp_path / "x.engine", precision="fp32")
    assert "CUDA build of PyTorch" in str(e.value) and str(dyn) in str(e.value)


def test_build_engine_refuses_bad_precision(toy_onnx, tmp_path):
    with pytest.raises(UserError, match="precision"):
        trt_export.build_engine(toy_onnx[1], tmp_path / "x.engine", precision="int8")


def _gemm_model(bias_value: float, weight_value: float = 0.5) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [weight_value] * 15 + [1e-9]),
             helper.make_tensor("b", TensorProto.FLOAT, [4], [bias_value, 0, 0, 0]),
             helper.make_tensor("g", TensorProto.FLOAT, [4], [1] * 4), helper.make_tensor("be", TensorProto.FLOAT, [4], [0] * 4)]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
             helper.make_node("LayerNormalization", ["h", "g", "be"], ["y"], name="ln", axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_audit_flags_out_of_range_and_norms():
    audit = audit_fp16(_gemm_model(2 * FP16_MAX))
    assert audit.keep_fp32_nodes == ["fc", "ln"] and audit.keep_fp32_op_types == ["LayerNormalization"]
    reasons = {(f.node, f.keep_fp32): f.reason for f in audit.findings}
    assert "FP16 max" in reasons[("fc", True)] and "flush to zero" in reasons[("fc", False)]
    assert audit_fp16(_gemm_model(1.0)).keep_fp32_nodes == ["ln"]  # in range: only the norm stays FP32
    assert audit_fp16(_gemm_model(2 * FP16_MAX), precision="bf16").keep_fp32_nodes == ["ln"]  # bf16 has FP32's range
    assert audit_fp16(_gemm_model(1.0), keep_norms=False).keep_fp32_nodes == []


def test_fp16_audit_catches_a_folded_bn_overflow(tmp_path):
    """A BN with a large gamma and tiny variance folds into conv weights beyond FP16 range."""
    train, _ = toy_pair()
    with torch.no_grad():
        train.stem.bn.weight.fill_(1e4)
        train.stem.bn.running_var.fill_(1e-4)
    from vismlp_deploy import reparameterize

    path = export_onnx(reparameterize(train), tmp_path / "big.onnx")
    audit = audit_fp16(onnx.load(str(path)))
    conv = [f for f in audit.findings if f.op_type == "Conv" and f.keep_fp32]
    assert conv and "FP16 max" in conv[0].reason
    assert any(f.op_type == "LayerNormalization" for f in audit.findings)


class _Tensor:
    def __init__(self, dtype):
        self.dtype = dtype


class _Layer:
    def __init__(self, name, dtype="f32"):
        self.name, self.precision, self.num_outputs, self._out, self.types = name, None, 1, _Tensor(dtype), {}

    def get_output(self, j):
        return self._out

    def set_output_type(self, j, t):
        self.types[j] = t


def test_keep_layers_fp32_matches_parser_layer_names():
    fake_trt = types.SimpleNamespace(float32="f32")
    layers = [_Layer("ln"), _Layer("ln_1"), _Layer("fc"), _Layer("shape_of_ln", "i64"), _Layer("ln_shape", "i64")]
    net = types.SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    assert trt_export._keep_layers_fp32(fake_trt, net, ["ln"]) == 2
    assert [l.precision for l in layers] == ["f32", "f32", None, None, None]
    assert layers[0].types == {0: "f32"}


def test_default_timing_cache_is_per_version_and_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = trt_export.default_timing_cache("10.9.0.34", "NVIDIA H100 80GB HBM3")
    assert p.parent == tmp_path / "vismlp_deploy" and p.name == "tensorrt-10.9.0.34-NVIDIA-H100-80GB-HBM3.timing"


# --- engines (only where TensorRT and a GPU exist) ----------------------------------------

@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_engine_build_and_run(toy_onnx, tmp_path, precision):
    from vismlp_deploy.runtime.trt_runner import TrtRunner

    train, dyn, _ = toy_onnx
    cache = tmp_path / "timing.cache"
    engine = trt_export.build_engine(dyn, tmp_path / f"{precision}.engine", precision=precision,
                                     dynamic_batch=(1, 4, 8), workspace_gib=1, timing_cache=cache)
    assert engine.is_file() and cache.is_file()
    meta = json.loads(trt_export.metadata_path(engine).read_text())
    assert meta["precision"] == precision and meta["profile"]["max"] == [8, 3, 16, 16]
    runner = TrtRunner(engine)
    assert (runner.input_name, runner.output_name, runner.precision) == ("input", "logits", precision)
    for b in (1, 7, 11):  # 11 > MAX: chunked
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            ref = train(x)
        assert rel_err(runner.run(x), ref) <= PRECISIONS[precision].tolerance


@needs_trt
def test_engine_static_batch(toy_onnx, tmp_path):
    from vismlp_deploy.runtime.trt_runner import TrtRunner

    train, _, static = toy_onnx
    engine = trt_export.build_engine(static, tmp_path / "s.engine", precision="fp32", dynamic_batch=None)
    runner = TrtRunner(engine)
    x = torch.randn(6, 3, 16, 16)  # 4 + 2 padded to MIN = 4
    with torch.no_grad():
        assert rel_err(runner.run(x), train(x)) <= PRECISIONS["fp32"].tolerance
    assert np.isfinite(runner.run(x).numpy()).all()
