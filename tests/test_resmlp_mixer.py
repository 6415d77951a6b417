"""ResMLP (timm + official deit keys) and MLP-Mixer (timm keys): deploy == train, key mapping, config inference.

The goldens themselves run in test_conformance.py; here: randomized small configs in fp32
and fp64 (non-default ratios, non-square images, batch 1 and 5), the official<->timm key
mapping, inference of the constructor arguments from the goldens and from every
full-size schema of these families, the fold report, and symbolic-batch export.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from torch import nn

from vismlp_deploy import create_model, load_checkpoint, reparameterize
from vismlp_deploy.checkpoint.detect import detect_format
from vismlp_deploy.errors import CheckpointError
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.models.mixer import MixerDeployBlock
from vismlp_deploy.models.registry import CONFIGS, get_format
from vismlp_deploy.models.resmlp import Affine, ResMLPDeployBlock

CONF = Path(__file__).parent / "conformance"
SCHEMAS = json.loads((CONF / "schemas.json").read_text())
FAMILY_FORMATS = ("timm-resmlp", "official-deit-resmlp", "timm-mixer")
# the constructor arguments that shape the weights (the rest: metadata, init values, drop rates)
STRUCTURAL = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "num_blocks", "depth", "mlp_ratio")

SMALL = {
    "resmlp": ("timm-resmlp", dict(num_classes=7, img_size=32, in_chans=3, patch_size=8, num_blocks=2, embed_dim=24,
                                   mlp_ratio=4, block_layer="ResBlock(init_values=0.1)", norm_layer="Affine")),
    "resmlp_ratio3_nonsquare": ("timm-resmlp", dict(num_classes=5, img_size=[16, 32], in_chans=2, patch_size=4,
                                                    num_blocks=3, embed_dim=16, mlp_ratio=3, block_layer="ResBlock",
                                                    norm_layer="Affine")),
    "resmlp_deit": ("official-deit-resmlp", dict(img_size=24, patch_size=6, in_chans=3, num_classes=4, embed_dim=16,
                                                 depth=2, init_scale=0.1)),
    "mixer": ("timm-mixer", dict(num_classes=7, img_size=32, in_chans=3, patch_size=8, num_blocks=2, embed_dim=24,
                                 mlp_ratio=[0.5, 4.0])),
    "mixer_ratio_1_2_nonsquare": ("timm-mixer", dict(num_classes=5, img_size=[16, 32], in_chans=2, patch_size=4,
                                                     num_blocks=3, embed_dim=20, mlp_ratio=[1.25, 2.0])),
    "mixer_scalar_ratio": ("timm-mixer", dict(num_classes=3, img_size=16, in_chans=3, patch_size=4, num_blocks=2,
                                              embed_dim=12, mlp_ratio=3.0)),
}


def _small(name: str, seed: int = 0) -> nn.Module:
    fmt_name, config = SMALL[name]
    fmt = get_format(fmt_name)
    model = randomize_(fmt.build(dict(config)), seed).eval()
    model.input_size = tuple(fmt.input_size(config))
    return model


def _input(model: nn.Module, batch: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.input_size, generator=g).to(dtype)


# ---------------------------------------------------------------- deploy == train
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(SMALL))
def test_deploy_equals_train(name: str, dtype: torch.dtype) -> None:
    model = _small(name).to(dtype)
    deploy = reparameterize(model)
    with torch.no_grad():
        for batch in (1, 5):
            x = _input(model, batch, dtype)
            ref, y = model(x), deploy(x)
            assert y.shape == (batch, SMALL[name][1]["num_classes"])
            assert ref.std() > 0.05  # randomized weights give non-degenerate logits
            assert_close(y, ref)


@pytest.mark.parametrize("name", ["resmlp", "mixer"])
def test_deploy_is_batch_independent(name: str) -> None:
    """Sample i of a batch of 5 equals the same image alone: nothing mixes samples."""
    deploy = reparameterize(_small(name).double())
    x = _input(deploy, 5, torch.float64)
    with torch.no_grad():
        whole = deploy(x)
        for i in range(5):
            assert_close(deploy(x[i:i + 1])[0], whole[i])


def test_deploy_structure() -> None:
    """No Affine, layer-scale or token transpose survives; the Mixer LN2/final LN lose their affine."""
    resmlp = reparameterize(_small("resmlp"))
    assert all(isinstance(b, ResMLPDeployBlock) for b in resmlp.blocks)
    assert not any(isinstance(m, Affine) for m in resmlp.modules())
    assert not any(re.search(r"(^|\.)(ls\d|alpha|beta)$", k) for k in resmlp.state_dict())
    mixer = reparameterize(_small("mixer"))
    assert all(isinstance(b, MixerDeployBlock) for b in mixer.blocks)
    assert all(b.norm1.elementwise_affine and not b.norm2.elementwise_affine for b in mixer.blocks)
    assert not mixer.norm.elementwise_affine


# ---------------------------------------------------------------- report
def test_resmlp_report_lists_every_fold() -> None:
    depth = SMALL["resmlp"][1]["num_blocks"]
    report = reparameterize(_small("resmlp")).reparam_report
    assert report.folded == {
        "Affine->token-mix scale + bias table": depth,
        "LayerScale->token-mix scale + bias table": depth,
        "Affine->Linear": depth,
        "LayerScale->Linear": depth,
        "Affine->Linear (through the token mean)": 1,
    }
    paths = {p for p, _ in report.folded_paths}
    assert {"blocks.0.norm1", "blocks.0.ls1", "blocks.1.norm2", "blocks.1.ls2", "norm"} <= paths
    left = {x.path: x for x in report.left}
    assert set(left) == {f"blocks.{i}.linear_tokens" for i in range(depth)}
    assert "differs per channel" in left["blocks.0.linear_tokens"].reason
    # the folds remove element-wise work only; the matmul/conv FLOPs (what is counted) stay
    assert report.flops_before and report.flops_after == report.flops_before
    n, c = 16, 24  # the bias table (N x C) outweighs the removed alphas/betas/layer-scales at this size
    assert report.params_after - report.params_before == depth * (n * c + c - n - 6 * c) - 2 * c


def test_mixer_report_lists_every_fold_and_what_stays() -> None:
    depth = SMALL["mixer"][1]["num_blocks"]
    report = reparameterize(_small("mixer")).reparam_report
    assert report.folded == {"LayerNorm affine->Linear": depth, "LayerNorm affine->Linear (through the token mean)": 1}
    left = {x.path: x for x in report.left}
    # LN1 keeps its affine (reason given); LN2 and the final LN stay as statistics-only norms
    assert set(left) == {f"blocks.{i}.norm{j}" for i in range(depth) for j in (1, 2)} | {"norm"}
    assert "shared by all channels" in left["blocks.0.norm1"].reason
    assert "without affine" in left["blocks.0.norm2"].reason and "without affine" in left["norm"].reason
    assert report.params_after == report.params_before - 2 * 24 * (depth + 1)


def test_headless_model_keeps_the_final_norm_and_says_why() -> None:
    for name, fmt in (("resmlp", "timm-resmlp"), ("mixer", "timm-mixer")):
        model = randomize_(get_format(fmt).build({**SMALL[name][1], "num_classes": 0})).eval()
        model.input_size = (3, 32, 32)
        deploy = reparameterize(model)
        assert any(x.path == "norm" and "num_classes=0" in x.reason for x in deploy.reparam_report.left)
        x = _input(model, 2)
        with torch.no_grad():
            assert_close(deploy(x), model(x))


# ---------------------------------------------------------------- key mapping
def _timm_to_deit(sd: dict) -> dict:
    """Inverse of timm's deit key filter (test-only), to check the mapping both ways."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = k.replace(".linear_tokens.", ".attn.").replace(".mlp_channels.", ".mlp.")
        k = re.sub(r"\.ls(\d)$", r".gamma_\1", k)
        out[k] = v.reshape(-1) if k.endswith((".alpha", ".beta")) else v
    return out


def test_official_and_timm_keys_give_the_same_model() -> None:
    timm_model = _small("resmlp", seed=3)
    cfg = SMALL["resmlp"][1]
    deit_sd = _timm_to_deit(timm_model.state_dict())
    assert detect_format(deit_sd).format.name == "official-deit-resmlp"
    deit_model = load_checkpoint(deit_sd)  # arch and config detected
    assert deit_model.config["depth"] == cfg["num_blocks"] and deit_model.config["embed_dim"] == cfg["embed_dim"]
    for k, v in timm_model.state_dict().items():
        assert torch.equal(deit_model.state_dict()[k], v), k
    x = _input(timm_model, 5)
    with torch.no_grad():
        assert torch.equal(deit_model(x), timm_model(x))
        assert torch.equal(reparameterize(deit_model)(x), reparameterize(timm_model)(x))


def test_golden_official_maps_onto_golden_timm() -> None:
    """The two ResMLP goldens hold the same weights under the two key layouts."""
    timm = torch.load(CONF / "resmlp_timm.pt", weights_only=True)["state_dict"]
    official = torch.load(CONF / "resmlp_official.pt", weights_only=True)["state_dict"]
    mapped = get_format("official-deit-resmlp").to_model_keys(official)
    assert list(mapped) == list(timm)
    for k in timm:
        assert mapped[k].shape == timm[k].shape and torch.equal(mapped[k], timm[k]), k


# ---------------------------------------------------------------- config inference
@pytest.mark.parametrize("golden", ["resmlp_timm", "resmlp_official", "mixer_timm"])
def test_infer_config_on_goldens(golden: str) -> None:
    case = torch.load(CONF / f"{golden}.pt", weights_only=True)
    detection = detect_format(case["state_dict"])
    assert detection.format.name == case["format"]
    stored = case["config"]
    assert ({k: detection.config[k] for k in STRUCTURAL if k in stored}
            == {k: stored[k] for k in STRUCTURAL if k in stored})
    model = load_checkpoint(case["state_dict"])  # no arch, no config: everything inferred
    with torch.no_grad():
        assert_close(model(case["input"]), case["output"])


@pytest.mark.parametrize("entry", [k for k, v in SCHEMAS.items() if v["format"] in FAMILY_FORMATS])
def test_infer_config_on_full_size_schemas(entry: str) -> None:
    schema = SCHEMAS[entry]
    sd = {k: torch.empty(shape, device="meta") for k, shape in schema["keys"].items()}
    detection = detect_format(sd)
    assert detection.format.name == schema["format"]
    stored = schema["config"]
    for k in STRUCTURAL:
        if k in stored:
            assert detection.config[k] == stored[k], k
    with torch.device("meta"):
        model = detection.format.build(detection.config)
    mapped = detection.format.to_model_keys(sd)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == {k: tuple(v.shape) for k, v in mapped.items()}
    assert sum(v.numel() for v in mapped.values()) == schema["num_elements"]
    assert list(detection.format.input_size(detection.config)) == schema["input_size"]


def test_infer_config_refusals() -> None:
    sd = _small("mixer").state_dict()
    sd["blocks.0.mlp_tokens.fc1.weight"] = torch.empty(12, 15)  # 15 tokens: not a square grid
    with pytest.raises(CheckpointError, match="square"):
        get_format("timm-mixer").infer_config(sd)
    resmlp_sd = _small("resmlp").state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        get_format("timm-resmlp").infer_config({k: v for k, v in resmlp_sd.items() if not k.startswith("stem.")})
    with pytest.raises(CheckpointError):  # a Mixer config cannot build a ResMLP checkpoint
        load_checkpoint(resmlp_sd, arch="timm-resmlp", config={**SMALL["resmlp"][1], "block_layer": "MixerBlock"})


def test_mixer_ratio_inference_round_trips() -> None:
    """int(r * dim) must give back the stored hidden widths for awkward ratios too."""
    fmt = get_format("timm-mixer")
    for dim, hidden in ((20, 25), (24, 7), (1000, 333), (768, 384)):
        sd = {"stem.proj.weight": torch.empty(dim, 3, 4, 4, device="meta"),
              "blocks.0.norm1.weight": torch.empty(dim, device="meta"),
              "blocks.0.mlp_tokens.fc1.weight": torch.empty(hidden, 16, device="meta"),
              "blocks.0.mlp_channels.fc1.weight": torch.empty(hidden * 2, dim, device="meta")}
        r0, r1 = fmt.infer_config(sd)["mlp_ratio"]
        assert (int(r0 * dim), int(r1 * dim)) == (hidden, hidden * 2)


# ---------------------------------------------------------------- zoo
PUBLISHED_PARAMS = {  # millions, from the papers / timm model cards
    "resmlp_12": 15.35, "resmlp_24": 30.02, "resmlp_36": 44.69, "resmlp_big_24": 129.14,
    "mixer_s16": 18.53, "mixer_b16": 59.88, "mixer_l16": 208.20, "mixer_s32": 19.10, "mixer_b32": 60.29,
    "mixer_l32": 206.94,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_named_configs_match_published_sizes(name: str) -> None:
    assert CONFIGS[name].format in FAMILY_FORMATS
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PUBLISHED_PARAMS[name]


# ---------------------------------------------------------------- export-friendliness
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["resmlp", "mixer"])
def test_deploy_exports_with_a_symbolic_batch(name: str, dtype: torch.dtype) -> None:
    """The exported lowering (Mixer: left MatMuls, affine-free LN) equals train, like the eager one."""
    model = _small(name).to(dtype)
    deploy = reparameterize(model)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(deploy, (_input(model, 2, dtype),), dynamic_shapes=({0: batch},))
    x = _input(model, 5, dtype)
    with torch.no_grad():
        assert_close(program.module()(x), model(x))
    if name == "mixer":  # the exported token MLP has no transposes (only the stem's flatten-transpose stays)
        ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert sum("transpose" in o or "permute" in o for o in ops) == 1, ops
