"""TensorRT: everything up to the engine build runs here (profile parsing and shapes, metadata,
missing TensorRT / GPU messages, int8 input checks, the FP16 audit on real exporter output);
engine build and runner tests run only where ``tensorrt`` imports and a CUDA GPU is present.
The API calls of each TensorRT version branch are checked in test_tensorrt_contract.py."""
from __future__ import annotations

import hashlib
import json
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from helpers import rel_err
from onnx import TensorProto, helper
from test_export_onnx import toy_pair
from torch import nn

from vismlp_deploy.errors import UserError
from vismlp_deploy.export import tensorrt as trt_export
from vismlp_deploy.export.fp16_audit import FP16_MAX, audit_fp16
from vismlp_deploy.export.onnx import export_onnx
from vismlp_deploy.models.asmlp import GroupNorm1
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.precision import PRECISIONS
from vismlp_deploy.runtime.ort_runner import OrtRunner


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


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path):
    """Default timing caches go under this test's tmp dir, never into the real ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory):
    train, deploy = toy_pair()
    d = tmp_path_factory.mktemp("trt")
    static = export_onnx(deploy, d / "static.onnx", dynamic_batch=False, batch=4)
    return train, export_onnx(deploy, d / "dyn.onnx"), static


@pytest.fixture(scope="module")
def qdq_onnx(toy_onnx, tmp_path_factory):
    """The toy's ONNX quantized by ONNX Runtime (QDQ, symmetric int8, zero points 0: TensorRT's explicit form)."""
    return quantize_qdq(toy_onnx[1], tmp_path_factory.mktemp("qdq") / "int8.onnx")


def quantize_qdq(onnx_path, out_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            gen = np.random.default_rng(0)
            self.batches = iter([{"input": gen.standard_normal((2, 3, 16, 16), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(onnx_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out_path


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
    shapes = trt_export.profile_shapes(static, None)
    assert shapes["min"] == shapes["max"] == (4, 3, 16, 16)
    with pytest.raises(UserError, match="static batch of 4"):
        trt_export.profile_shapes(static, (1, 8, 32))


def test_engine_metadata_written_beside_plan(toy_onnx, tmp_path):
    _, dyn, _ = toy_onnx
    profile = trt_export.profile_shapes(dyn, (1, 4, 16))
    audit = audit_fp16(onnx.load(str(dyn)))
    kept = {"by": "TensorRT layer constraints", "nodes": audit.keep_fp32_nodes}
    meta = trt_export.engine_metadata(dyn, trt_version="10.9.0", gpu="NVIDIA H100", compute_capability="9.0",
                                      precision="fp16", profile=profile, workspace_gib=2.0, strongly_typed=False,
                                      builder_flags=["FP16", "OBEY_PRECISION_CONSTRAINTS"], audit=audit,
                                      kept_fp32=kept, built_from=dyn, build_s=1.5, timing_cache="/tmp/c")
    path = trt_export.write_engine_metadata(tmp_path / "m.engine", meta)
    assert path.name == "m.engine.json"
    back = json.loads(path.read_text())
    assert back["source_onnx_sha256"] == hashlib.sha256(dyn.read_bytes()).hexdigest()
    assert back["profile"] == {"input": "input", "min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [16, 3, 16, 16]}
    assert back["tensorrt"] == "10.9.0" and back["gpu"] == "NVIDIA H100" and back["precision"] == "fp16"
    assert back["model"]["form"] == "deploy" and back["fp16_audit"]["keep_fp32_nodes"]
    assert back["kept_fp32"] == kept and back["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]


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


@pytest.mark.parametrize("precision,message", [("fp64", "cannot build an engine"), ("int4", "unknown precision")])
def test_build_engine_refuses_bad_precision(toy_onnx, tmp_path, precision, message):
    with pytest.raises(UserError, match=message):
        trt_export.build_engine(toy_onnx[1], tmp_path / "x.engine", precision=precision)


def test_int8_needs_a_qdq_onnx_and_a_qdq_onnx_needs_int8(toy_onnx, qdq_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # both refusals come before TensorRT is needed
    with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear nodes.*Quantize it first"):
        trt_export.build_engine(toy_onnx[1], tmp_path / "x.engine", precision="int8")
    with pytest.raises(UserError, match="is quantized.*build it with precision int8"):
        trt_export.build_engine(qdq_onnx, tmp_path / "x.engine", precision="fp16")
    with pytest.raises(UserError, match="TensorRT is not installed"):  # a Q/DQ ONNX asked for int8 gets that far
        trt_export.build_engine(qdq_onnx, tmp_path / "x.engine", precision="int8")
    assert not list(tmp_path.glob("x.engine*"))


def _gemm_model(bias_value: float, weight_value: float = 0.5) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [weight_value] * 15 + [1e-9]),
             helper.make_tensor("b", TensorProto.FLOAT, [4], [bias_value, 0, 0, 0]),
             helper.make_tensor("g", TensorProto.FLOAT, [4], [1] * 4),
             helper.make_tensor("be", TensorProto.FLOAT, [4], [0] * 4)]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
             helper.make_node("LayerNormalization", ["h", "g", "be"], ["y"], name="ln", axis=-1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 17)])


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


class DecomposedGroupNorm(nn.Module):
    """GroupNorm(1, C) written out as reductions, as a user's model (or an older exporter) has it."""

    def forward(self, x):
        xc = x - x.mean(dim=(1, 2, 3), keepdim=True)
        return xc * torch.rsqrt((xc * xc).mean(dim=(1, 2, 3), keepdim=True) + 1e-5)


class ConvGN(nn.Module):
    """(N, 3, 8, 8) -> (N, 4): three convs around a decomposed GroupNorm(1, C)."""

    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 8, 3, padding=1), DecomposedGroupNorm()
        self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.input_size = (3, 8, 8)

    def forward(self, x):
        return self.c3(self.c2(self.gn(self.c1(x)))).mean((2, 3))


def conv_gn_onnx(path, first_conv_peak: float | None = None):
    """ConvGN exported by the package's exporter; ``first_conv_peak``: one weight of c1 beyond FP16."""
    model = randomize_(ConvGN(), 0).eval()
    if first_conv_peak is not None:
        with torch.no_grad():
            model.c1.weight[0, 0, 0, 0] = first_conv_peak
    return export_onnx(model, path)


def test_fp16_audit_names_follow_the_exporter(tmp_path):
    """Exporter names (node_conv2d, node_conv2d_1, ...): flagging one conv flags that one only."""
    model = onnx.load(str(conv_gn_onnx(tmp_path / "m.onnx", first_conv_peak=1e5)))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert convs == ["node_conv2d", "node_conv2d_1", "node_conv2d_2"]  # the naming the audit must not confuse
    kept = audit_fp16(model).keep_fp32_nodes
    assert "node_conv2d" in kept and "node_conv2d_1" not in kept and "node_conv2d_2" not in kept
    assert set(kept) <= {n.name for n in model.graph.node}


def _chain(model: onnx.ModelProto) -> list[str]:
    """Op types from the GroupNorm's square to its Sqrt, in graph order."""
    ops = [(n.name, n.op_type) for n in model.graph.node]
    start = next(i for i, (_, op) in enumerate(ops) if op in ("Mul", "Pow"))
    end = next(i for i, (_, op) in enumerate(ops) if op == "Sqrt")
    return ops[start:end + 1]


def test_fp16_audit_keeps_the_decomposed_groupnorm_variance_fp32(tmp_path):
    """ReduceMean -> Sub -> Mul(x, x) -> ReduceMean -> Add(eps) -> Sqrt: the square and the
    + eps stay FP32 with the reductions (an FP16 square overflows once |x - mean| > 256)."""
    model = onnx.load(str(conv_gn_onnx(tmp_path / "gn.onnx")))
    chain = _chain(model)
    assert [op for _, op in chain] == ["Mul", "ReduceMean", "Add", "Sqrt"]
    square = model.graph.node[[n.name for n in model.graph.node].index(chain[0][0])]
    assert square.input[0] == square.input[1]  # Mul(x, x)
    audit = audit_fp16(model)
    assert {name for name, _ in chain} <= set(audit.keep_fp32_nodes)
    reasons = {f.node: f.reason for f in audit.findings}
    assert "square overflows FP16" in reasons[chain[0][0]] and "square overflows FP16" in reasons[chain[2][0]]
    normalize = [n.name for n in model.graph.node if n.op_type == "Mul" and n.input[0] != n.input[1]]
    assert normalize and not set(normalize) & set(audit.keep_fp32_nodes)  # x * rsqrt(var) stays half


def test_asmlp_groupnorm_exports_as_one_instance_norm_kept_fp32(tmp_path):
    """AS-MLP's GroupNorm(1, C): InstanceNormalization of the (N, 1, CHW) view, exact, and a norm the audit pins."""
    gn = GroupNorm1(1e-5).eval()
    gn.input_size = (8, 6, 6)
    path = export_onnx(gn, tmp_path / "gn1.onnx")
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("InstanceNormalization") == 1
    assert not {"ReduceMean", "GroupNormalization"} & {n.op_type for n in model.graph.node}
    x = torch.randn(3, 8, 6, 6) * 40 + 7
    assert rel_err(OrtRunner(path).run(x), torch.nn.functional.group_norm(x.double(), 1, eps=1e-5)) <= 1e-5
    norm = next(n.name for n in model.graph.node if n.op_type == "InstanceNormalization")
    assert norm in audit_fp16(model).keep_fp32_nodes


def _variance_model(square: str) -> onnx.ModelProto:
    """x -> x - mean -> square -> ReduceSum -> Div(N) -> Add(eps) -> Sqrt -> Div, unnamed nodes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    inits = [helper.make_tensor("two", TensorProto.INT64, [], [2]), helper.make_tensor("n", TensorProto.FLOAT, [], [8]),
             helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
             helper.make_tensor("ax", TensorProto.INT64, [1], [1])]
    sq = helper.make_node(square, ["xc", "two" if square == "Pow" else "xc"], ["sq"])
    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["m"]), helper.make_node("Sub", ["x", "m"], ["xc"]), sq,
             helper.make_node("ReduceSum", ["sq", "ax"], ["s"]), helper.make_node("Div", ["s", "n"], ["v"]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["xc", "sd"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("square", ["Mul", "Pow"])
def test_fp16_audit_variance_chain_with_sum_and_unnamed_nodes(square):
    """Unnamed nodes are named as TensorRT's parser names them (node_of_<first output>)."""
    kept = audit_fp16(_variance_model(square)).keep_fp32_nodes
    assert kept == sorted(f"node_of_{t}" for t in ("m", "sq", "s", "v", "ve", "sd"))  # not the Sub, not the last Div


def test_default_timing_cache_is_per_version_and_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = trt_export.default_timing_cache("10.9.0.34", "NVIDIA H100 80GB HBM3")
    assert p.parent == tmp_path / "vismlp_deploy" and p.name == "tensorrt-10.9.0.34-NVIDIA-H100-80GB-HBM3.timing"


# --- engines (only where TensorRT and a GPU exist) ----------------------------------------

def _skip_without_autocast(precision: str) -> None:
    """TensorRT 11 builds fp16/bf16 only from an AutoCast-converted ONNX (ModelOpt >= 0.33)."""
    import tensorrt

    if precision in trt_export.HALF and trt_export.trt_major(tensorrt) >= 11:
        try:
            trt_export.import_autocast(precision)
        except UserError as e:
            pytest.skip(f"TensorRT {tensorrt.__version__} has no weak typing and ModelOpt is unusable: {e}")


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_engine_build_and_run(toy_onnx, tmp_path, precision):
    from vismlp_deploy.runtime.trt_runner import TrtRunner

    _skip_without_autocast(precision)
    train, dyn, _ = toy_onnx
    cache = tmp_path / "timing.cache"
    engine = trt_export.build_engine(dyn, tmp_path / f"{precision}.engine", precision=precision,
                                     dynamic_batch=(1, 4, 8), workspace_gib=1, timing_cache=cache)
    assert engine.is_file() and cache.is_file()
    meta = json.loads(trt_export.metadata_path(engine).read_text())
    assert meta["precision"] == precision and meta["profile"]["max"] == [8, 3, 16, 16]
    assert bool(meta["kept_fp32"] and meta["kept_fp32"]["nodes"]) == (precision in trt_export.HALF)  # the LayerNorm
    runner = TrtRunner(engine)
    assert (runner.input_name, runner.output_name, runner.precision) == ("input", "logits", precision)
    for b in (1, 7, 11):  # 11 > MAX: chunked
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            ref = train(x)
        assert rel_err(runner.run(x), ref) <= PRECISIONS[precision].tolerance


@needs_trt
def test_engine_int8_from_qdq(toy_onnx, qdq_onnx, tmp_path):
    from vismlp_deploy.runtime.trt_runner import TrtRunner

    train, _, _ = toy_onnx
    engine = trt_export.build_engine(qdq_onnx, tmp_path / "int8.engine", precision="int8", dynamic_batch=(1, 4, 8))
    meta = json.loads(trt_export.metadata_path(engine).read_text())
    assert meta["precision"] == "int8" and meta["strongly_typed"] and meta["builder_flags"] == []
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        assert rel_err(TrtRunner(engine).run(x), train(x)) <= PRECISIONS["int8"].tolerance


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
    assert list((tmp_path / "xdg-cache" / "vismlp_deploy").glob("*.timing"))  # the default cache, kept private
