"""Every golden case in the conformance directories, train form and deploy form, fp32 and fp64.

Cases are discovered from ``tests/conformance/`` (the vendored copy) and from
``$VISMLP_CONFORMANCE_DIR`` or ``../shared/conformance`` when present, so a case dropped
there later is picked up automatically. A case whose format is not supported yet is
reported as skipped, by name.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from vismlp_deploy import load_checkpoint, reparameterize
from vismlp_deploy.models.registry import FORMATS, formats

HERE = Path(__file__).parent


def _case_files() -> list[Path]:
    dirs = [HERE / "conformance", HERE.parent.parent / "shared" / "conformance"]
    if os.environ.get("VISMLP_CONFORMANCE_DIR"):
        dirs.append(Path(os.environ["VISMLP_CONFORMANCE_DIR"]))
    cases: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for f in sorted(d.glob("*.pt")):
                cases[f.name] = f  # later dirs win: the shared copy is the newest
    return list(cases.values())


CASES = _case_files()
_cache: dict[Path, dict] = {}


def _load(path: Path) -> dict:
    if path not in _cache:
        _cache[path] = torch.load(path, weights_only=True)
    return _cache[path]


def _model(case: dict, dtype: torch.dtype):
    formats()
    if case["format"] not in FORMATS:
        pytest.skip(f"format {case['format']} ({case['case']}) not supported yet")
    model = load_checkpoint(case["state_dict"], arch=case["format"], config=case["config"])
    return model.to(dtype)


def _reference(case: dict, dtype: torch.dtype, deploy: bool) -> torch.Tensor:
    key = "output" if dtype == torch.float32 else "output_fp64"
    # repmlp_block.pt stores the upstream's *wrong* deploy output (in != out channels bug):
    # a correct converter must reproduce the train-time output there.
    if deploy and case.get("official_deploy_matches_train", True) and "output_official_deploy" in case:
        key = "output_official_deploy" if dtype == torch.float32 else "output_official_deploy_fp64"
    return case[key]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_train_form_reproduces_upstream(path: Path, dtype: torch.dtype) -> None:
    case = _load(path)
    model = _model(case, dtype)
    with torch.no_grad():
        y = model(case["input"].to(dtype))
    assert_close(y, _reference(case, dtype, deploy=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_deploy_form_reproduces_upstream(path: Path, dtype: torch.dtype) -> None:
    case = _load(path)
    model = _model(case, dtype)
    deploy = reparameterize(model)
    with torch.no_grad():
        y = deploy(case["input"].to(dtype))
    assert_close(y, _reference(case, dtype, deploy=True))
    # also against the train-time reference: the deploy form must equal the train form
    assert_close(y, case["output" if dtype == torch.float32 else "output_fp64"])
    assert deploy.reparam_report.folded, "deploy form folded nothing"
