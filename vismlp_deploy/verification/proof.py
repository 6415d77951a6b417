"""The equivalence proof printed by ``convert``: one row per stage against the train form."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..precision import get_precision
from .stats import Stats, compare


@dataclass
class StageProof:
    stage: str  # e.g. "deploy (torch fp32)"
    precision: str
    stats: Stats
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.stats.passed(self.tolerance)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "precision": self.precision, "tolerance": self.tolerance,
                "passed": self.passed, **self.stats.to_dict()}


def proof_inputs(input_size: tuple[int, ...], batch: int = 8, seed: int = 0) -> Tensor:
    """Seeded N(0, 1) images: the scale of normalized real images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g)


def prove_stage(stage: str, run: Callable[[Tensor], Tensor], x: Tensor, ref: Tensor, precision: str = "fp32") -> StageProof:
    with torch.inference_mode():
        y = run(x)
    return StageProof(stage, precision, compare(y, ref), get_precision(precision).tolerance)


def proof_table(proofs: list[StageProof]):
    from rich.table import Table

    t = Table(title="equivalence proof (reference: train form, torch fp32)")
    for col in ("stage", "max abs", "rel err", "cosine", "top-1", "tolerance", "result"):
        t.add_column(col, justify="right" if col not in ("stage", "result") else "left")
    for p in proofs:
        s = p.stats
        t.add_row(p.stage, f"{s.max_abs:.2e}", f"{s.rel:.2e}", f"{s.cosine:.8f}", f"{s.top1:.0%}",
                  f"{p.tolerance:.0e}", "[green]pass[/green]" if p.passed else "[red]FAIL[/red]")
    return t
