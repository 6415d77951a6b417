"""Bad input: exit 2, one readable line on stderr, no traceback, nothing written or overwritten.

Every case runs the CLI in-process (``vismlp_deploy.cli.main``) on a file in an otherwise
empty directory and checks the return code, the message and the directory afterwards.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vismlp_deploy.cli import main
from vismlp_deploy.models.registry import FORMATS, formats

GOLDENS = Path(__file__).parent / "conformance"


def _golden_sd(name: str) -> dict:
    case = torch.load(GOLDENS / f"{name}.pt", weights_only=True)
    if case["format"] not in formats():
        pytest.skip(f"format {case['format']} not registered yet")
    return dict(case["state_dict"])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _fails(cmd: list[str], d: Path, capsys, match: str) -> str:
    """Run ``cmd``; assert exit 2, one stderr line matching ``match``, ``d`` untouched."""
    before = _snapshot(d)
    assert main(cmd) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "Traceback" not in err
    assert __import__("re").search(match, err), err
    assert captured.out == ""
    assert _snapshot(d) == before, "the output directory changed"
    return err


def _convert(path: Path, *extra: str) -> list[str]:
    return ["convert", str(path), "--to", "pt", "--out", str(path.parent / "out.deploy.pt"), *extra]


# --------------------------------------------------------------------------- unreadable files

def _truncated(p: Path) -> None:
    torch.save({"w": torch.randn(256, 256)}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _truncated_legacy(p: Path) -> None:
    torch.save({"w": torch.randn(256, 256)}, p, _use_new_zipfile_serialization=False)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _corrupt_zip(p: Path) -> None:
    torch.save({"w": torch.randn(64, 64)}, p)
    data = bytearray(p.read_bytes())
    data[40:200] = bytes(160)  # zero the first member's header and pickle
    p.write_bytes(bytes(data))


def _truncated_safetensors(p: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(p))
    p.write_bytes(p.read_bytes()[:-100])


FILES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "empty": ("ckpt.pth", lambda p: p.write_bytes(b""), "is empty"),
    "truncated": ("ckpt.pth", _truncated, "truncated or corrupt"),
    "truncated-legacy": ("ckpt.pth", _truncated_legacy, "truncated or corrupt"),
    "corrupt-zip": ("ckpt.pth", _corrupt_zip, "truncated or corrupt"),
    "truncated-safetensors": ("ckpt.safetensors", _truncated_safetensors, "truncated"),
    "text": ("ckpt.pth", lambda p: p.write_text("epoch,loss\n1,0.5\n"), "not a checkpoint: it looks like a text file"),
    "png": ("ckpt.pth", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "PNG image"),
    "not-a-dict": ("ckpt.pth", lambda p: torch.save([torch.ones(2)], p), "holds a list"),
    "no-tensors": ("ckpt.pth", lambda p: torch.save({"epoch": 3, "best": 0.5}, p), "no state_dict found.*epoch, best"),
}


@pytest.mark.parametrize("case", list(FILES))
def test_unreadable_file(case: str, tmp_path: Path, capsys) -> None:
    name, make, match = FILES[case]
    path = tmp_path / name
    make(path)
    _fails(_convert(path), tmp_path, capsys, match)
    _fails(["inspect", str(path)], tmp_path, capsys, match)


def test_truncated_checkpoint_leaves_existing_outputs_alone(tmp_path: Path, capsys) -> None:
    """The bar: exit 2, and an output already there (with --force) is neither replaced nor removed."""
    path = tmp_path / "ckpt.pth"
    _truncated(path)
    (tmp_path / "out.deploy.pt").write_bytes(b"previous result")
    _fails(_convert(path, "--force"), tmp_path, capsys, "truncated or corrupt")


def test_missing_file_and_directory(tmp_path: Path, capsys) -> None:
    _fails(_convert(tmp_path / "nope.pth"), tmp_path, capsys, "no such file")
    (tmp_path / "adir").mkdir()
    _fails(_convert(tmp_path / "adir"), tmp_path, capsys, "not a file")


# --------------------------------------------------------------------------- readable, but wrong

def _save(tmp_path: Path, sd: dict) -> Path:
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    return path


def test_nan_weights_are_named(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("mixer_timm")
    sd["blocks.1.mlp_channels.fc2.weight"] = sd["blocks.1.mlp_channels.fc2.weight"].clone()
    sd["blocks.1.mlp_channels.fc2.weight"][0, :3] = float("nan")
    sd["head.bias"] = torch.full_like(sd["head.bias"], float("inf"))
    _fails(_convert(_save(tmp_path, sd)), tmp_path, capsys,
           r"NaN/Inf weights in 2 tensors: blocks\.1\.mlp_channels\.fc2\.weight \(3 of")


def test_missing_key_is_listed(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("resmlp_timm")
    del sd["blocks.1.ls2"]
    path = _save(tmp_path, sd)
    _fails(_convert(path), tmp_path, capsys, r"missing keys \(1\): blocks\.1\.ls2")
    _fails(_convert(path, "--arch", "timm-resmlp"), tmp_path, capsys,
           r"does not fit timm-resmlp.*missing keys \(1\): blocks\.1\.ls2")


def test_unexpected_key_is_listed_never_dropped(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("resmlp_timm")
    sd["blocks.0.extra_adapter.weight"] = torch.randn(4, 4)
    _fails(_convert(_save(tmp_path, sd), "--arch", "timm-resmlp"), tmp_path, capsys,
           r"unexpected keys \(1\): blocks\.0\.extra_adapter\.weight")


def test_shape_mismatch_names_key_expected_and_got(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("resmlp_timm")
    sd["blocks.0.mlp_channels.fc2.weight"] = torch.randn(32, 100)
    _fails(_convert(_save(tmp_path, sd)), tmp_path, capsys,
           r"shape mismatch at blocks\.0\.mlp_channels\.fc2\.weight: "
           r"model expects \(32, 128\), checkpoint has \(32, 100\)")


def test_wrong_arch_is_refused_with_the_key_lists(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("mixer_timm")
    if "timm-resmlp" not in FORMATS:
        pytest.skip("timm-resmlp not registered yet")
    _fails(_convert(_save(tmp_path, sd), "--arch", "timm-resmlp"), tmp_path, capsys, "timm-resmlp")


def test_ambiguous_detection_lists_the_candidates(tmp_path: Path, capsys, monkeypatch) -> None:
    sd = _golden_sd("mixer_timm")
    twin = dataclasses.replace(FORMATS["timm-mixer"], name="twin-mixer")
    monkeypatch.setitem(FORMATS, "twin-mixer", twin)
    _fails(_convert(_save(tmp_path, sd)), tmp_path, capsys, r"ambiguous.*timm-mixer.*twin-mixer.*--arch")


def test_unknown_layout(tmp_path: Path, capsys) -> None:
    path = _save(tmp_path, {"encoder.layer.0.weight": torch.ones(2, 2)})
    _fails(_convert(path), tmp_path, capsys, "no supported key layout.*encoder.layer.0.weight")


def test_bad_arch_and_config_arguments(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("mixer_timm")
    path = _save(tmp_path, sd)
    _fails(_convert(path, "--arch", "no-such-format"), tmp_path, capsys, "unknown architecture/format 'no-such-format'")
    _fails(_convert(path, "--config", "{not json"), tmp_path, capsys, "--config: neither a JSON file nor valid JSON")
    _fails(_convert(path, "--config", json.dumps({"embed_dim": 64})), tmp_path, capsys, "shape mismatch at")


def test_existing_output_is_not_overwritten(tmp_path: Path, capsys) -> None:
    sd = _golden_sd("mixer_timm")
    path = _save(tmp_path, sd)
    (tmp_path / "out.deploy.pt").write_bytes(b"keep me")
    _fails(_convert(path), tmp_path, capsys, "exists; pass --force")


def test_deploy_artifact_is_not_converted_to_pt_again(tmp_path: Path, capsys) -> None:
    src = _save(tmp_path, _golden_sd("mixer_timm"))
    assert main(_convert(src)) == 0
    capsys.readouterr()
    path = tmp_path / "out.deploy.pt"
    _fails(["convert", str(path), "--to", "pt", "--out", str(tmp_path / "again.deploy.pt")], tmp_path, capsys,
           "already a deploy artifact")


def test_broken_deploy_artifact(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.deploy.pt"
    meta = {"arch": "timm-mixer", "config": {}, "form": "deploy", "input_size": [3, 224, 224]}
    torch.save({"vismlp_deploy": meta, "state_dict": {"w": torch.ones(1)}}, path)
    _fails(["convert", str(path), "--to", "onnx"], tmp_path, capsys, "do not fit the rebuilt deploy structure")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path, capsys, where: str) -> None:
    cmd = ["convert", str(tmp_path / "nope.pth")]
    assert main(["--debug", *cmd] if where == "before" else [*cmd, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UserError" in err and err.strip().splitlines()[-1].startswith("error:")
