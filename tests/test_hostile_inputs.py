"""Hostile and careless input at the library layer: every case raises UserError with one line naming the
problem, writes nothing and changes nothing (issue 11).

Each case writes its bad input into an otherwise empty directory (also the working directory), calls the
library (``read_checkpoint``, ``load_checkpoint``, ``load_deploy``, ``create_model``, ``load_source``,
``OrtRunner``) and checks the exception, its message and the directory afterwards. The memory-bound cases
run in a subprocess whose peak RSS must stay under 1 GB (and whose data segment is capped, so that a
regression fails there instead of swapping the machine).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from vismlp_deploy import create_model, load_checkpoint, reparameterize
from vismlp_deploy.checkpoint.io import META_KEY, read_checkpoint
from vismlp_deploy.errors import UserError
from vismlp_deploy.export.torch_artifact import artifact_dict, load_deploy
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.runtime.source import load_source

TINY_RESMLP = {"num_blocks": 1, "embed_dim": 16, "img_size": 32, "num_classes": 5}
TINY_CONVMIXER = {"dim": 16, "depth": 1, "kernel_size": 3, "patch_size": 8, "num_classes": 5}  # has BatchNorm
TINY_ASMLP = {"embed_dim": 8, "depths": [1, 1, 1, 1], "img_size": 32, "num_classes": 5}
ASMLP_32 = {**TINY_ASMLP, "embed_dim": 32}
GiB = 1 << 30


def _tiny(name: str, **config) -> torch.nn.Module:
    return randomize_(create_model(name, **config), seed=0).eval()


def _train_file(path: Path, model: torch.nn.Module, edit: Callable[[dict], None] | None = None) -> None:
    """``model`` as `zoo --init` writes it (metadata + state_dict), after ``edit`` on that dict."""
    payload = artifact_dict(model, "train")
    if edit:
        edit(payload)
    torch.save(payload, path)


def _deploy_file(path: Path, edit: Callable[[dict], None]) -> None:
    train = _tiny("resmlp_12", **TINY_RESMLP)
    deploy = reparameterize(train)
    deploy.arch, deploy.config, deploy.input_size = train.arch, train.config, train.input_size
    payload = artifact_dict(deploy, "deploy")
    edit(payload)
    torch.save(payload, path)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- makers of bad checkpoints

class _RunsCode:
    """Unpickling this calls os.system: what a malicious legacy pickle does."""

    def __reduce__(self):
        return (os.system, ("true",))


class _Touch:
    """Unpickling this creates ``marker``: shows whether the code of a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _stale_crc(p: Path) -> None:
    torch.save({"w": torch.randn(1000)}, p)
    with zipfile.ZipFile(p) as z:
        member = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data = bytearray(p.read_bytes())
    data[member.header_offset + 200] ^= 0xFF  # inside the storage bytes; the zip's CRC still says the old value
    p.write_bytes(bytes(data))


def _legacy_code(p: Path) -> None:
    torch.save({"w": torch.ones(2), "x": _RunsCode()}, p, _use_new_zipfile_serialization=False)


def _raw_pickle_code(p: Path) -> None:
    with open(p, "wb") as f:
        pickle.dump(_RunsCode(), f, protocol=2)


def _save(obj_fn: Callable[[], dict]) -> Callable[[Path], None]:
    return lambda p: torch.save(obj_fn(), p)


def _weights_edit(key_filter: Callable[[str], bool], change: Callable[[torch.Tensor], torch.Tensor]):
    def edit(payload: dict) -> None:
        sd = payload["state_dict"]
        key = next(k for k in sd if key_filter(k))
        sd[key] = change(sd[key])
    return edit


def _meta_edit(**changes) -> Callable[[dict], None]:
    return lambda payload: payload[META_KEY].update(changes)


def _resmlp_file(edit=None) -> Callable[[Path], None]:
    return lambda p: _train_file(p, _tiny("resmlp_12", **TINY_RESMLP), edit)


def _convmixer_file(edit=None) -> Callable[[Path], None]:
    return lambda p: _train_file(p, _tiny("convmixer_768_32", **TINY_CONVMIXER), edit)


def _is_weight(k: str) -> bool:
    return k.endswith("weight")


# name: (file name, maker, call on the path, message pattern)
CHECKPOINTS: dict[str, tuple[str, Callable[[Path], None], Callable[[Path], object], str]] = {
    "stale-zip-crc": ("ckpt.pth", _stale_crc, read_checkpoint, r"CRC"),
    "legacy-pickle-runs-code": ("ckpt.pth", _legacy_code, read_checkpoint,
                                r"can run code.*posix\.system.*--trust-pickle only if you trust its source$"),
    "raw-pickle-runs-code": ("ckpt.pth", _raw_pickle_code, read_checkpoint,
                             r"can run code.*posix\.system.*--trust-pickle only if you trust its source$"),
    "stride-0-view": ("ckpt.pth", _save(lambda: {"w": torch.zeros(1).expand(30000, 30000), "b": torch.ones(3)}),
                      read_checkpoint, r"stride-0.*w \(30000, 30000\)"),
    "sparse": ("ckpt.pth", _save(lambda: {"w": torch.eye(4).to_sparse(), "b": torch.ones(3)}),
               read_checkpoint, r"sparse.*\bw\b"),
    "meta-device": ("ckpt.pth", _save(lambda: {"w": torch.empty(4, 4, device="meta"), "b": torch.ones(3)}),
                    read_checkpoint, r"meta-device.*\bw\b"),
    "quantized": ("ckpt.pth", _save(lambda: {"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8),
                                             "b": torch.ones(3)}), read_checkpoint, r"quantized.*\bw\b"),
    "int32-weight": ("ckpt.pth", _resmlp_file(_weights_edit(_is_weight, lambda t: (t * 100).to(torch.int32))),
                     load_checkpoint, r"wrong kind.*weight \(int32, model has float\)"),
    "complex-weight": ("ckpt.pth", _resmlp_file(_weights_edit(_is_weight, lambda t: t.to(torch.complex64))),
                       load_checkpoint, r"wrong kind.*weight \(complex64, model has float\)"),
    "negative-running-var": ("ckpt.pth",
                             _convmixer_file(_weights_edit(lambda k: k.endswith("running_var"), lambda t: -t)),
                             load_checkpoint, r"negative BatchNorm variances.*running_var"),
    "config-argument-not-a-dict": ("ckpt.pth", _resmlp_file(), lambda p: load_checkpoint(p, config="embed_dim=16"),
                                   r"config must be a dict"),
    "meta-config-string": ("ckpt.pth", _resmlp_file(_meta_edit(config="embed_dim=16")), load_checkpoint,
                           r"metadata.*config is a str"),
    "meta-arch-int": ("ckpt.pth", _resmlp_file(_meta_edit(arch=7)), load_checkpoint, r"metadata.*arch is a int"),
    "meta-input-size": ("ckpt.pth", _resmlp_file(_meta_edit(input_size=[3, -1, 32])), load_checkpoint,
                        r"metadata.*input_size is \[3, -1, 32\]"),
    "meta-not-a-dict": ("ckpt.pth", _resmlp_file(lambda pl: pl.update({META_KEY: "resmlp"})), load_checkpoint,
                        r"metadata.*it is a str"),
    # AS-MLP weights fit any image size: only a forward finds that 0x0 cannot work
    "meta-config-cannot-run": ("ckpt.pth", lambda p: _train_file(p, _tiny("asmlp_t", **TINY_ASMLP), _meta_edit(
        config={**create_model("asmlp_t", **TINY_ASMLP).config, "img_size": 0})), load_checkpoint,
        r"input size 3x0x0; every dimension must be >= 1"),
    "deploy-without-config": ("m.deploy.pt", lambda p: _deploy_file(p, lambda pl: pl[META_KEY].pop("config")),
                              load_deploy, r"lacks config"),
    "deploy-config-string": ("m.deploy.pt", lambda p: _deploy_file(p, lambda pl: pl[META_KEY].update(config="x")),
                             load_deploy, r"config is a str"),
    "deploy-int-weights": ("m.deploy.pt",
                           lambda p: _deploy_file(p, _weights_edit(_is_weight, lambda t: t.to(torch.int64))),
                           load_deploy, r"wrong kind.*int64"),
}


def _refused(call: Callable[[], object], d: Path, match: str) -> str:
    """``call()`` raises UserError with one line matching ``match``; ``d`` is unchanged afterwards."""
    before = _snapshot(d)
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert re.search(match, message), message
    assert _snapshot(d) == before, "files were written or changed"
    return message


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a stray relative write would show up in the snapshot too
    return tmp_path


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_bad_checkpoint_is_refused(case: str, workdir: Path) -> None:
    name, make, call, match = CHECKPOINTS[case]
    path = workdir / name
    make(path)
    _refused(lambda: call(path), workdir, match)


def test_refused_code_pickle_opens_with_trust(workdir: Path) -> None:
    """A legacy pickle that runs code is refused as needing code execution, and trust_pickle opens it."""
    marker = workdir / "RAN"
    path = workdir / "ckpt.pth"
    torch.save({"w": torch.ones(2), "x": _Touch(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="can run code.*imports io.open"):
        read_checkpoint(path)
    assert not marker.exists()
    ckpt = read_checkpoint(path, trust_pickle=True)
    assert marker.exists() and set(ckpt.state_dict) == {"w"} and "torch legacy" in ckpt.container
    with open(path, "wb") as f:  # a raw pickle.dump file: no torch header, opened by pickle itself
        pickle.dump({"w": torch.ones(2), "x": _Touch(marker)}, f, protocol=4)
    assert read_checkpoint(path, trust_pickle=True).container.startswith("raw pickle")


def test_misnamed_files_are_read_by_content(workdir: Path) -> None:
    """A torch zip named .safetensors and a safetensors file named .pth load, with a note saying what they are."""
    sd = {"w": torch.randn(3, 3)}
    zip_as_st = workdir / "a.safetensors"
    torch.save(sd, zip_as_st)
    ckpt = read_checkpoint(zip_as_st)
    assert torch.equal(ckpt.state_dict["w"], sd["w"]) and ckpt.container == "torch zip"
    assert any("torch zip file although its name ends in '.safetensors'" in n for n in ckpt.notes), ckpt.notes
    st_as_pth = workdir / "b.pth"
    save_file(sd, str(st_as_pth))
    ckpt = read_checkpoint(st_as_pth)
    assert torch.equal(ckpt.state_dict["w"], sd["w"])
    assert any("safetensors file although its name ends in '.pth'" in n for n in ckpt.notes), ckpt.notes


def test_valid_controls_still_load(workdir: Path) -> None:
    """The makers above start from valid files: unedited, they load (int64 num_batches_tracked included)."""
    for make in (_resmlp_file(), _convmixer_file()):
        path = workdir / "ok.pth"
        make(path)
        model = load_checkpoint(path)
        assert any(k.endswith("num_batches_tracked") for k in model.state_dict()) == (model.arch == "timm-convmixer")
    _deploy_file(workdir / "ok.deploy.pt", lambda pl: None)
    assert load_deploy(workdir / "ok.deploy.pt").arch == "timm-resmlp"
    # an overlapping-free view of a larger storage (a slice) is a legitimate tensor
    torch.save({"w": torch.randn(8, 8)[:, :4], "b": torch.ones(3)}, workdir / "slice.pth")
    assert read_checkpoint(workdir / "slice.pth").state_dict["w"].shape == (8, 4)


# --------------------------------------------------------------------------- create_model overrides

@pytest.mark.parametrize("name, overrides, match", [
    ("resmlp_12", {"bogus": 1}, r"unexpected timm-resmlp arguments \['bogus'\]"),
    ("resmlp_12", {"embed_dim": "abc"}, r"cannot build timm-resmlp"),
    ("resmlp_12", {"img_size": 0}, r"input size 3x0x0"),
    ("resmlp_12", {"num_blocks": -1}, r"negative sizes or counts: num_blocks=-1"),
])
def test_bad_overrides_are_refused(name: str, overrides: dict, match: str, workdir: Path) -> None:
    _refused(lambda: create_model(name, **overrides), workdir, match)


def test_default_limit_follows_available_memory(monkeypatch, workdir: Path) -> None:
    from vismlp_deploy.models import footprint

    monkeypatch.setattr(footprint, "available_memory", lambda: 4 * GiB)
    _refused(lambda: create_model("asmlp_t", img_size=6016), workdir,
             r"limit of 2\.0 GiB \(half of the 4\.0 GiB available\)")
    assert create_model("asmlp_t", **TINY_ASMLP).input_size == (3, 32, 32)  # small ones still fit


@pytest.mark.parametrize("inplace, peak", [(False, 192 + 320 + 320), (True, 192 + 320 + 80)])
def test_activation_estimate_is_the_peak_of_live_tensors(inplace: bool, peak: int) -> None:
    """Batch 4 of 3x2x2 through Flatten-Linear(12, 20)-ReLU-Linear(20, 5): the input (192 B), the first Linear's
    output (320 B) and the ReLU's (320 B, or none in place) are alive together; the sum of all would be more."""
    from vismlp_deploy.models.footprint import estimate

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 20), torch.nn.ReLU(inplace=inplace),
                                    torch.nn.Linear(20, 5)).eval()
    fp = estimate(model, (3, 2, 2), batch=4)
    assert (fp.weights, fp.activations) == ((12 * 20 + 20 + 20 * 5 + 5) * 4, peak)


def test_onnx_estimate_is_weights_plus_peak_at_batch_1(workdir: Path) -> None:
    """Conv 3->4 (3x3) on 1x3x24x24: weights 432 B; input 6912 B and conv output 7744 B alive together."""
    from vismlp_deploy.runtime.onnx_input import check_onnx_input

    path = workdir / "dyn.onnx"
    _dynamic_hw_onnx(path, [3, 24, 24])
    need = 4 * 3 * 3 * 3 * 4 + 3 * 24 * 24 * 4 + 4 * 22 * 22 * 4
    assert check_onnx_input(path, max_memory=need) == (3, 24, 24)
    _refused(lambda: check_onnx_input(path, max_memory=need - 1), workdir, r"needs about 14\.7 KiB")


def test_available_memory_counts_the_cgroup_limit(monkeypatch, tmp_path: Path) -> None:
    """A container's limit counts (less its usage, plus reclaimable page cache); "max" means none."""
    from vismlp_deploy.models import footprint

    monkeypatch.setattr(footprint, "CGROUP_ROOT", tmp_path)
    (tmp_path / "memory.max").write_text("max\n")
    assert footprint._cgroup_headroom() is None
    (tmp_path / "memory.max").write_text(f"{8 * GiB}\n")
    (tmp_path / "memory.current").write_text(f"{7 * GiB}\n")
    (tmp_path / "memory.stat").write_text(f"anon {4 * GiB}\ninactive_file {3 * GiB}\nactive_file 5\n")
    assert footprint._cgroup_headroom() == 4 * GiB
    monkeypatch.setattr(footprint, "_meminfo_available", lambda: 64 * GiB)
    assert footprint.available_memory() == 4 * GiB


# --------------------------------------------------------------------------- bounded memory (subprocess)

_RSS_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))  # a regression fails here instead of swapping
# ru_maxrss starts at the parent's high-water mark (fork copies it, exec keeps it): reset this
# process's own (VmHWM) so that a big pytest process does not count
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
case, path = sys.argv[1], sys.argv[2]
from vismlp_deploy import create_model, load_checkpoint
from vismlp_deploy.errors import UserError
calls = {"create-asmlp-6016": lambda: create_model("asmlp_t", img_size=6016, max_memory=2 << 30),
         "create-huge-dim": lambda: create_model("convmixer_768_32", dim=20000, depth=64),
         "create-1e8-wide": lambda: create_model("resmlp_12", embed_dim=10**8),
         "create-1e8-blocks": lambda: create_model("convmixer_768_32", depth=10**8),
         "load": lambda: load_checkpoint(path, max_memory=2 << 30)}
try:
    calls[case if case in calls else "load"]()
    print("ACCEPTED")
except UserError as e:
    print("REFUSED", e)
print("RSS", next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""

# name: (maker of the file, or None for a create_model call; message pattern)
MEMORY_CASES: dict[str, tuple[Callable[[Path], None] | None, str]] = {
    "create-asmlp-6016": (None, r"needs about 10\.\d GiB .*activations at batch 1.*limit of 2\.0 GiB"),
    "create-huge-dim": (None, r"needs about 96\.\d GiB .*memory limit"),
    # 10^16-parameter layers: beyond any machine, refused with the default limit
    "create-1e8-wide": (None, r"needs about \d+\.\d TiB"),
    # a hundred million blocks: refused by the tensor count, before Python memory runs out
    "create-1e8-blocks": (None, r"more than 20000 tensors"),
    # a file's own metadata asks for dim 20000, depth 64 (~96 GiB) around tiny weights
    "metadata-huge-config": (_convmixer_file(_meta_edit(config={**TINY_CONVMIXER, "dim": 20000, "depth": 64})),
                             r"does not fit timm-convmixer"),
    # AS-MLP weights do not depend on the image size: only the activations at 6016x6016 (~3.4 GiB) do
    "metadata-asmlp-6016": (lambda p: _train_file(p, _tiny("asmlp_t", **ASMLP_32), _meta_edit(
        config={**create_model("asmlp_t", **ASMLP_32).config, "img_size": 6016}, input_size=[3, 6016, 6016])),
        r"needs about 3\.\d GiB .*limit of 2\.0 GiB"),
    "stride-0-30000": (_save(lambda: {"w": torch.zeros(1).expand(30000, 30000), "b": torch.ones(3)}), r"stride-0"),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_memory_bound_refusals_stay_under_1_gb(case: str, workdir: Path) -> None:
    make, match = MEMORY_CASES[case]
    path = workdir / "ckpt.pth"
    if make:
        make(path)
    before = _snapshot(workdir)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, case, str(path)], capture_output=True, text=True,
                         check=False, timeout=300, env=env, cwd=workdir)
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if " " in line)
    assert "REFUSED" in lines and len(run.stdout.splitlines()) == 2, (run.stdout, run.stderr[-2000:])
    assert re.search(match, lines["REFUSED"]), lines["REFUSED"]
    rss = int(lines["RSS"])
    assert rss < GiB, f"peak RSS {rss / GiB:.2f} GiB for a refused input"
    assert _snapshot(workdir) == before


# --------------------------------------------------------------------------- ONNX given to verify/bench

def _dynamic_hw_onnx(path: Path, input_size: list[int] | None = None, custom_op: bool = False) -> None:
    """Conv 3x3 -> GlobalAveragePool -> Flatten over an (N, 3, H, W) input with symbolic N, H, W."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["y"])]
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:  # passes onnx.checker (unknown domains are not checked); onnxruntime has no kernel for it
        nodes.insert(2, helper.make_node("Explode", ["g"], ["g2"], domain="com.hostile"))
        nodes[-1].input[0] = "g2"
        opsets.append(helper.make_opsetid("com.hostile", 1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=opsets)
    if input_size:
        model.metadata_props.add(key="vismlp_deploy.input_size", value=json.dumps(input_size))
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> bytes:
    """Bytes of a real export (static 3x32x32, symbolic batch) of a tiny ResMLP deploy form."""
    from vismlp_deploy.export.onnx import export_onnx

    train = _tiny("resmlp_12", **TINY_RESMLP)
    deploy = reparameterize(train)
    deploy.arch, deploy.config, deploy.input_size = train.arch, train.config, train.input_size
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(deploy, path)
    return path.read_bytes()


def _with_input_size(data: bytes, size: list[int]) -> bytes:
    proto = onnx.load_from_string(data)
    entry = next(p for p in proto.metadata_props if p.key == "vismlp_deploy.input_size")
    entry.value = json.dumps(size)
    return proto.SerializeToString()


ONNX_FILES: dict[str, tuple[Callable[[bytes, Path], None], str]] = {
    "truncated": (lambda data, p: p.write_bytes(data[: len(data) // 2]), r"not a readable ONNX model"),
    "text": (lambda data, p: p.write_text("this is not a model\n"), r"not a readable ONNX model"),
    "empty": (lambda data, p: p.write_bytes(b""), r"not an ONNX model"),
    "a-checkpoint": (lambda data, p: torch.save({"w": torch.ones(2)}, p),
                     r"not a readable ONNX model|not an ONNX model"),
    "metadata-3x100000x100000": (lambda data, p: p.write_bytes(_with_input_size(data, [3, 100000, 100000])),
                                 r"declares input 3x100000x100000 but the graph takes 3x32x32"),
    "metadata-3x1x1": (lambda data, p: p.write_bytes(_with_input_size(data, [3, 1, 1])), r"declares input 3x1x1"),
    "metadata-input-size-garbage": (lambda data, p: p.write_bytes(_with_input_size(data, ["a", 2])),
                                    r"input_size is \['a', 2\]"),
    "dynamic-3x100000x100000": (lambda data, p: _dynamic_hw_onnx(p, [3, 100000, 100000]),
                                r"needs about .*memory limit"),
    "dynamic-3x1x1": (lambda data, p: _dynamic_hw_onnx(p, [3, 1, 1]), r"cannot take an input of 1x3x1x1"),
}


@pytest.mark.parametrize("case", list(ONNX_FILES))
def test_bad_onnx_is_refused_before_running(case: str, exported: bytes, workdir: Path) -> None:
    make, match = ONNX_FILES[case]
    path = workdir / "model.onnx"
    make(exported, path)
    _refused(lambda: load_source(path), workdir, match)


def test_onnx_controls_and_runtime_errors(exported: bytes, workdir: Path) -> None:
    from vismlp_deploy.runtime.ort_runner import OrtRunner

    (workdir / "ok.onnx").write_bytes(exported)
    assert load_source(workdir / "ok.onnx").input_size == (3, 32, 32)
    _dynamic_hw_onnx(workdir / "dyn.onnx", [3, 24, 24])
    assert load_source(workdir / "dyn.onnx").input_size == (3, 24, 24)
    _dynamic_hw_onnx(workdir / "custom.onnx", [3, 24, 24], custom_op=True)
    source = load_source(workdir / "custom.onnx")
    _refused(lambda: OrtRunner(source.onnx_path), workdir, r"ONNX Runtime cannot load it.*Explode")
    runner = OrtRunner(workdir / "ok.onnx")
    _refused(lambda: runner.run(torch.randn(1, 3, 16, 16)), workdir, r"cannot run .* on a 1x3x16x16 input")
