"""Trained Fashion-MNIST checkpoints (tests/fixtures/fashion_mnist, benchmarks/train_fashion_mnist.py).

Real weights of every family, in each family's upstream key layout, on the full 10k test set:
detection finds the recorded format and config; the train form reproduces the recorded
top-1 (to the image here; within two images on other CPUs); the deploy form (``reparameterize``), and the artifacts of
``vismlp-deploy convert --to pt`` and ``--to onnx`` (the latter run in ONNX Runtime), give the
train form's predictions on >= 99.99 % of the images, with ``max|y - ref| / max|ref|`` <= 1e-5
over all 10k logits.

The file checks run everywhere; the rest skip when Fashion-MNIST is not installed (CI installs
it). One model of each family is built and evaluated once per module (batches of the
manifest's ``eval_batch``, the batch the recorded top-1 was measured with).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import vismlp_deploy as vd
from vismlp_deploy.datasets import fashion_mnist_dir, load_fashion_mnist
from vismlp_deploy.errors import UserError
from vismlp_deploy.runtime.ort_runner import OrtRunner
from vismlp_deploy.verification.stats import Stats, compare

FIXTURES = Path(__file__).parent / "fixtures" / "fashion_mnist"
MANIFEST: dict[str, dict] = json.loads((FIXTURES / "manifest.json").read_text())
MIN_AGREEMENT = 0.9999  # of the 10k top-1 predictions
FP32_REL_TOL = 1e-5
TOP1_SLACK = 2  # images of the 10k whose recorded top-1 may differ on another CPU


def run_batched(run: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    """Logits (N, classes) of ``run`` over x (N, C, H, W), ``batch`` images at a time."""
    with torch.inference_mode():
        return torch.cat([run(x[i:i + batch]) for i in range(0, len(x), batch)])


@dataclass
class Trained:
    entry: dict
    model: nn.Module  # train form, as load_checkpoint detected it
    labels: Tensor
    images: Tensor
    logits: Tensor  # train form on the 10k test images


@pytest.fixture(scope="module")
def test_images() -> Callable[[int], tuple[Tensor, Tensor]]:
    """channels -> the 10k Fashion-MNIST test images (N, channels, 32, 32) and labels, loaded once."""
    try:
        fashion_mnist_dir()
    except UserError as e:
        pytest.skip(f"Fashion-MNIST is not installed: {e}")
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def get(channels: int) -> tuple[Tensor, Tensor]:
        if channels not in cache:
            cache[channels] = load_fashion_mnist("test", channels=channels, size=32)
        return cache[channels]
    return get


@pytest.fixture(scope="module", params=list(MANIFEST))
def trained(request, test_images) -> Trained:
    entry = MANIFEST[request.param]
    model = vd.load_checkpoint(FIXTURES / entry["file"], input_size=(32, 32))
    x, y = test_images(entry["in_chans"])
    return Trained(entry, model, y, x, run_batched(model, x, entry["eval_batch"]))


@pytest.fixture(scope="module")
def deploy(trained: Trained) -> tuple[nn.Module, Tensor]:
    model = vd.reparameterize(trained.model)
    return model, run_batched(model, trained.images, trained.entry["eval_batch"])


def assert_equivalent(stats: Stats, what: str) -> None:
    assert stats.n == 10_000
    assert stats.top1 >= MIN_AGREEMENT, f"{what}: same top-1 on only {stats.top1:.4%} of the 10k test images"
    assert stats.rel <= FP32_REL_TOL, f"{what}: max|y-ref|/max|ref| = {stats.rel:.2e} > {FP32_REL_TOL:.0e}"


# ----------------------------------------------------------------- the files themselves
def test_manifest_covers_every_family_and_both_channel_counts() -> None:
    families = {e["family"] for e in MANIFEST.values()}
    assert families == {"repmlpnet", "repmlp-res50", "resmlp", "mixer", "convmixer", "convmlp", "smlpnet", "asmlp"}
    assert {e["in_chans"] for e in MANIFEST.values()} == {1, 3}


@pytest.mark.parametrize("name", list(MANIFEST))
def test_fixture_file_is_small_float32_with_trained_statistics(name: str) -> None:
    entry = MANIFEST[name]
    path = FIXTURES / entry["file"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"], "fixture changed since the manifest was written"
    assert len(data) < 2 * 2**20
    sd = torch.load(path, weights_only=True)
    assert all(type(v) is torch.Tensor for v in sd.values()), "a plain state_dict"
    assert {v.dtype for k, v in sd.items() if not k.endswith("num_batches_tracked")} == {torch.float32}
    # BatchNorm statistics are running averages of training, not the defaults (mean 0, var 1)
    for key in (k for k in sd if k.endswith("running_var")):
        mean = sd[key.replace("running_var", "running_mean")]
        assert not torch.equal(sd[key], torch.ones_like(sd[key])) and not torch.equal(mean, torch.zeros_like(mean)), key
        assert int(sd[key.replace("running_var", "num_batches_tracked")]) > 0, key


# ----------------------------------------------------------------- on the 10k test images
def test_detected_as_recorded(trained: Trained) -> None:
    entry, model = trained.entry, trained.model
    assert model.arch == entry["format"]
    assert json.loads(json.dumps(model.config)) == entry["config"]
    assert list(model.input_size) == entry["input_size"] == [entry["in_chans"], 32, 32]


def test_train_form_reproduces_recorded_top1(trained: Trained) -> None:
    assert len(trained.labels) == trained.entry["test_images"] == 10_000
    correct = int((trained.logits.argmax(1) == trained.labels).sum())
    # to the image on the machine that recorded it; another CPU's GEMM kernels sum in another order,
    # which can flip an image whose top two logits tie to float32 rounding: allow two of 10k
    assert abs(correct - trained.entry["test_correct"]) <= TOP1_SLACK, (
        f"{correct} of 10000 correct, recorded {trained.entry['test_correct']}")


def test_deploy_form_matches_train_form(trained: Trained, deploy: tuple[nn.Module, Tensor]) -> None:
    model, logits = deploy
    assert model.reparam_report.folded, "nothing was re-parameterized"
    assert_equivalent(compare(logits, trained.logits), "deploy form vs train form")


def _convert(trained: Trained, tmp_path: Path, to: str) -> Path:
    """``vismlp-deploy convert FIXTURE --to TO --input-size 32``: the command a user runs.

    Exit 0, so every stage proof passed.
    """
    from vismlp_deploy.cli import main

    out = tmp_path / (trained.entry["file"].removesuffix(".pth") + (".deploy.pt" if to == "pt" else ".onnx"))
    assert main(["convert", str(FIXTURES / trained.entry["file"]), "--to", to, "--input-size", "32", "--out", str(out),
                 "-q"]) == 0
    return out


def test_cli_convert_to_pt_keeps_the_predictions(trained: Trained, tmp_path: Path) -> None:
    from vismlp_deploy.export.torch_artifact import load_deploy

    model = load_deploy(_convert(trained, tmp_path, "pt"))
    logits = run_batched(model, trained.images, trained.entry["eval_batch"])
    assert_equivalent(compare(logits, trained.logits), "convert --to pt vs train form")


def test_cli_convert_to_onnx_keeps_the_predictions(trained: Trained, tmp_path: Path) -> None:
    runner = OrtRunner(_convert(trained, tmp_path, "onnx"), threads=2)
    logits = run_batched(runner.run, trained.images, trained.entry["eval_batch"])
    assert_equivalent(compare(logits, trained.logits), "convert --to onnx, ONNX Runtime vs train form")
