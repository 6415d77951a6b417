"""Hostile and careless command lines: exit 2, one line, no traceback, nothing written, nothing overwritten.

Every case runs the CLI in-process on a directory holding a valid checkpoint, an ONNX export of
it and an existing output; afterwards every file there must be byte-for-byte what it was, with
no new file (temporary ones included). The valid controls at the end must still work.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_model import tiny_checkpoint

from vismlp_deploy.cli import main
from vismlp_deploy.errors import UserError

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    tiny_checkpoint(d / "m.pth")
    assert main(["convert", str(d / "m.pth"), "--to", "onnx", "-q"]) == 0
    (d / "existing.csv").write_text("keep me\n")
    (d / "existing.png").write_bytes(b"keep me")
    (d / "adir").mkdir()
    (d / "zoo").mkdir()
    (d / "zoo" / "benchmarks.md").write_text("keep me\n")
    (d / "corrupt.onnx").write_bytes(os.urandom(3000))
    (d / "truncated.onnx").write_bytes((d / "m.onnx").read_bytes()[:5000])
    (d / "text.onnx").write_text("not a model\n")
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# (id, argv with {d} for the workspace, what the one error line must say)
CASES = [
    # option values, refused at parse time or before any work
    ("proof-batch-0", ["convert", "{d}/m.pth", "--proof-batch", "0", "--out", "{d}/o.pt"], "proof-batch"),
    ("proof-batch-negative", ["convert", "{d}/m.pth", "--proof-batch", "-3", "--out", "{d}/o.pt"], "proof-batch"),
    ("proof-batch-huge", ["convert", "{d}/m.pth", "--proof-batch", "100000", "--out", "{d}/o.pt"], "from 1 to 4096"),
    ("static-batch-huge", ["convert", "{d}/m.pth", "--to", "onnx", "--static-batch", "100000", "--out", "{d}/o.onnx"],
     "static-batch"),
    ("static-batch-0", ["convert", "{d}/m.pth", "--to", "onnx", "--static-batch", "0", "--out", "{d}/o.onnx"],
     "static-batch"),
    ("seed-huge", ["convert", "{d}/m.pth", "--seed", str(10**23), "--out", "{d}/o.pt"], "seed"),
    ("verify-proof-batch-0", ["verify", "{d}/m.pth", "--proof-batch", "0"], "proof-batch"),
    ("device-banana", ["verify", "{d}/m.pth", "--device", "banana"], "cpu, cuda or cuda:N"),
    ("threads-negative", ["bench", "{d}/m.pth", "--threads", "-2"], "positive integer"),
    ("threads-0", ["bench", "{d}/m.pth", "--threads", "0"], "positive integer"),
    ("batch-sizes-huge", ["bench", "{d}/m.pth", "--batch-sizes", "100000000"], "batch-sizes"),
    ("repeats-negative", ["bench", "{d}/m.pth", "--repeats", "-5"], "repeats"),
    ("max-time-negative", ["bench", "{d}/m.pth", "--max-time", "-1"], "max-time"),
    ("warmup-negative", ["bench", "{d}/m.pth", "--warmup", "-3"], "warmup"),
    ("unknown-precision", ["bench", "{d}/m.pth", "--precision", "fp8"], "unknown precision 'fp8'"),
    ("unknown-backend", ["bench", "{d}/m.pth", "--backends", "tflite"], "unknown backend 'tflite'"),
    ("set-unknown-key", ["zoo", "--init", "resmlp_12", "--set", "bogus=1", "--out", "{d}/o.pth"],
     "no argument 'bogus'"),
    ("set-no-value", ["zoo", "--init", "resmlp_12", "--set", "num_blocks", "--out", "{d}/o.pth"], "KEY=VALUE"),
    ("set-negative", ["zoo", "--init", "resmlp_12", "--set", "num_blocks=-1", "--out", "{d}/o.pth"], "must be > 0"),
    ("set-wrong-type", ["zoo", "--init", "resmlp_12", "--set", "num_blocks=\"x\"", "--out", "{d}/o.pth"],
     "expected a int"),
    ("config-zero-size", ["convert", "resmlp_12", "--config", '{"img_size": 0}', "--out", "{d}/o.pt"], ">= 1"),
    ("config-bad-size", ["convert", "resmlp_12", "--config", '{"img_size": 8}', "--out", "{d}/o.pt"], "multiple of"),
    ("tolerance-negative", ["verify", "{d}/m.pth", "--tolerance", "-1"], "tolerance"),
    ("tolerance-nan", ["verify", "{d}/m.pth", "--tolerance", "nan"], "tolerance"),
    ("atol-inf", ["verify", "{d}/m.pth", "--atol", "inf"], "atol"),
    ("std-zero", ["verify", "{d}/m.pth", "--std", "0,0,0"], "std"),
    ("dynamic-batch-garbage",
     ["convert", "{d}/m.pth", "--to", "onnx", "--dynamic-batch", "a:b:c", "--out", "{d}/o.onnx"], "a:b:c"),
    ("input-size-garbage", ["convert", "{d}/m.pth", "--input-size", "big", "--out", "{d}/o.pt"], "H or HxW"),
    ("input-size-unfit", ["convert", "{d}/m.pth", "--input-size", "64", "--out", "{d}/o.pt"], "fix its input size"),
    ("max-memory-garbage", ["convert", "{d}/m.pth", "--max-memory", "lots", "--out", "{d}/o.pt"], "8G"),
    ("int8-without-calib", ["convert", "{d}/m.pth", "--to", "onnx", "--precision", "int8", "--out", "{d}/o.onnx"],
     "--calib"),
    ("onnx-fp16", ["convert", "{d}/m.pth", "--to", "onnx", "--precision", "fp16", "--out", "{d}/o.onnx"], "--to trt"),
    # outputs, checked before any work
    ("out-is-a-directory", ["convert", "{d}/m.pth", "--out", "{d}/adir"], "is a directory"),
    ("out-is-the-input", ["convert", "{d}/m.pth", "--out", "{d}/m.pth", "--force"], "is the input"),
    ("out-dir-missing", ["convert", "{d}/m.pth", "--out", "{d}/nowhere/o.pt"], "does not exist"),
    ("out-name-too-long", ["convert", "{d}/m.pth", "--out", "{d}/" + "x" * 300 + ".pt"], "too long"),
    ("engine-is-the-onnx", ["convert", "{d}/m.pth", "--to", "trt", "--out", "{d}/same.onnx"], "overwrite the ONNX"),
    ("out-with-many-models", ["convert", "resmlp_12", "{d}/m.pth", "--out", "{d}/o.pt"], "--out-dir"),
    ("csv-exists", ["bench", "{d}/m.pth", "--csv", "{d}/existing.csv"], "--force"),
    ("png-exists", ["bench", "{d}/m.pth", "--png", "{d}/existing.png"], "--force"),
    ("csv-missing-dir", ["bench", "{d}/m.pth", "--csv", "{d}/nowhere/r.csv"], "does not exist"),
    ("csv-onto-dir", ["bench", "{d}/m.pth", "--csv", "{d}/adir"], "is a directory"),
    ("zoo-report-exists", ["bench-zoo", "--models", "mixer_s32", "--out-dir", "{d}/zoo"], "benchmarks.md exists"),
    ("save-inputs-exists", ["verify", "{d}/m.pth", "--save-inputs", "{d}/existing.csv"], "--force"),
    # files that are not what they claim
    ("corrupt-onnx-verify", ["verify", "{d}/corrupt.onnx", "--against", "{d}/m.pth"], "onnx"),
    ("truncated-onnx-bench", ["bench", "{d}/truncated.onnx"], "onnx"),
    ("text-onnx-inspect", ["inspect", "{d}/text.onnx"], "onnx"),
    ("onnx-alone", ["verify", "{d}/m.onnx"], "--against"),
    ("onnx-to-pt", ["convert", "{d}/m.onnx", "--to", "pt", "--out", "{d}/o.pt"], "already an ONNX model"),
    ("markup-in-name", ["inspect", "{d}/a[red]b.pth"], r"a\[red\]b\.pth: no such file"),
    ("emoji-in-name", ["inspect", "{d}/:smile:.pth"], r":smile:\.pth: no such file"),
]
if not CUDA:
    CASES.append(("device-cuda-on-cpu", ["verify", "{d}/m.pth", "--device", "cuda"], "is not usable here"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(case, workspace: Path, capsys) -> None:
    _, argv, match = case
    argv = [a.replace("{d}", str(workspace)) for a in argv]
    before = _snapshot(workspace)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert __import__("re").search(match, lines[0]), lines[0]
    assert out == ""
    assert _snapshot(workspace) == before, "files were written or changed"


def test_library_warnings_do_not_leak_around_the_error(workspace: Path, capsys, monkeypatch) -> None:
    import vismlp_deploy.cli.model_args as model_args

    def noisy(*a, **k):
        # what torch says while loading some files
        warnings.warn("TypedStorage is deprecated", UserWarning, stacklevel=2)
        raise UserError("the real problem")

    monkeypatch.setattr(model_args, "load_source", noisy)
    assert main(["inspect", str(workspace / "m.pth")]) == 2
    assert capsys.readouterr().err.strip() == "error: the real problem"


def test_internal_errors_exit_3_with_one_line(workspace: Path, capsys, monkeypatch) -> None:
    import vismlp_deploy.cli.model_args as model_args

    monkeypatch.setattr(model_args, "load_source", lambda *a, **k: {}["missing"])
    assert main(["inspect", str(workspace / "m.pth")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("internal error: KeyError") and "--debug" in err and len(err.splitlines()) == 1


def test_new_files_respect_the_umask(workspace: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert main(["convert", str(workspace / "m.pth"), "--to", "pt",
                     "--out", str(tmp_path / "o.deploy.pt"), "-q"]) == 0
        (tmp_path / "keep.deploy.pt").write_bytes(b"x")
        os.chmod(tmp_path / "keep.deploy.pt", 0o644)
        assert main(["convert", str(workspace / "m.pth"), "--out", str(tmp_path / "keep.deploy.pt"),
                     "--force", "-q"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.deploy.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "keep.deploy.pt").stat().st_mode & 0o777 == 0o640


def test_valid_controls_still_work(workspace: Path, tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(workspace / "m.onnx"), "--json"]) == 0
    assert main(["convert", str(workspace / "m.pth"), str(workspace / "m.pth"), "--out-dir", str(tmp_path), "-q"]) == 0
    assert main(["verify", str(workspace / "m.onnx"), "--against", str(workspace / "m.pth"), "--images", "none",
                 "--save-outputs", str(tmp_path / "out.npz"), "--json"]) == 0
    assert (tmp_path / "m.deploy.pt").is_file() and (tmp_path / "out.npz").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".vismlp-")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_terminated_convert_leaves_no_partial_output(tmp_path: Path, sig) -> None:
    """Killed while exporting (the ONNX export of a named config takes seconds): no partial file remains."""
    proc = subprocess.Popen([sys.executable, "-m", "vismlp_deploy", "convert", "mixer_s32", "--to", "onnx",
                             "--out", str(tmp_path / "m.onnx")], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(p.name.startswith(".vismlp-") for p in tmp_path.iterdir()):
        time.sleep(0.05)  # the export's temporary directory appears beside the output
    assert proc.poll() is None, "convert finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "terminated by signal" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
