"""sMLPNet and AS-MLP: randomized deploy-vs-train equivalence, what is left, config inference.

Small configs for the property checks; the two smallest named configs at 224px run once
each (batch 16, fp32) for the accuracy bar.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_close, rel_err
from torch import nn

from vismlp_deploy import load_checkpoint, reparameterize
from vismlp_deploy.errors import UserError
from vismlp_deploy.models.asmlp import GroupNorm1
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.models.registry import create_model, get_format

HERE = Path(__file__).parent
CONF = HERE / "conformance"  # vendored copy of shared/conformance

SMALL = {
    "smlp_d8_s32": ("smlpnet_t", dict(dim=8, image_size=32, depths=[1, 2, 1, 1], num_classes=7)),
    "smlp_d12_s64_p8": ("smlpnet_t", dict(dim=12, image_size=64, patch_size=8, depths=[2, 1, 1, 1], alpha=2)),
    "asmlp_d8_shift5": ("asmlp_t", dict(embed_dim=8, img_size=32, depths=[1, 1, 1, 1], num_classes=7)),
    "asmlp_d12_shift3": ("asmlp_t", dict(embed_dim=12, img_size=64, depths=[1, 2, 1, 1], shift_size=3)),
    "asmlp_d10_shift7": ("asmlp_t", dict(embed_dim=10, img_size=32, depths=[1, 1, 1, 1], shift_size=7)),
}


def _small(name: str, seed: int = 0) -> nn.Module:
    base, over = SMALL[name]
    model = randomize_(create_model(base, **over), seed)
    size = over.get("image_size", over.get("img_size"))
    model.input_size = (3, size, size)
    return model.eval()


def _input(model: nn.Module, n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *model.input_size, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(SMALL))
def test_deploy_equals_train_small(name: str, dtype: torch.dtype) -> None:
    model = _small(name, seed=3).to(dtype)
    deploy = reparameterize(model, count=False)
    x = _input(model, 3, dtype)
    with torch.no_grad():
        assert_close(deploy(x), model(x))
        assert_close(deploy(x[:1]), model(x[:1]))  # batch is not baked in


def _left_norms(deploy: nn.Module) -> list[str]:
    return [p for p, m in deploy.named_modules()
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, GroupNorm1))]


def test_smlp_deploy_keeps_only_the_residual_stream_bn() -> None:
    model = _small("smlp_d8_s32")
    deploy = reparameterize(model, count=False)
    bns = [p for p, m in deploy.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns == [f"token_mix.{n}.bn" for n in range(5)]
    lns = [p for p, m in deploy.named_modules() if isinstance(m, nn.LayerNorm)]
    assert all(not m.elementwise_affine for p, m in deploy.named_modules() if isinstance(m, nn.LayerNorm))
    left = {x.path for x in deploy.reparam_report.left}
    assert {f"token_mix.{n}.bn" for n in range(5)} <= left
    assert len(deploy.reparam_report.left) == 10  # 5 BN + 5 LN, each reported once
    assert {f"channel_mix.{n}.1" for n in range(5)} <= left and len(lns) == 5
    assert deploy.reparam_report.folded["BatchNorm2d->Conv2d"] == 5
    assert deploy.reparam_report.folded["BatchNorm2d->Linear"] == 1


def test_smlp_deploy_rejects_other_sizes() -> None:
    deploy = reparameterize(_small("smlp_d8_s32"), count=False)
    with pytest.raises(UserError, match="fixed-size"):
        deploy(torch.zeros(1, 3, 64, 64))


def test_asmlp_deploy_has_no_groupnorm_module_and_no_roll(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _small("asmlp_d8_shift5")
    deploy = reparameterize(model, count=False)
    assert not any(isinstance(m, nn.GroupNorm) for m in deploy.modules())
    with_affine = [p for p, m in deploy.named_modules() if isinstance(m, GroupNorm1) and m.weight is not None]
    assert with_affine == ["patch_embed.norm"] + [f"layers.{i}.blocks.0.inner" for i in range(4)]
    # every remaining norm is named in the report
    left = {x.path for x in deploy.reparam_report.left}
    assert "patch_embed.norm" in left and "norm" in left
    assert {f"layers.{i}.blocks.0.{w}" for i in range(4)
            for w in ("norm1", "norm2", "axial_shift.norm1", "axial_shift.norm2")} <= left
    assert {f"layers.{i}.downsample.norm" for i in range(3)} <= left
    x = _input(model, 2, torch.float32)
    with torch.no_grad():
        ref = model(x)

        def no_roll(*a, **k):
            raise AssertionError("torch.roll in the deploy form")
        monkeypatch.setattr(torch, "roll", no_roll)
        assert_close(deploy(x), ref)


@pytest.mark.parametrize("name", ["smlpnet_t", "asmlp_t"])
def test_smallest_named_config_at_224(name: str) -> None:
    model = randomize_(create_model(name), seed=0).eval()
    deploy = reparameterize(model, count=False)
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, ref = deploy(x), model(x)
    assert rel_err(y, ref) <= 1e-5
    assert torch.equal(y.argmax(1), ref.argmax(1))


# ------------------------------------------------------------------------- inference of configs
@pytest.mark.parametrize("case", ["smlp_official", "asmlp_official", "asmlp_official_shift3"])
def test_infer_config_on_goldens(case: str) -> None:
    data = torch.load(CONF / f"{case}.pt", weights_only=True)
    inferred = get_format(data["format"]).infer_config(data["state_dict"])
    # not in the weights: AS-MLP's shift size (assumed 5) and img_size (a convolutional net; 224)
    unknowable = {"shift_size", "img_size"} if data["format"] == "official-asmlp" else set()
    assert {k: v for k, v in inferred.items() if k not in unknowable} == \
        {k: v for k, v in data["config"].items() if k not in unknowable}
    model = load_checkpoint(data["state_dict"], arch=data["format"])  # detected config loads strictly
    if data["config"].get("shift_size", 5) == 5:
        with torch.no_grad():
            assert_close(model(data["input"]), data["output"])


SCHEMAS = {"smlpnet_tiny": "smlpnet_t", "smlpnet_small": "smlpnet_s",
           "asmlp_tiny_patch4_shift5_224": "asmlp_t", "asmlp_small_patch4_shift5_224": "asmlp_s"}


@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_infer_config_on_schemas(schema: str) -> None:
    entry = json.loads((CONF / "schemas.json").read_text())[schema]
    sd = {k: torch.empty(shape) for k, shape in entry["keys"].items()}
    fmt = get_format(entry["format"])
    assert fmt.matches(sd)
    cfg = fmt.infer_config(sd)
    assert cfg == entry["config"]
    assert cfg == create_model(SCHEMAS[schema]).config
    from vismlp_deploy.checkpoint.detect import detect_format
    assert detect_format(sd).format.name == entry["format"]
