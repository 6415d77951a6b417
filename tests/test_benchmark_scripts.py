"""The benchmark scripts of ``benchmarks/`` import against the current package and expose ``main``.

They are commands, not tests (their numbers are committed under ``docs/``), so they are not run
here; this catches a script left behind by a rename in the package.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import load_script

SCRIPTS = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name: str) -> None:
    assert callable(load_script(name).main)


def test_precision_report_rows_are_markdown() -> None:
    assert load_script("precision").md_row("resmlp_12", "2.21", "") == "| resmlp_12 | 2.21 |  |"
