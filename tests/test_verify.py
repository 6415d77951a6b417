"""verify: statistics, real images, runner comparison, injected divergence, bisection, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_model import tiny, tiny_checkpoint

from vismlp_deploy.cli import main
from vismlp_deploy.runtime.source import from_train
from vismlp_deploy.verification.bisect import OUTPUT, bisect, boundary_names
from vismlp_deploy.verification.compare import parse_runner, verify
from vismlp_deploy.verification.images import IMAGENET_MEAN, IMAGENET_STD, folder_images, preprocess
from vismlp_deploy.verification.stats import compare


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_resmlp.pth"
    tiny_checkpoint(path)
    return path


def test_min_tolerance_is_the_smallest_passing_tolerance():
    ref = torch.randn(4, 10)
    y = ref + 1e-3 * torch.randn(4, 10)
    s = compare(y, ref)
    assert s.min_tolerance > 0
    assert s.passed(s.min_tolerance) and not s.passed(s.min_tolerance * 0.999)
    assert s.to_dict()["min_tolerance"] == s.min_tolerance


def test_preprocess_resizes_crops_and_normalizes(tmp_path):
    mean_rgb = tuple(round(255 * m) for m in IMAGENET_MEAN)
    Image.new("RGB", (40, 30), mean_rgb).save(tmp_path / "a.png")
    half = np.zeros((50, 70, 3), dtype=np.uint8)
    half[:, 35:] = 255  # black left half, white right half
    Image.fromarray(half).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    imgs = folder_images(tmp_path)
    x = preprocess(imgs, (3, 16, 16))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    # a flat image of the mean colour normalizes to ~0 (within one 8-bit step / std)
    assert x[0].abs().max() <= 0.5 / 255 / min(IMAGENET_STD) + 1e-6
    # centre crop keeps the edge in the middle: black -> (0 - mean) / std, white -> (1 - mean) / std
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1)
    white = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1)
    torch.testing.assert_close(x[1, :, :, 0], black.expand(3, 16), atol=0.05, rtol=0)
    torch.testing.assert_close(x[1, :, :, -1], white.expand(3, 16), atol=0.05, rtol=0)


def test_parse_runner():
    assert parse_runner("train") == ("torch", "train")
    assert parse_runner("onnxruntime") == ("onnxruntime", "deploy")
    assert parse_runner("torch-compile:train") == ("torch-compile", "train")
    assert parse_runner("onnxruntime:train") == ("onnxruntime", "train")
    with pytest.raises(Exception, match="unknown runner"):
        parse_runner("tflite")


def test_verify_train_deploy_onnxruntime_on_random_and_real_images():
    res = verify(tiny(), ("train", "deploy", "onnxruntime"), batch=4)
    assert {(c.candidate, c.inputs) for c in res.comparisons} == {
        ("deploy", "random"), ("onnxruntime", "random"), ("deploy", "images"), ("onnxruntime", "images")}
    assert res.passed, [c.to_dict() for c in res.comparisons]
    for c in res.comparisons:
        assert c.stats.rel <= 1e-5 and c.stats.top1 == 1.0 and c.stats.cosine > 0.999999


def _tampered(path: str):
    """Both forms of the tiny model, with the deploy form's ``path`` bias shifted."""
    src = from_train(tiny(), "tiny")
    with torch.no_grad():
        dict(src.deploy.named_modules())[path].bias.add_(0.3)
    return src


def test_verify_detects_an_injected_divergence():
    res = verify(_tampered("blocks.1.fc2"), ("train", "deploy"), batch=4, images=None)
    (c,) = res.comparisons
    assert not res.passed and not c.passed and c.stats.rel > 1e-3


def test_boundaries_expand_containers_but_not_convbn():
    assert boundary_names(tiny()) == ["stem", "blocks.0", "blocks.1", "blocks.2", "pool", "head"]


@pytest.mark.parametrize("path, culprit", [("blocks.1.fc2", "blocks.1"), ("head", "head"), ("stem", "stem")])
def test_bisect_names_the_first_divergent_module(path, culprit):
    src = _tampered(path)
    res = bisect(src.train, src.deploy, torch.randn(4, 3, 16, 16))
    assert res.first_divergent == culprit
    status = {b.name: b.diverged for b in res.boundaries}
    assert status[OUTPUT]
    names = [b.name for b in res.boundaries]
    assert not any(status[n] for n in names[:names.index(culprit)])


def test_bisect_clean_forms_and_fold_across_a_boundary():
    src = from_train(tiny(), "tiny")
    src.deploy.pool = torch.nn.Identity()  # as if pooling had been folded into the head: not comparable
    src.deploy.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), src.train.head)
    src.deploy.forward = lambda x: src.deploy.head(src.deploy.blocks(src.deploy.stem(x)))
    res = bisect(src.train, src.deploy, torch.randn(4, 3, 16, 16))
    assert res.first_divergent is None
    pool = next(b for b in res.boundaries if b.name == "pool")
    assert pool.stats is None and "folded" in pool.note


def test_cli_verify_json_with_bisect(ckpt, capsys):
    rc = main(["verify", str(ckpt), "--images", "none", "--proof-batch", "2", "--bisect", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["passed"] and doc["bisect"]["first_divergent"] is None
    assert {c["candidate"] for c in doc["comparisons"]} == {"deploy", "onnxruntime"}
    assert all("min_tolerance" in c and "top5" in c for c in doc["comparisons"])


def test_cli_verify_fails_with_exit_1_and_bad_runner_exits_2(ckpt, capsys):
    assert main(["verify", str(ckpt), "--images", "none", "--runners", "train,deploy", "--tolerance", "1e-30"]) == 1
    assert "verification failed" in capsys.readouterr().err
    assert main(["verify", str(ckpt), "--runners", "train"]) == 2
    assert main(["verify", str(ckpt), "--runners", "train,tflite"]) == 2


def test_cli_verify_saves_and_reloads_input_sets(ckpt, tmp_path, capsys):
    """--save-inputs then --load-inputs runs on exactly the same arrays; --save-outputs keeps every runner's."""
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    assert main(["verify", str(ckpt), "--images", "none", "--proof-batch", "3", "--save-inputs", str(inputs),
                 "--save-outputs", str(outputs), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["verify", str(ckpt), "--load-inputs", str(inputs), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [c["max_abs"] for c in again["comparisons"]] == [c["max_abs"] for c in first["comparisons"]]
    with np.load(inputs) as f:
        assert set(f.files) == {"random"} and f["random"].shape == (3, 3, 32, 32)
    with np.load(outputs) as f:
        assert set(f.files) == {"train/random", "deploy/random", "onnxruntime/random"}
        assert np.abs(f["deploy/random"] - f["train/random"]).max() <= 1e-5 * np.abs(f["train/random"]).max()
    assert main(["verify", str(ckpt), "--load-inputs", str(tmp_path / "missing.npz")]) == 2
