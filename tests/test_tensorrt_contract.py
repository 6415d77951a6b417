"""Contract tests of the TensorRT path: which TensorRT / ModelOpt calls each version branch makes.

This is a contract test, not a claim that TensorRT ran: ``tensorrt`` and ``modelopt`` are the
recording fakes of fake_tensorrt.py (put into ``sys.modules`` for one test only), whose classes
take exactly the real bindings' parameters (TensorRT 10.x / 11.x, ModelOpt 0.33). The tests
check the calls (network typing flags, builder flags, layer constraints, what AutoCast gets,
the timing-cache fallback, every engine output bound), what is written (engine, its JSON, the
converted ONNX) and what is refused; the engine itself is a fake plan.
"""
from __future__ import annotations

import json

import fake_tensorrt as fake
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from test_export_onnx import toy_pair
from test_tensorrt import conv_gn_onnx, quantize_qdq

from vismlp_deploy.errors import UserError
from vismlp_deploy.export import tensorrt as trt_export
from vismlp_deploy.export.fp16_audit import audit_fp16
from vismlp_deploy.export.onnx import export_onnx
from vismlp_deploy.runtime.trt_runner import bind_io

STRONG_10 = 1 << 1  # 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) on TensorRT 10


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    _, deploy = toy_pair()
    toy = export_onnx(deploy, d / "toy.onnx")
    return {"toy": toy, "convgn": conv_gn_onnx(d / "convgn.onnx", first_conv_peak=1e5),
            "qdq": quantize_qdq(toy, d / "toy.int8.onnx")}


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A CUDA device as far as build_engine asks, and default timing caches under tmp_path."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _build(onnx_path, tmp_path, precision, **kw):
    log: list[str] = []
    engine = trt_export.build_engine(onnx_path, tmp_path / f"{precision}.engine", precision=precision,
                                     dynamic_batch=(1, 4, 8), timing_cache=tmp_path / "t.cache", log=log.append, **kw)
    return engine, json.loads(trt_export.metadata_path(engine).read_text()), log


def _calls(trt, name: str) -> list[tuple]:
    return [c[1:] for c in trt.state.calls if c[0] == name]


def _flags_set(trt) -> list[str]:
    return [c[0] for c in _calls(trt, "set_flag")]


def test_trt_contract_tensorrt_8_is_refused(onnx_files, tmp_path, monkeypatch, gpu):
    trt = fake.make_tensorrt("8.6.1")
    fake.install(monkeypatch, trt)
    with pytest.raises(UserError, match="TensorRT 8.6.1 is too old.*TensorRT 10/11 API.*pip install tensorrt"):
        trt_export.build_engine(onnx_files["toy"], tmp_path / "x.engine", precision="fp32")
    assert trt.state.calls == [] and not list(tmp_path.glob("x.engine*"))


@pytest.mark.parametrize("version", ["10.0.1", "10.16.0", "11.1.0"])
@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_trt_contract_fp32_tf32_strongly_typed(onnx_files, tmp_path, monkeypatch, gpu, version, precision):
    trt = fake.make_tensorrt(version)
    fake.install(monkeypatch, trt)
    engine, meta, _ = _build(onnx_files["toy"], tmp_path, precision)
    assert _calls(trt, "create_network") == [(STRONG_10 if version.startswith("10") else 0,)]
    assert _calls(trt, "parse_from_file") == [(str(onnx_files["toy"]),)]
    assert _flags_set(trt) == (["TF32"] if precision == "tf32" else [])
    assert _calls(trt, "clear_flag") == ([] if precision == "tf32" else [("TF32",)])  # on by default in TensorRT
    assert _calls(trt, "set_shape") == [("input", (1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))]
    assert _calls(trt, "set_memory_pool_limit") == [(trt.MemoryPoolType.WORKSPACE, 4 << 30)]
    assert engine.read_bytes() == b"fake-plan" and meta["strongly_typed"] and meta["kept_fp32"] is None
    assert meta["builder_flags"] == (["TF32"] if precision == "tf32" else []) and meta["tensorrt"] == version


@pytest.mark.parametrize("version", ["10.9.0", "11.1.0"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trt_contract_half_is_autocast_then_strongly_typed(onnx_files, tmp_path, monkeypatch, gpu, version, precision):
    """TensorRT 10 with ModelOpt and TensorRT 11: AutoCast's ONNX, no precision flag, no layer constraint."""
    trt, modelopt = fake.make_tensorrt(version), fake.make_modelopt("0.33.0", own_fp32=("node_conv2d_2",))
    fake.install(monkeypatch, trt, modelopt)
    src = onnx_files["convgn"]
    _, meta, log = _build(src, tmp_path, precision)
    audit = audit_fp16(onnx.load(str(src)), precision)
    (call,) = modelopt["modelopt.onnx.autocast"].calls
    assert call == {"onnx_path": str(src), "low_precision_type": precision, "keep_io_types": True,
                    "nodes_to_exclude": [f"^{n}$" for n in audit.keep_fp32_nodes],  # exact names (no regex chars here)
                    "op_types_to_exclude": audit.keep_fp32_op_types}
    converted = tmp_path / f"{precision}.{precision}.onnx"
    assert _calls(trt, "parse_from_file") == [(str(converted),)] and meta["built_from"] == str(converted)
    assert _calls(trt, "create_network") == [(STRONG_10 if version.startswith("10") else 0,)]
    assert _flags_set(trt) == [] and _calls(trt, "layer.precision") == [] and meta["builder_flags"] == []
    if version.startswith("11"):
        assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "BF16")
    # the metadata says what AutoCast really kept: the audited nodes plus its own choice, not the audit's list
    kept = meta["kept_fp32"]
    assert kept["by"] == "ModelOpt AutoCast" and "node_conv2d_2" in kept["nodes"]
    assert set(audit.keep_fp32_nodes) <= set(kept["nodes"]) and "node_conv2d_1" not in kept["nodes"]
    assert "logits_cast_to_fp32" not in kept["nodes"] and meta["fp16_audit"]["keep_fp32_nodes"] == audit.keep_fp32_nodes
    assert converted.is_file() and not list(tmp_path.glob("*.data")) and any("fp16 audit" in m for m in log)


def test_trt_contract_10_half_without_modelopt_is_weakly_typed(onnx_files, tmp_path, monkeypatch, gpu):
    """The flags path, only where strong typing cannot do it: FP16 + FP32 constraints on the audited layers."""
    trt = fake.make_tensorrt("10.9.0", layers_per_op={"Conv": 3})
    fake.install(monkeypatch, trt, None)
    _, meta, log = _build(onnx_files["convgn"], tmp_path, "fp16")
    assert any("ModelOpt is not installed" in m and "weakly typed" in m for m in log)
    assert _calls(trt, "create_network") == [(0,)] and _calls(trt, "parse_from_file") == [(str(onnx_files["convgn"]),)]
    assert _flags_set(trt) == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and not meta["strongly_typed"]
    pinned = {name for name, _ in _calls(trt, "layer.precision")}
    # node_conv2d (weight beyond FP16) became three layers: node_conv2d, node_conv2d_0 and node_conv2d_1 -- the
    # last one carries the name of the next conv node, whose own layers are node_conv2d_1_2, ...: only metadata tells
    assert {"node_conv2d", "node_conv2d_0", "node_conv2d_1"} <= pinned
    assert not {"node_conv2d_1_2", "node_conv2d_2", "node_conv2d_2_3"} & pinned
    assert meta["kept_fp32"]["by"] == "TensorRT layer constraints"
    assert "node_conv2d" in meta["kept_fp32"]["nodes"] and "node_conv2d_1" not in meta["kept_fp32"]["nodes"]
    shape_helpers = [layer.name for layer in trt.state.networks[0].layers if layer.name.startswith("ONNXTRT_")]
    assert shape_helpers and not set(shape_helpers) & pinned  # float layers, but made for no node
    assert all(dtype == trt.float32 for _, dtype in _calls(trt, "layer.precision"))
    assert {(name, 0, trt.float32) for name in pinned} == set(_calls(trt, "layer.set_output_type"))


def test_trt_contract_layer_names_without_metadata(onnx_files, tmp_path, monkeypatch, gpu):
    """A parser without layer metadata: exact node name first, then <node>_<k>."""
    trt = fake.make_tensorrt("10.9.0", layers_per_op={"Conv": 2}, metadata=False)
    fake.install(monkeypatch, trt, None)
    _build(onnx_files["convgn"], tmp_path, "fp16")
    pinned = {name for name, _ in _calls(trt, "layer.precision")}
    assert {"node_conv2d", "node_conv2d_0"} <= pinned  # node_conv2d's two layers
    assert not {"node_conv2d_1", "node_conv2d_1_1", "node_conv2d_2", "node_conv2d_2_2"} & pinned


def test_trt_contract_unnamed_nodes_reach_autocast_and_layers(tmp_path, monkeypatch, gpu):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 2, 2])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, 2, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3, 1, 1], [1e5] + [0.5] * 8)  # beyond FP16
    nodes = [helper.make_node("Conv", ["input", "w"], ["h"]), helper.make_node("Relu", ["h"], ["logits"])]
    src = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                                opset_imports=[helper.make_opsetid("", 18)]), str(src))
    trt, modelopt = fake.make_tensorrt("11.1.0"), fake.make_modelopt("0.35.1")
    fake.install(monkeypatch, trt, modelopt)
    _, meta, _ = _build(src, tmp_path, "fp16")
    (call,) = modelopt["modelopt.onnx.autocast"].calls
    assert call["nodes_to_exclude"] == ["^node_of_h$"] and call["onnx_path"] != str(src)  # a named copy
    assert meta["kept_fp32"]["nodes"] == ["node_of_h"]
    assert not list(tmp_path.glob(".unnamed*"))  # the named copy was temporary

    trt = fake.make_tensorrt("10.9.0")
    fake.install(monkeypatch, trt, None)
    _build(src, tmp_path, "fp16")
    assert [name for name, _ in _calls(trt, "layer.precision")] == ["node_of_h"]  # the parser's own name for it


@pytest.mark.parametrize("version,message", [("0.31.0", "ModelOpt 0.31.0 is too old.*>= 0.33"),
                                             (None, "ModelOpt is not installed")])
def test_trt_contract_11_half_needs_modelopt_0_33(onnx_files, tmp_path, monkeypatch, gpu, version, message):
    fake.install(monkeypatch, fake.make_tensorrt("11.1.0"), version and fake.make_modelopt(version))
    with pytest.raises(UserError, match=message) as e:
        _build(onnx_files["toy"], tmp_path, "fp16")
    assert 'nvidia-modelopt[onnx]>=0.33' in str(e.value) and "onnxruntime" in str(e.value)
    assert not list(tmp_path.glob("fp16.*"))


def test_trt_contract_11_has_no_weak_typing(onnx_files, tmp_path, monkeypatch, gpu):
    fake.install(monkeypatch, fake.make_tensorrt("11.1.0"), fake.make_modelopt())
    with pytest.raises(UserError, match="always strongly typed"):
        _build(onnx_files["toy"], tmp_path, "fp16", strongly_typed=False)


@pytest.mark.parametrize("version,strongly_typed,network,flags", [
    ("11.1.0", None, 0, []), ("10.9.0", None, STRONG_10, []), ("10.9.0", True, STRONG_10, []),
    ("10.9.0", False, 0, ["INT8"])])
def test_trt_contract_int8(onnx_files, tmp_path, monkeypatch, gpu, version, strongly_typed, network, flags):
    """A Q/DQ ONNX: strongly typed with no precision flag; weakly typed (10 only) needs BuilderFlag.INT8."""
    trt = fake.make_tensorrt(version)
    fake.install(monkeypatch, trt, None)
    _, meta, _ = _build(onnx_files["qdq"], tmp_path, "int8", strongly_typed=strongly_typed)
    assert _calls(trt, "create_network") == [(network,)] and _flags_set(trt) == flags
    assert _calls(trt, "clear_flag") == [("TF32",)] and _calls(trt, "parse_from_file") == [(str(onnx_files["qdq"]),)]
    assert meta["precision"] == "int8" and meta["builder_flags"] == flags and meta["strongly_typed"] == (not flags)


def test_trt_contract_timing_cache_from_another_gpu(onnx_files, tmp_path, monkeypatch, gpu):
    """set_timing_cache returns False for it: build with a fresh cache, say so, replace the file."""
    cache = tmp_path / "t.cache"
    cache.write_bytes(fake.FOREIGN_CACHE)
    trt = fake.make_tensorrt("10.9.0")
    fake.install(monkeypatch, trt)
    _, meta, log = _build(onnx_files["toy"], tmp_path, "fp32")
    assert _calls(trt, "set_timing_cache") == [(fake.FOREIGN_CACHE, False, False), (b"", False, True)]
    assert any("does not match this GPU" in m and "fresh cache" in m for m in log)
    assert cache.read_bytes() == b"timing-cache-of-this-gpu" and meta["timing_cache"] == str(cache)
    assert trt.state.names().index("set_timing_cache") < trt.state.names().index("build_serialized_network")


def test_trt_contract_engine_keeps_its_metadata_without_a_timing_cache(onnx_files, tmp_path, monkeypatch, gpu):
    trt = fake.make_tensorrt("11.1.0")
    fake.install(monkeypatch, trt)
    monkeypatch.setattr(fake.IBuilderConfig, "get_timing_cache", lambda self: None)
    engine, meta, log = _build(onnx_files["toy"], tmp_path, "fp32")
    assert engine.is_file() and meta["timing_cache"] is None and any("no timing cache" in m for m in log)
    assert not (tmp_path / "t.cache").exists()


def test_trt_contract_default_timing_cache_is_private(onnx_files, tmp_path, monkeypatch, gpu):
    fake.install(monkeypatch, fake.make_tensorrt("10.9.0"))
    engine = trt_export.build_engine(onnx_files["toy"], tmp_path / "e.engine", precision="fp32", log=lambda m: None)
    (cache,) = (tmp_path / "xdg-cache" / "vismlp_deploy").iterdir()
    assert cache.name == "tensorrt-10.9.0-NVIDIA-H100-80GB-HBM3.timing"
    assert json.loads(trt_export.metadata_path(engine).read_text())["timing_cache"] == str(cache)


def test_trt_contract_failed_build_writes_nothing(onnx_files, tmp_path, monkeypatch, gpu):
    fake.install(monkeypatch, fake.make_tensorrt("10.9.0", plan=None))
    with pytest.raises(UserError, match="failed to build"):
        _build(onnx_files["toy"], tmp_path, "fp32")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_trt_contract_large_converted_onnx_uses_external_data(onnx_files, tmp_path, monkeypatch, gpu):
    """Past protobuf's 2 GB (here: a limit of 1 kB) AutoCast's output goes to <name>.data beside it."""
    monkeypatch.setattr(trt_export, "PROTOBUF_LIMIT", 1024)
    fake.install(monkeypatch, fake.make_tensorrt("11.1.0"), fake.make_modelopt())
    _, meta, _ = _build(onnx_files["toy"], tmp_path, "fp16")
    converted = tmp_path / "fp16.fp16.onnx"
    assert (tmp_path / "fp16.fp16.onnx.data").is_file() and meta["built_from"] == str(converted)
    external = [t.name for t in onnx.load(str(converted), load_external_data=False).graph.initializer
                if t.data_location == TensorProto.EXTERNAL]  # onnx keeps tensors under 1 kB inline
    assert external and all(t.raw_data for t in onnx.load(str(converted)).graph.initializer if t.name in external)


def test_trt_contract_runner_binds_every_output(monkeypatch):
    """execute_async_v3 fails while an output has no address: every output gets one, in its shape."""
    trt = fake.make_tensorrt("11.1.0", engine_io=[("input", "INPUT", fake.DataType.FLOAT, (-1, 3, 16, 16)),
                                                  ("logits", "OUTPUT", fake.DataType.FLOAT, (-1, 10)),
                                                  ("features", "OUTPUT", fake.DataType.HALF, (-1, 64))])
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"fake-plan")
    context = engine.create_execution_context()
    batch = torch.zeros(5, 3, 16, 16)
    buffers = bind_io(context, "input", batch, {"logits": torch.float32, "features": torch.float16})
    assert list(buffers) == ["logits", "features"]
    assert buffers["logits"].shape == (5, 10) and buffers["features"].dtype == torch.float16
    assert context.addresses == {"input": batch.data_ptr(), "logits": buffers["logits"].data_ptr(),
                                 "features": buffers["features"].data_ptr()}
    assert context.execute_async_v3(0)
    only_first = engine.create_execution_context()  # what the runner did before: the fake engine refuses it
    bind_io(only_first, "input", batch, {"logits": torch.float32})
    assert not only_first.execute_async_v3(0)


@pytest.mark.parametrize("name,metadata,node", [
    ("node_conv2d_1", "[ONNX Layer: node_conv2d]", "node_conv2d"),  # the metadata wins over a node-like name
    ("w_const", "[ONNX Layer: node_mul | Local Function: gelu]", "node_mul"),
    ("odd", "[ONNX Layer: a]b | c]", "a]b"),
    ("node_conv2d_1", "", "node_conv2d_1"), ("node_conv2d_7", "", "node_conv2d"), ("ONNXTRT_Broadcast_3", "", None),
    ("(Unnamed Layer* 4) [Shuffle]", "", None)])
def test_trt_contract_layer_onnx_node(name, metadata, node):
    layer = fake.ILayer(name, metadata, [])
    assert trt_export.layer_onnx_node(layer, {"node_conv2d", "node_conv2d_1", "node_mul"}) == node
