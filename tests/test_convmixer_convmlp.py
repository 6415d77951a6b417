"""ConvMixer and ConvMLP: deploy == train (randomized), bias maps at borders, refusals, config inference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, rel_err

from vismlp_deploy import load_checkpoint, reparameterize
from vismlp_deploy.checkpoint.detect import detect_format
from vismlp_deploy.errors import CheckpointError, UserError
from vismlp_deploy.models.convmixer import ConvMixer, ConvMixerDeploy
from vismlp_deploy.models.convmlp import ConvMLP
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.models.registry import create_model, get_format

HERE = Path(__file__).parent
SCHEMAS = HERE / "conformance" / "schemas.json"  # vendored copy of shared/conformance
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


def _x(shape, seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _check(model, x, fixed=None):
    model = randomize_(model, 3).eval().to(x.dtype)
    model.fixed_input_size = fixed
    deploy = reparameterize(model, count=False)
    with torch.no_grad():
        y, yd = model(x), deploy(x)
    assert_close(yd, y)
    return deploy


# ---------------------------------------------------------------------------------- ConvMixer
@DTYPES
@pytest.mark.parametrize("k", [3, 5, 7, 9])
@pytest.mark.parametrize("act", ["ReLU", "GELU"])
@pytest.mark.parametrize("depth", [1, 3])
def test_convmixer_deploy_equals_train(k, act, depth, dtype):
    model = ConvMixer(dim=12, depth=depth, kernel_size=k, patch_size=3, num_classes=7, act_layer=act)
    deploy = _check(model, _x((2, 3, 18, 27), dtype=dtype))  # 6x9 grid: non-square, border-dominated
    assert isinstance(deploy, ConvMixerDeploy)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    rep = deploy.reparam_report
    assert rep.folded["BatchNorm2d->PWConv2d (forward)"] == depth
    assert rep.folded["BatchNorm2d->Linear (through the pool)"] == 1
    kinds = [x.kind for x in rep.left]  # one shift per block stays; a multiply only for GELU (BN γ > 0 here)
    assert kinds.count("BatchNorm2d shift (per-channel add)") == depth
    assert kinds.count("BatchNorm2d scale ratio (per-channel multiply)") == (depth if act == "GELU" else 0)
    assert all((b.scale is None) == (act == "ReLU") and b.gain is None for b in deploy.blocks)
    # fully convolutional: the size-agnostic form is exact at another size too
    with torch.no_grad():
        x2 = _x((1, 3, 12, 33), seed=5, dtype=dtype)
        assert_close(deploy(x2), model(x2))


@DTYPES
@pytest.mark.parametrize("k", [3, 9])
@pytest.mark.parametrize("depth", [2])
def test_convmixer_fixed_size_bias_map(k, depth, dtype):
    model = ConvMixer(dim=8, depth=depth, kernel_size=k, patch_size=1, num_classes=5, act_layer="GELU")
    deploy = _check(model, _x((2, 3, 16, 11), dtype=dtype), fixed=(16, 11))
    assert not any(x.kind.startswith("BatchNorm2d shift") for x in deploy.reparam_report.left)
    assert deploy.reparam_report.folded["BatchNorm2d shift->DWConv2d bias map"] == depth
    with pytest.raises(UserError, match="fixed input size"):
        deploy(_x((1, 3, 16, 12), dtype=dtype))


def test_convmixer_bias_map_differs_from_naive_fold_exactly_at_borders():
    """A shift into a zero-padded k=9 DW conv at 16x16: the naive fold is wrong on 75% of positions."""
    model = randomize_(ConvMixer(dim=4, depth=1, kernel_size=9, patch_size=1, num_classes=3), 0).eval().double()
    model.fixed_input_size = (16, 16)
    bias_map = reparameterize(model, count=False).blocks[0].bias_map[0]
    dw, bn0 = model.blocks[0][0].fn[0], model.stem[2]
    t = bn0.bias - bn0.running_mean * bn0.weight / torch.sqrt(bn0.running_var + bn0.eps)
    naive = dw.bias + (dw.weight.sum((1, 2, 3)) * t)  # b + Σ W·t, what a padding-blind fold does
    wrong = (bias_map - naive[:, None, None]).abs() > 1e-12
    border = torch.ones(16, 16, dtype=torch.bool)
    border[4:12, 4:12] = False  # interior: every tap of the 9x9 kernel reads a real pixel
    assert torch.equal(wrong.all(0), border) and border.float().mean() == 0.75
    # and the map is the conv of the constant stream, computed independently
    ref = F.conv2d(t.reshape(1, 4, 1, 1).expand(1, 4, 16, 16), dw.weight, dw.bias, padding=4, groups=4)[0]
    assert_close(bias_map, ref)


@DTYPES
@pytest.mark.parametrize("act", ["ReLU", "GELU"])
def test_convmixer_negative_and_zero_bn_scales(act, dtype):
    """Negative γ: only positive factors cross a ReLU, so a channel whose stream and branch scales
    differ in sign keeps a multiply (reported); a stream scale of exactly 0 folds exactly."""
    model = randomize_(ConvMixer(dim=6, depth=3, kernel_size=3, patch_size=2, num_classes=4, act_layer=act), 0)
    bns = [model.stem[2]] + [m for b in model.blocks for m in (b[0].fn[2], b[3])]
    with torch.no_grad():
        for bn in bns:
            bn.weight[1] = -bn.weight[1]  # channel 1: negative everywhere, signs agree
        model.blocks[1][0].fn[2].weight[4] *= -1  # channel 4: branch of block 1 only: signs differ
        model.blocks[0][3].weight[2] = 0.0  # stream scale 0 entering block 1
    model = model.eval().to(dtype)
    deploy = reparameterize(model, count=False)
    x = _x((2, 3, 10, 14), dtype=dtype)
    with torch.no_grad():
        assert_close(deploy(x), model(x))
    left = {x.path: x.reason for x in deploy.reparam_report.left if x.kind.endswith("multiply)")}
    if act == "ReLU":  # block 1 keeps one for channels 2 (scale 0) and 4 (sign): 2 channels
        assert list(left) == ["blocks.1.scale"] and left["blocks.1.scale"].startswith("2 channel(s)")
        assert [b.scale is None for b in deploy.blocks] == [True, False, True]
    else:
        assert len(left) == 3 and all("not positively homogeneous" in r for r in left.values())


def test_convmixer_zero_branch_bn_scale_is_refused_not_approximated():
    model = randomize_(ConvMixer(dim=6, depth=2, kernel_size=3, patch_size=2, num_classes=4), 0).eval()
    model.blocks[1][0].fn[2].weight.data[2] = 0.0  # BN1 of block 1: s1 == 0 in one channel
    for fixed in (None, (10, 10)):  # size-agnostic form divides by s1; the bias-map form by the stream's s
        model.fixed_input_size = fixed
        deploy = reparameterize(model, count=False)
        assert isinstance(deploy, ConvMixer) == (fixed is None)  # refused => kept in train form
        assert any("exactly 0" in x.reason for x in deploy.reparam_report.left) == (fixed is None)
        x = _x((2, 3, 10, 10))
        with torch.no_grad():
            assert_close(deploy(x), model(x))


@pytest.mark.parametrize("act", ["ReLU", "GELU"])
def test_convmixer_onnx_passes(act, tmp_path):
    """The exported deploy graph has fewer elementwise passes than train and matches it in ORT:
    ReLU: no Mul (scales inside the convs); both: one single-pass affine (BatchNormalization) per block."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from vismlp_deploy.export.onnx import export_onnx

    model = randomize_(ConvMixer(dim=8, depth=2, kernel_size=3, patch_size=2, num_classes=4, act_layer=act), 0).eval()
    model.input_size = (3, 12, 12)
    x = _x((2, 3, 12, 12))
    ops = {}
    for name, m in (("train", model), ("deploy", reparameterize(model, count=False))):
        path = export_onnx(m, tmp_path / f"{name}.onnx")
        ops[name] = [n.op_type for n in onnx.load(path).graph.node]
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert rel_err(torch.from_numpy(y), model(x).detach()) <= 1e-5
    bn, mul = ops["deploy"].count("BatchNormalization"), ops["deploy"].count("Mul")
    assert (bn, mul) == (2, 0)  # the affine a'' (ReLU: shift only) per block, no multiply node
    assert len(ops["deploy"]) < len(ops["train"]) and ops["deploy"].count("Add") == 2  # the residuals
    if act == "ReLU":
        assert all(op != "BatchNormalization" or nxt == "Conv" for op, nxt in zip(ops["deploy"], ops["deploy"][1:]))


@pytest.mark.parametrize("bad, match", [
    ({"kernel_size": 4}, "even kernel"), ({"act_layer": "SiLU"}, "act_layer"), ({"num_classes": 0}, "num_classes"),
])
def test_convmixer_build_refusals(bad, match):
    cfg = {"dim": 8, "depth": 1, "kernel_size": 3, "patch_size": 2, "num_classes": 3, **bad}
    with pytest.raises(ValueError, match=match):
        get_format("timm-convmixer").build(cfg)


# ----------------------------------------------------------------------------------- ConvMLP
def _tiny_convmlp():
    return ConvMLP(blocks=[1, 2], dims=[8, 12], mlp_ratios=[2, 1.5], channels=6, n_conv_blocks=2, num_classes=5)


@DTYPES
def test_convmlp_deploy_equals_train(dtype):
    model = _tiny_convmlp()
    deploy = _check(model, _x((2, 3, 40, 56), dtype=dtype))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    rep = deploy.reparam_report
    assert rep.folded["BatchNorm2d->Conv2d"] == 3 + 3 * 2
    assert rep.folded["LayerNorm affine->Linear"] == 2 * 3
    left = {x.path: x.reason for x in rep.left}
    assert sum("connect_norm" in p for p in left) == 3
    assert all("zero-padded" in r for p, r in left.items() if p.endswith("connect_norm"))
    with torch.no_grad():  # size-agnostic: exact at another size too
        x2 = _x((1, 3, 33, 24), seed=4, dtype=dtype)
        assert_close(deploy(x2), model(x2))


@DTYPES
def test_convmlp_fixed_size_folds_connect_norm(dtype):
    model = _tiny_convmlp()
    deploy = _check(model, _x((2, 3, 40, 56), dtype=dtype), fixed=(40, 56))  # grids 5x7 and 3x4
    rep = deploy.reparam_report
    assert rep.folded["LayerNorm shift->DWConv2d bias map"] == 3
    assert all(not m.elementwise_affine for m in deploy.modules() if isinstance(m, torch.nn.LayerNorm))
    with pytest.raises(UserError, match="fixed input size"):
        deploy(_x((1, 3, 48, 56), dtype=dtype))


def test_convmlp_build_refusals():
    with pytest.raises(ValueError, match="same length"):
        ConvMLP(blocks=[1], dims=[8, 16], mlp_ratios=[2])
    with pytest.raises(CheckpointError, match="unknown ConvMLP arguments"):
        load_checkpoint(create_model("convmlp_s").state_dict(), arch="official-convmlp",
                        config={"blocks": [2, 4, 2], "dims": [128, 256, 512], "mlp_ratios": [2, 2, 2], "bogus": 1})


# ------------------------------------------------------------------------ config inference
@pytest.mark.parametrize("case", ["convmixer_official", "convmixer_timm", "convmlp_official"])
def test_infer_config_on_goldens(case):
    golden = torch.load(HERE / "conformance" / f"{case}.pt", weights_only=True)
    det = detect_format(golden["state_dict"])
    assert det.format.name == golden["format"]
    inferred = dict(det.config)
    act = inferred.pop("act_layer", None)
    assert inferred == {k: v for k, v in golden["config"].items() if k != "act_layer"}
    if case == "convmixer_official":  # no named config matches: the upstream default GELU, said so
        assert act == "GELU"
        model = load_checkpoint(golden["state_dict"])
        assert any("not stored in the weights" in n for n in model.config_notes)
        assert model.checkpoint_info.confidence == "medium"
        with torch.no_grad():
            assert_close(model(golden["input"]), golden["output"])


def _meta_shapes(fmt, cfg):
    with torch.device("meta"):
        model = fmt.build(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, act", [
    ("convmixer_768_32", "ReLU"), ("convmixer_1536_20", "GELU"), ("convmixer_1536_20_locuslab", "GELU"),
    ("convmixer_768_32_locuslab", "ReLU"), ("convmlp_s", None), ("convmlp_m", None), ("convmlp_l", None),
])
def test_infer_config_on_schemas(name, act):
    entry = json.loads(SCHEMAS.read_text())[name]
    sd = {k: torch.empty(v, device="meta") for k, v in entry["keys"].items()}
    det = detect_format(sd)
    assert det.format.name == entry["format"]
    cfg = dict(det.config)
    assert cfg.pop("act_layer", None) == act
    expected = {k: v for k, v in entry["config"].items() if k not in ("act_layer", "timm_model_name")}
    assert {k: v for k, v in cfg.items() if k in expected} == expected
    assert {k: v for k, v in cfg.items() if k not in expected} in ({}, {"in_chans": 3})  # upstream default
    mapped = {k: tuple(v.shape) for k, v in det.format.to_model_keys(sd).items()}
    assert mapped == _meta_shapes(det.format, det.config)
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == entry["num_elements"]


# ---------------------------------------------------------------- bars: smallest configs at 224
@pytest.mark.parametrize("name, batch", [("convmlp_s", 16), ("convmixer_768_32", 2)])
def test_smallest_named_config_at_224(name, batch):
    """fp32 deploy vs train <= 1e-5 and identical top-1. convmixer_768_32 (20 GFLOP/img) runs
    batch 2 here to stay affordable on 2 CI cores; batch 16 was measured by hand (see report)."""
    model = randomize_(create_model(name), 0).eval()
    deploy = reparameterize(model, count=False)
    x = _x((batch, 3, 224, 224))
    with torch.no_grad():
        y, yd = model(x), deploy(x)
    assert rel_err(yd, y) <= 1e-5
    assert torch.equal(y.argmax(1), yd.argmax(1))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
