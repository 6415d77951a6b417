"""Checkpoints as users have them: wrappings, prefixes, safetensors, EMA, our own files, safety.

The bar: a timm-layout ResMLP / Mixer / ConvMixer golden, re-saved plain, DDP-prefixed,
wrapped with EMA and as safetensors, converts with ``vismlp-deploy convert --to pt`` and
no ``--arch``, and both the loaded train model and the written deploy model reproduce the
upstream output of the golden.
"""
from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from vismlp_deploy import load_checkpoint
from vismlp_deploy.checkpoint.io import read_checkpoint
from vismlp_deploy.cli import main
from vismlp_deploy.errors import CheckpointError
from vismlp_deploy.export.torch_artifact import load_deploy
from vismlp_deploy.models.registry import CONFIGS, FORMATS, _ensure_loaded

GOLDENS = Path(__file__).parent / "conformance"
# timm's ConvMixer golden was built with ReLU; no weight says so, hence the one override.
BAR_CASES = {"resmlp_timm": [], "mixer_timm": [], "convmixer_timm": ["--config", '{"act_layer": "ReLU"}']}
WRAPPINGS = ("plain", "ddp", "ema", "safetensors")


def _golden(name: str) -> dict:
    case = torch.load(GOLDENS / f"{name}.pt", weights_only=True)
    _ensure_loaded()
    if case["format"] not in FORMATS:
        pytest.skip(f"format {case['format']} ({name}) not registered yet")
    return case


def _perturbed(sd: dict) -> dict:
    return {k: (v + 1.0 if v.is_floating_point() else v) for k, v in sd.items()}


def _write(sd: dict, wrapping: str, directory: Path) -> Path:
    """``sd`` saved the way a training script would, as ``wrapping``."""
    if wrapping == "safetensors":
        path = directory / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        return path
    path = directory / "ckpt.pth"
    ddp = {f"module.{k}": v for k, v in sd.items()}
    obj = {"plain": sd, "ddp": ddp,
           # DeiT/timm training checkpoint: other weights under "model", the EMA under
           # "model_ema" (DDP-prefixed like timm's ModelEmaV2), an argparse namespace.
           "ema": {"model": _perturbed(sd), "model_ema": ddp, "optimizer": {"state": {}, "param_groups": []},
                   "epoch": 7, "args": argparse.Namespace(lr=5e-4, model="x")}}[wrapping]
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrapping", WRAPPINGS)
@pytest.mark.parametrize("name", list(BAR_CASES))
def test_convert_without_arch_matches_upstream(name: str, wrapping: str, tmp_path: Path) -> None:
    case = _golden(name)
    ckpt = _write(case["state_dict"], wrapping, tmp_path)
    out = tmp_path / "out.deploy.pt"
    extra = BAR_CASES[name] + (["--ema"] if wrapping == "ema" else [])
    assert main(["convert", str(ckpt), "--to", "pt", "--out", str(out), "--proof-batch", "2", *extra]) == 0
    deploy = load_deploy(out)
    assert deploy.arch == case["format"]
    with torch.no_grad():
        assert_close(deploy(case["input"]), case["output"])
    config = dict(zip(extra[::2], extra[1::2])).get("--config")
    train = load_checkpoint(ckpt, config=json.loads(config) if config else None, ema=wrapping == "ema")
    assert train.checkpoint_info.weights == ("model_ema" if wrapping == "ema" else "state_dict")
    with torch.no_grad():
        assert_close(train(case["input"]), case["output"])


def test_ema_is_only_used_when_asked_and_the_choice_is_reported(tmp_path: Path) -> None:
    case = _golden("mixer_timm")
    ckpt = _write(case["state_dict"], "ema", tmp_path)
    model = load_checkpoint(ckpt)  # no --ema: the (perturbed) training weights
    info = model.checkpoint_info
    assert info.weights == "model" and any("--ema" in n for n in info.notes)
    with torch.no_grad():
        assert not torch.allclose(model(case["input"]), case["output"], atol=1e-3)
    ema = load_checkpoint(ckpt, ema=True).checkpoint_info
    assert ema.weights == "model_ema" and ema.stripped == ["module."]


def test_wrappers_and_prefixes() -> None:
    sd = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2)}
    for obj, source, stripped in [
        ({"state_dict": sd, "epoch": 1}, "state_dict", []),
        ({"model": {"module." + k: v for k, v in sd.items()}}, "model", ["module."]),
        ({"net": {"_orig_mod.module." + k: v for k, v in sd.items()}}, "net", ["_orig_mod.", "module."]),
        ({"checkpoint": 1, "module": {"state_dict": sd}}, "module", []),  # one level deeper
    ]:
        ck = read_checkpoint(obj)
        assert (set(ck.state_dict), ck.source, ck.stripped) == (set(sd), source, stripped)


@pytest.mark.parametrize("obj, match", [
    ({"a": torch.ones(1)}, "plain state_dict without EMA"),
    ({"model": {"a": torch.ones(1)}}, "no EMA weights.*top-level keys: model"),
])
def test_ema_asked_but_absent(obj: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(obj, ema=True)


def test_only_ema_needs_the_flag() -> None:
    with pytest.raises(CheckpointError, match="only EMA weights.*--ema"):
        read_checkpoint({"state_dict_ema": {"a": torch.ones(1)}, "epoch": 3})
    assert read_checkpoint({"state_dict_ema": {"a": torch.ones(1)}}, ema=True).source == "state_dict_ema"


def test_own_checkpoint_carries_arch_and_config(tmp_path: Path) -> None:
    """``zoo --init`` output loads with no detection at all (metadata), also as safetensors."""
    _ensure_loaded()
    if "mixer_s16" not in CONFIGS:
        pytest.skip("mixer_s16 not registered yet")
    path = tmp_path / "m.pth"
    small = ["--set", "num_blocks=1", "--set", "embed_dim=16", "--set", "img_size=32", "--set", "num_classes=5"]
    assert main(["zoo", "--init", "mixer_s16", "--out", str(path), *small]) == 0
    model = load_checkpoint(path)
    info = model.checkpoint_info
    assert info.confidence == "certain" and "metadata" in info.how and model.config["embed_dim"] == 16
    # the same weights as safetensors with our metadata in the header
    payload = torch.load(path, weights_only=True)
    st = tmp_path / "m.safetensors"
    save_file(payload["state_dict"], str(st), metadata={"vismlp_deploy": json.dumps(payload["vismlp_deploy"])})
    again = load_checkpoint(st)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.checkpoint_info.container == "safetensors"


class _Payload:
    """Unpickling this opens (creates) the marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_never_runs(kind: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if kind == "torch-zip":
        torch.save({"state_dict": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"w": _Payload(marker)}, f, protocol=2)
    out = tmp_path / "evil.deploy.pt"
    for cmd in (["convert", str(path), "--to", "pt", "--out", str(out)], ["inspect", str(path)]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--trust-pickle" in err and "Traceback" not in err
        assert not marker.exists()
    with pytest.raises(CheckpointError, match="open"):  # the reason names what it would import
        read_checkpoint(path)
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]
    # the payload is live: trusting the file does run it (so the test above could fail)
    try:
        read_checkpoint(path, trust_pickle=True)
    except CheckpointError:
        pass  # the object is not a state_dict; what matters is that the code ran
    assert marker.exists()


def test_trust_pickle_loads_a_pickled_module(tmp_path: Path) -> None:
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(3, 2), path)
    with pytest.raises(CheckpointError, match="refusing.*torch.nn.modules.linear.Linear.*--trust-pickle"):
        read_checkpoint(path)
    ck = read_checkpoint(path, trust_pickle=True)
    assert set(ck.state_dict) == {"weight", "bias"} and ck.container.startswith("pickled module")


def test_inert_training_metadata_needs_no_trust(tmp_path: Path) -> None:
    """timm/DeiT store an argparse.Namespace beside the weights: loaded without code execution."""
    path = tmp_path / "train.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    assert read_checkpoint(path).source == "model"


# --------------------------------------------------------------------------- structural checks of read tensors

@settings(max_examples=60)
@given(st.data())
def test_overlap_check_has_no_false_negatives(data) -> None:
    """Any strided layout whose elements share an address is flagged (compared with enumerating addresses)."""
    from vismlp_deploy.checkpoint.io import _overlaps

    ndim = data.draw(st.integers(1, 4))
    shape = data.draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
    strides = data.draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim))
    t = torch.empty(2000).as_strided(shape, strides)
    grid = (torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, ndim) if t.numel()
            else torch.zeros(0, ndim))
    addresses = (grid.long() * torch.tensor(strides)).sum(1)
    if addresses.unique().numel() < addresses.numel():
        assert _overlaps(t)


@settings(max_examples=60)
@given(st.data())
def test_views_of_a_dense_tensor_are_never_flagged(data) -> None:
    """Slices with steps and permutations of a contiguous tensor (what real state_dicts hold) pass."""
    from vismlp_deploy.checkpoint.io import _overlaps, check_tensors

    shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    t = torch.randn(shape).permute(*data.draw(st.permutations(range(len(shape)))))
    for dim in range(t.dim()):
        start = data.draw(st.integers(0, t.shape[dim] - 1))
        t = t.narrow(dim, start, t.shape[dim] - start)[
            (slice(None),) * dim + (slice(None, None, data.draw(st.integers(1, 3))),)]
    assert not _overlaps(t)
    check_tensors({"w": t})


def test_safe_pickle_the_safe_loader_cannot_read_is_not_called_code(tmp_path: Path) -> None:
    """A plain legacy state_dict at pickle protocol 4 imports nothing unsafe; the refusal says what is missing."""
    path = tmp_path / "p4.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(CheckpointError, match=r"pickle instruction FRAME is not supported by the safe loader"):
        read_checkpoint(path)
    assert torch.equal(read_checkpoint(path, trust_pickle=True).state_dict["w"], torch.ones(2))
    # protocol 0 has no header byte: still recognised as a pickle (its globals named), not as "a text file"
    torch.save({"w": torch.ones(2), "x": _Payload(tmp_path / "m")}, path, _use_new_zipfile_serialization=False,
               pickle_protocol=0)
    with pytest.raises(CheckpointError, match=r"can run code.*imports io\.open"):
        read_checkpoint(path)
