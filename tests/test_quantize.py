"""INT8: calibration inputs, the Q/DQ graph ONNX Runtime's quantizer writes, the accuracy guard,
train-vs-deploy weight SQNR, Stats.sqnr_db, and the INT8 GEMM peak."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from vismlp_deploy import create_model, reparameterize
from vismlp_deploy.calibration import load_calibration, load_calibration_split
from vismlp_deploy.errors import UserError
from vismlp_deploy.export.onnx import export_onnx, read_metadata
from vismlp_deploy.export.quantize import (
    _factor_batched_weight_scales,
    _left_weights_to_right,
    agreement_lower_bound,
    quantize_onnx,
)
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.runtime.ort_runner import OrtRunner
from vismlp_deploy.verification.images import preprocess
from vismlp_deploy.verification.stats import SQNR_CAP_DB, compare
from vismlp_deploy.verification.weight_sqnr import int8_weight_sqnr_db, weight_sqnr_report

RESMLP_SMALL = dict(img_size=32, patch_size=8, num_blocks=2, embed_dim=16, num_classes=10)
# S > 1 weight sets (batched fc3 weights), conv taps injected into fc3
REPMLPNET_SMALL = dict(channels=[8, 16], hs=[4, 4], ws=[4, 4], sharesets_nums=[2, 4], num_blocks=[1, 2],
                       num_class=10, patch_size=[2, 2], in_channels=1)


def _train(name: str, seed: int = 0, **over) -> torch.nn.Module:
    return randomize_(create_model(name, **over), seed).eval()


def _deploy_onnx(model: torch.nn.Module, path: Path) -> Path:
    deploy = reparameterize(model).eval()
    deploy.arch, deploy.config, deploy.input_size = model.arch, model.config, model.input_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(deploy, path)
    return path


def _inputs(model: torch.nn.Module, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *model.input_size), dtype=np.float32)


@pytest.fixture(scope="module")
def resmlp_int8(tmp_path_factory):
    """A small ResMLP's fp32 deploy ONNX, its int8 version (guard off) and the inputs."""
    tmp = tmp_path_factory.mktemp("resmlp")
    model = _train("resmlp_12", **RESMLP_SMALL)
    fp32 = _deploy_onnx(model, tmp / "fp32.onnx")
    x = _inputs(model, 96)
    result = quantize_onnx(fp32, tmp / "int8.onnx", x[:32], x[32:], min_agreement=0.0)
    return fp32, result, x


# ------------------------------------------------------------------------------ calibration
def _write_images(folder: Path, n: int, seed: int, size=(40, 36)) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def _preprocessed(paths: list[Path], size) -> np.ndarray:
    from PIL import Image

    return preprocess([Image.open(p) for p in paths], size).numpy()


def _row_sources(x: np.ndarray, ref: np.ndarray) -> list[int]:
    """Index of the row of ``ref`` each row of ``x`` equals (bit for bit)."""
    return [int(np.flatnonzero((ref == row).all(axis=(1, 2, 3)))[0]) for row in x]


def test_calibration_flat_folder_is_verify_preprocessing_seeded(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "flat", 10, 0)
    ref = _preprocessed(paths, (3, 16, 16))
    x = load_calibration(tmp_path / "flat", (3, 16, 16), count=6, seed=1)
    assert x.shape == (6, 3, 16, 16) and x.dtype == np.float32
    rows = _row_sources(x, ref)  # every sample is exactly verify's preprocessing of one file
    assert len(set(rows)) == 6
    assert np.array_equal(x, load_calibration(tmp_path / "flat", (3, 16, 16), count=6, seed=1))
    assert _row_sources(load_calibration(tmp_path / "flat", (3, 16, 16), count=6, seed=2), ref) != rows


def test_calibration_class_folders_mix_classes(tmp_path: Path) -> None:
    paths = [p for c in range(3) for p in _write_images(tmp_path / "data" / f"class{c}", 8, c)]
    ref = _preprocessed(paths, (1, 16, 16))
    x = load_calibration(tmp_path / "data", (1, 16, 16), count=9, seed=0)
    classes = {r // 8 for r in _row_sources(x, ref)}
    assert x.shape == (9, 1, 16, 16) and len(classes) >= 2  # a seeded shuffle, not the first folder


def test_calibration_split_is_disjoint_and_warns_when_short(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    split = load_calibration_split(tmp_path / "x.npy", (3, 8, 8), count=5, holdout=10)
    assert split.calibration.shape[0] == 5 and split.holdout.shape[0] == 10
    used = _row_sources(split.calibration, arr) + _row_sources(split.holdout, arr)
    assert len(set(used)) == 15
    with pytest.warns(UserWarning, match="fewer than asked"):
        short = load_calibration_split(tmp_path / "x.npy", (3, 8, 8), count=20, holdout=20)
    assert len(short.calibration) == 10 and len(short.holdout) == 10
    with pytest.warns(UserWarning, match="fewer than asked"):
        assert len(load_calibration(tmp_path / "x.npy", (3, 8, 8), count=50)) == 20
    np.save(tmp_path / "three.npy", arr[:3])
    for holdout, sizes in ((10, (1, 2)), (0, (3, 0))):
        with pytest.warns(UserWarning, match="fewer than asked"):
            tiny = load_calibration_split(tmp_path / "three.npy", (3, 8, 8), count=5, holdout=holdout)
        assert (len(tiny.calibration), len(tiny.holdout)) == sizes


def test_calibration_npz_and_float64(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).standard_normal((4, 1, 8, 8))
    np.savez(tmp_path / "one.npz", arr)
    np.savez(tmp_path / "named.npz", input=arr, labels=np.arange(4))
    for f in ("one.npz", "named.npz"):
        x = load_calibration(tmp_path / f, (1, 8, 8), count=None)
        assert x.dtype == np.float32 and sorted(_row_sources(x, arr.astype(np.float32))) == [0, 1, 2, 3]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such calibration"),
    ("empty_dir", "no image files"),
    ("bad_image", "not a readable image"),
    ("wrong_shape", r"expected \(N, 3, 8, 8\)"),
    ("three_d", r"expected \(N, 3, 8, 8\)"),
    ("ints", "dtype"),
    ("nan", "NaN"),
    ("zero_rows", "no samples"),
    ("two_arrays", "name the inputs 'input'"),
    ("not_numpy", "not-an-array"),
    ("txt", "must be a directory of images"),
])
def test_calibration_bad_inputs_are_one_line_user_errors(tmp_path: Path, case: str, message: str) -> None:
    path = {
        "missing": tmp_path / "nope",
        "empty_dir": tmp_path / "empty",
        "bad_image": tmp_path / "bad",
        "wrong_shape": tmp_path / "a.npy", "three_d": tmp_path / "a.npy", "ints": tmp_path / "a.npy",
        "nan": tmp_path / "a.npy", "zero_rows": tmp_path / "a.npy", "two_arrays": tmp_path / "b.npz",
        "not_numpy": tmp_path / "not-an-array.npy", "txt": tmp_path / "x.txt",
    }[case]
    if case == "empty_dir":
        path.mkdir()
        (path / "notes.txt").write_text("no images here")
    elif case == "bad_image":
        path.mkdir()
        (path / "broken.png").write_bytes(b"not a png")
    elif case in ("wrong_shape", "three_d", "ints", "nan", "zero_rows"):
        arr = {"wrong_shape": np.zeros((2, 3, 8, 9), np.float32), "three_d": np.zeros((3, 8, 8), np.float32),
               "ints": np.zeros((2, 3, 8, 8), np.int64), "nan": np.full((2, 3, 8, 8), np.nan, np.float32),
               "zero_rows": np.zeros((0, 3, 8, 8), np.float32)}[case]
        np.save(path, arr)
    elif case == "two_arrays":
        np.savez(path, a=np.zeros((2, 3, 8, 8)), b=np.zeros((2, 3, 8, 8)))
    elif case in ("not_numpy", "txt"):
        path.write_text("hello")
    with pytest.raises(UserError, match=message) as err:
        load_calibration(path, (3, 8, 8))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ the Q/DQ graph
def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_int8_graph_is_symmetric_qdq_with_per_channel_weights(resmlp_int8) -> None:
    fp32, result, _ = resmlp_int8
    proto = onnx.load(str(result.path))
    inits = _initializers(proto)
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and result.quantized_nodes
    for n in qdq:  # zero point 0 everywhere (TensorRT's explicit quantization)
        zp = inits[n.input[2]]
        assert not zp.any() and zp.dtype in (np.int8, np.int32), n.name
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].dtype == np.int8]
    assert weights
    for n in weights:  # one scale per output channel
        w, scale = inits[n.input[0]], inits[n.input[1]]
        axis = next(a.i for a in n.attribute if a.name == "axis") if scale.ndim else None
        assert scale.ndim == 1 and scale.shape[0] == w.shape[axis] > 1 and (scale > 0).all(), n.name
        assert np.abs(w).max() <= 127
    for io in (*proto.graph.input, *proto.graph.output):  # float in, float out
        assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    meta, meta32 = read_metadata(result.path), read_metadata(fp32)
    assert meta["precision"] == "int8" and meta["quantization"]["float_nodes"] == [f.name for f in result.float_nodes]
    assert {k: meta[k] for k in meta32} == meta32  # the fp32 metadata is kept
    assert OrtRunner(result.path).precision == "int8" and OrtRunner(fp32).precision == "fp32"


def test_int8_float_ops_read_float_tensors(resmlp_int8) -> None:
    """Residual adds and GELUs read float tensors: only GEMM-like nodes consume DequantizeLinear."""
    _, result, _ = resmlp_int8
    proto = onnx.load(str(result.path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv_out = {n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"
                and getattr(producer.get(n.input[0]), "op_type", None) == "Conv"}
    for n in proto.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear"):
            continue
        for i in n.input:
            dq = producer.get(i)
            if dq is not None and dq.op_type == "DequantizeLinear":
                assert dq.input[0] in conv_out, f"{n.op_type} {n.name} reads an int8 copy of its input"


def test_int8_measured_stats_are_the_written_files(resmlp_int8) -> None:
    fp32, result, x = resmlp_int8
    held = torch.from_numpy(x[32:])
    stats = compare(OrtRunner(result.path).run(held), OrtRunner(fp32).run(held))
    assert result.measured and result.holdout == len(held) and result.passed is True  # min_agreement 0
    assert stats.top1 == result.stats.top1 and math.isclose(stats.sqnr_db, result.stats.sqnr_db, rel_tol=1e-6)
    assert 20 < stats.sqnr_db < 60  # really int8: neither fp32-exact nor broken


def test_token_mixing_matmuls_run_int8_with_the_weight_on_the_right(resmlp_int8) -> None:
    """ResMLP's ``W @ x`` token mixing: rewritten as ``(x^T @ W^T)^T``, so the int8 weight is the
    right operand (the only side ONNX Runtime's int8 MatMul takes); nothing is left in float."""
    _, result, _ = resmlp_int8
    proto = onnx.load(str(result.path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    token = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(token) == 2 and not result.float_nodes
    for n in token:
        assert n.name in result.quantized_nodes
        assert [getattr(producer.get(i), "op_type", None) for i in n.input] == ["DequantizeLinear"] * 2
        assert producer[producer[n.input[0]].input[0]].op_type == "QuantizeLinear"  # activation on the left


def _left_matmul_model(weight: np.ndarray, x_shape: tuple) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["mm"], name="mm"), helper.make_node("Sigmoid", ["mm"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                               ir_version=8))


@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 7), k=st.integers(1, 7), n=st.integers(1, 7), lead=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 2**16))
def test_left_weights_to_right_is_exact(m, k, n, lead, seed) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, k)).astype(np.float32)
    x = rng.standard_normal((*lead, k, n)).astype(np.float32)
    proto = _left_matmul_model(w, x.shape)
    _left_weights_to_right(proto)
    (mm,) = [nd for nd in proto.graph.node if nd.op_type == "MatMul"]
    initializers = {t.name for t in proto.graph.initializer}
    assert mm.input[1] in initializers and "w" not in initializers
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = 1 / (1 + np.exp(-np.matmul(w.astype(np.float64), x.astype(np.float64))))
    assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-6


def _batched_matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    s, k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"), helper.make_node("Relu", ["mm"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [s, "b", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [s, "b", n])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@settings(max_examples=15, deadline=None)
@given(s=st.integers(1, 4), k=st.integers(1, 9), n=st.integers(1, 9), seed=st.integers(0, 2**16),
       spread=st.floats(0, 6), zero_col=st.booleans())
def test_factored_batched_weight_scales_are_exact_and_per_column(s, k, n, seed, spread, zero_col) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((s, k, n)) * 10.0 ** rng.uniform(-spread, spread, (s, 1, n))).astype(np.float32)
    if zero_col:
        w[0, :, 0] = 0
    proto = _batched_matmul_model(w)
    overrides = _factor_batched_weight_scales(proto)
    inits = _initializers(proto)
    rescaled, r = inits["w"], inits["w_column_scale"]
    assert overrides == {"w": [{"symmetric": True}]} and r.shape == (s, 1, n)
    # every column of the rescaled weight spans [-1, 1] exactly (or is all zero)
    col_max = np.abs(rescaled).max(axis=1)
    assert np.all((col_max == 1) | (np.abs(w).max(axis=1) == 0))
    import onnxruntime as ort

    x = rng.standard_normal((s, 3, k)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = np.maximum(np.einsum("sbk,skn->sbn", x.astype(np.float64), w.astype(np.float64)), 0)
    assert np.abs(y - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1e-30)


def test_repmlpnet_batched_fc3_runs_int8_with_per_set_column_scales(tmp_path: Path) -> None:
    model = _train("repmlpnet_t224", **REPMLPNET_SMALL)
    fp32 = _deploy_onnx(model, tmp_path / "fp32.onnx")
    x = _inputs(model, 64)
    result = quantize_onnx(fp32, tmp_path / "int8.onnx", x[:32], x[32:], min_agreement=0.0)
    proto = onnx.load(str(result.path))
    inits = _initializers(proto)
    producer = {o: n for n in proto.graph.node for o in n.output}
    fc3 = [n for n in proto.graph.node if n.op_type == "MatMul"
           and getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"
           and inits[producer[n.input[1]].input[0]].ndim == 3]
    assert len(fc3) == 3  # stage 0 (S=2) and stage 1 (S=4, 2 blocks), each int8 with its column scales
    for n in fc3:
        scales = [inits[i] for c in proto.graph.node if c.op_type == "Mul" and n.output[0] in c.input
                  for i in c.input if i in inits]
        assert len(scales) == 1 and scales[0].shape[0] in (2, 4) and scales[0].shape[1] == 1
    assert result.stats.sqnr_db > 20
    assert all(n in result.quantized_nodes for n in (f.name for f in fc3))


# ------------------------------------------------------------------------------ the accuracy guard
def test_guard_keeps_nodes_float_until_the_target_is_met(tmp_path: Path) -> None:
    model = _train("repmlpnet_t224", **REPMLPNET_SMALL)
    fp32 = _deploy_onnx(model, tmp_path / "fp32.onnx")
    x = _inputs(model, 160)  # 128 held out: a 0.97 target with 95 % confidence needs all 128 to agree
    result = quantize_onnx(fp32, tmp_path / "int8.onnx", x[:32], x[32:], min_agreement=0.97, max_rounds=12)
    first = result.rounds[0].stats
    assert first.top1 < 1.0, "the test needs a model that misses the target when fully quantized"
    assert result.passed and result.stats.top1 == 1.0 and len(result.rounds) > 1
    assert result.agreement_lower_bound >= 0.97 > agreement_lower_bound(first)
    fallback = result.fallback_nodes
    assert fallback and all("accuracy guard" in f.reason and "dB output SQNR" in f.reason for f in fallback)
    assert not set(f.name for f in fallback) & set(result.quantized_nodes)
    # what it reports is what it wrote: re-measured here
    held = torch.from_numpy(x[32:])
    assert compare(OrtRunner(result.path).run(held), OrtRunner(fp32).run(held)).top1 == 1.0
    meta = read_metadata(result.path)["quantization"]
    assert meta["passed"] is True and set(meta["float_nodes"]) >= {f.name for f in fallback}


def test_guard_reports_a_miss_when_rounds_run_out(tmp_path: Path) -> None:
    model = _train("repmlpnet_t224", **REPMLPNET_SMALL)
    fp32 = _deploy_onnx(model, tmp_path / "fp32.onnx")
    x = _inputs(model, 160)
    result = quantize_onnx(fp32, tmp_path / "int8.onnx", x[:32], x[32:], min_agreement=0.97, max_rounds=1)
    assert len(result.rounds) == 1 and result.passed is False and not result.fallback_nodes
    assert read_metadata(result.path)["quantization"]["passed"] is False


FIXTURES = Path(__file__).parent / "fixtures" / "fashion_mnist"


def _trained_int8(name: str, tmp_path: Path, min_agreement: float):
    """A trained fixture's deploy ONNX quantized with the guard: calibrated on 256 training images,
    guarded on 1000 test images; returns (result, int8 logits, fp32 train logits) on the other 9000."""
    from vismlp_deploy import load_checkpoint
    from vismlp_deploy.datasets import fashion_mnist_dir, load_fashion_mnist

    try:
        fashion_mnist_dir()
    except UserError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    train = load_checkpoint(FIXTURES / f"{name}.pth", input_size=(32, 32))
    fp32 = _deploy_onnx(train, tmp_path / "fp32.onnx")
    c = train.input_size[0]
    x_test, _ = load_fashion_mnist("test", channels=c)
    x_train, _ = load_fashion_mnist("train", channels=c, limit=256)
    result = quantize_onnx(fp32, tmp_path / "int8.onnx", x_train.numpy(), x_test[:1000].numpy(),
                           min_agreement=min_agreement)
    unseen = x_test[1000:]
    with torch.inference_mode():
        ref = torch.cat([train(unseen[i:i + 500]) for i in range(0, len(unseen), 500)])
    runner = OrtRunner(result.path)
    return result, torch.cat([runner.run(unseen[i:i + 500]) for i in range(0, len(unseen), 500)]), ref


def test_guard_passes_without_fallback_where_the_target_is_met(tmp_path: Path) -> None:
    """Trained AS-MLP: fully quantized it already agrees with fp32 on the held-out images."""
    result, int8, ref = _trained_int8("asmlp_c1", tmp_path, min_agreement=0.98)
    assert result.passed and len(result.rounds) == 1 and not result.fallback_nodes and not result.float_nodes
    assert result.agreement_lower_bound >= 0.98
    assert compare(int8, ref).top1 >= 0.98  # and on the 9000 test images it never saw


def test_guard_fallback_on_a_trained_network(tmp_path: Path) -> None:
    """Trained ConvMixer: fully quantized it misses 99 % on the held-out images; the guard keeps the
    most damaging convs in float until it agrees with 95 % confidence, which holds on unseen images."""
    result, int8, ref = _trained_int8("convmixer_c3", tmp_path, min_agreement=0.99)
    assert agreement_lower_bound(result.rounds[0].stats) < 0.99 and result.passed
    assert result.fallback_nodes and result.quantized_nodes  # some convs float, the rest still int8
    assert all(f.op_type == "Conv" and "accuracy guard" in f.reason for f in result.fallback_nodes)
    assert compare(int8, ref).top1 >= 0.985


def test_guard_never_passes_unmeasured(tmp_path: Path, resmlp_int8) -> None:
    fp32, _, x = resmlp_int8
    with pytest.raises(UserError, match="held-out inputs"):
        quantize_onnx(fp32, tmp_path / "a.onnx", x[:16], None, min_agreement=0.99)
    assert not (tmp_path / "a.onnx").exists()
    result = quantize_onnx(fp32, tmp_path / "b.onnx", x[:16], None, min_agreement=0.0)
    assert result.passed is None and not result.measured and result.to_dict()["passed"] is None
    assert read_metadata(tmp_path / "b.onnx")["quantization"]["measured"] is False


@pytest.mark.parametrize("kwargs, message", [(dict(method="kl"), "calibration method"),
                                             (dict(min_agreement=1.5), r"min_agreement must be in \[0, 1\]"),
                                             (dict(calibration_shape=(8, 3, 16, 16)), "do not fit the model input"),
                                             (dict(calibration_shape=(0, 3, 32, 32)), "no calibration inputs")])
def test_quantize_bad_arguments(tmp_path: Path, resmlp_int8, kwargs, message) -> None:
    fp32, _, x = resmlp_int8
    shape = kwargs.pop("calibration_shape", None)
    calibration = x[:8] if shape is None else np.zeros(shape, np.float32)
    with pytest.raises(UserError, match=message):
        quantize_onnx(fp32, tmp_path / "c.onnx", calibration, x[8:16], **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written, no temp files left


# ------------------------------------------------------------------------------ re-param vs quantization
def test_weight_sqnr_flags_a_fold_that_widens_a_range() -> None:
    """ResMLP's Affine before fc1 folds into fc1's *columns*: one channel's alpha at 30 makes that
    column set every row's int8 step, 30x coarser for the other 63 entries of the row (while it
    adds only 1 of 64 entries' worth of signal), so the deploy weight loses several bits."""
    model = _train("resmlp_12", **{**RESMLP_SMALL, "embed_dim": 64})
    with torch.no_grad():
        for block in model.blocks:
            block.norm2.alpha.fill_(1.0).view(-1)[0] = 30.0
    report = weight_sqnr_report(model, reparameterize(model))
    layer = next(x for x in report.layers if x.deploy_name == "blocks.0.fc1.weight")
    assert layer.train_name == "blocks.0.mlp_channels.fc1.weight"
    assert layer.flagged and layer.drop_db > 6
    assert {x.deploy_name for x in report.flagged} == {f"blocks.{i}.fc1.weight" for i in range(2)}
    assert report.lines() and "blocks.0.fc1.weight" in report.lines()[0]
    assert report.to_dict()["flagged"] == [x.deploy_name for x in report.flagged]


def test_weight_sqnr_row_scaling_folds_are_not_flagged() -> None:
    """A BN after a conv scales whole rows: per-channel int8 does not see it (same SQNR)."""
    from tiny_model import tiny

    model = tiny()
    report = weight_sqnr_report(model, reparameterize(model))
    assert len(report.layers) == 8 and not report.flagged
    assert all(x.train_name is not None and abs(x.drop_db) < 0.05 for x in report.layers)
    assert {x.train_name for x in report.layers if x.deploy_name.endswith("fc1.weight")} == {
        f"blocks.{i}.fc1.conv.weight" for i in range(3)}


def test_weight_sqnr_repmlpnet_locality_injection_is_flagged() -> None:
    """The locality injection writes 3x-scaled conv taps (<= 10 per row) into fc3's 256-wide rows:
    the taps set each row's int8 step, the other ~246 entries keep a fraction of their resolution."""
    model = _train("repmlpnet_t224", channels=[8], hs=[16], ws=[16], sharesets_nums=[2], num_blocks=[1],
                   num_class=10, patch_size=[2, 2], in_channels=1)
    with torch.no_grad():
        for k in (1, 3):
            getattr(model.stages[0][0].repmlp_block, f"repconv{k}").bn.weight.mul_(3)
    report = weight_sqnr_report(model, reparameterize(model))
    (fc3,) = [x for x in report.layers if x.deploy_name.endswith("repmlp_block.weight")]
    assert fc3.train_name == "stages.0.0.repmlp_block.fc3.weight" and fc3.flagged and fc3.drop_db > 6
    assert [x.deploy_name for x in report.flagged] == [fc3.deploy_name]


def test_int8_weight_sqnr_matches_a_direct_computation() -> None:
    rows = torch.tensor([[1.0, -0.5, 0.26], [0.0, 0.0, 0.0], [-2.0, 1.0, 0.001]])
    q = torch.tensor([[127, -64, 33], [-127, 64, 0]], dtype=torch.float64)  # half to even: 63.5 -> 64
    scale = torch.tensor([1 / 127, 2 / 127], dtype=torch.float64)[:, None]
    kept = rows.double()[[0, 2]]  # the all-zero row has no signal to compare with
    ratio = ((kept - q * scale).square().sum(1) / kept.square().sum(1)).mean()
    assert math.isclose(int8_weight_sqnr_db(rows), -10 * math.log10(ratio), rel_tol=1e-9)
    assert int8_weight_sqnr_db(torch.tensor([[127.0, -64.0]])) == SQNR_CAP_DB  # exactly representable
    assert math.isclose(int8_weight_sqnr_db(rows * torch.tensor([[3.0], [1.0], [-0.01]])), int8_weight_sqnr_db(rows),
                        rel_tol=1e-6)


# ------------------------------------------------------------------------------ statistics, precision, peak
def test_stats_sqnr_db() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 10, generator=g, dtype=torch.float64)
    noise = torch.randn(50, 10, generator=g, dtype=torch.float64) * 0.01
    expected = 10 * math.log10(ref.square().sum() / noise.square().sum())
    assert math.isclose(compare(ref + noise, ref).sqnr_db, expected, rel_tol=1e-12)
    assert compare(ref, ref).sqnr_db == SQNR_CAP_DB
    assert compare(-ref, ref).sqnr_db < -5  # sign flip: noise power 4x the signal
    assert compare(ref + noise, ref).to_dict()["sqnr_db"] == compare(ref + noise, ref).sqnr_db


def test_agreement_lower_bound_is_wilson() -> None:
    def stats(top1: float, n: int):
        ref = torch.eye(2)[torch.zeros(n, dtype=torch.long)]
        y = ref.clone()
        y[: round((1 - top1) * n)] = torch.eye(2)[1]
        return compare(y, ref)

    # Wilson score bound, z = 1.645: p = 0.995, n = 1000 -> 0.98976 (5 disagreements miss 0.99, 4 pass)
    assert math.isclose(agreement_lower_bound(stats(0.995, 1000)), 0.98976, abs_tol=1e-5)
    assert agreement_lower_bound(stats(0.996, 1000)) >= 0.99 > agreement_lower_bound(stats(0.995, 1000))
    assert math.isclose(agreement_lower_bound(stats(1.0, 300)), 1 / (1 + 1.645**2 / 300), rel_tol=1e-12)
    bounds = [agreement_lower_bound(stats(0.99, n)) for n in (100, 1000, 10000)]
    assert bounds == sorted(bounds) and bounds[-1] < 0.99


def test_judge_names_each_missed_int8_target() -> None:
    from vismlp_deploy.verification.compare import judge

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(100, 10, generator=g)
    assert judge("q", ref + 0.01 * torch.randn(100, 10, generator=g), ref, "int8", inputs="images").passed
    missed = judge("q", ref + 0.5 * torch.randn(100, 10, generator=g), ref, "int8", inputs="images").failures
    assert any(m.startswith("top-1 agreement") for m in missed) and any(m.startswith("SQNR") for m in missed)
    # on random inputs top-1 is not judged (near-tied logits of random weights), the rest is
    random = judge("q", ref + 0.5 * torch.randn(100, 10, generator=g), ref, "int8", inputs="random").failures
    assert random and not any(m.startswith("top-1") for m in random)
    (only,) = judge("q", ref + 1e-3, ref, "fp32").failures  # fp32 is judged by the relative error alone
    assert only.startswith("rel err")


def test_ort_int8_gemm_peak_runs() -> None:
    from vismlp_deploy.benchmark.peak import ort_int8_gemm_peak

    peak = ort_int8_gemm_peak(sizes=(128,), repeats=2, threads=1)
    assert peak.gflops > 0 and peak.precision == "int8" and "MatMulInteger" in peak.kernel and peak.size == 128
