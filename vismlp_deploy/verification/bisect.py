"""Per-layer bisection: the first module boundary where the deploy form leaves the train form.

Boundaries are the modules both forms have under the same name: the top-level children,
with ``nn.Sequential``/``nn.ModuleList`` containers expanded into their elements (a stage
of blocks gives one boundary per block). Forward hooks record each boundary's output in
both forms on the same input, in execution order.

A fold may legitimately move work across a boundary (a final norm folded into the head:
the deploy norm becomes ``nn.Identity`` and its output is not comparable). Such boundaries
are listed, not compared. The culprit is the first boundary from which every later
boundary, and the final output, stays diverged: an error that appears and vanishes again
is a fold across that boundary, not a bug.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..precision import PRECISIONS
from .stats import Stats, compare

OUTPUT = "(output)"


@dataclass
class Boundary:
    name: str
    stats: Stats | None  # None when not compared
    note: str = ""  # why it was not compared, or why a divergence is not a bug
    diverged: bool = False
    persistent: bool = False  # diverged, and so is every later boundary and the output

    def to_dict(self) -> dict:
        return {"name": self.name, "diverged": self.diverged, "persistent": self.persistent, "note": self.note,
                "stats": self.stats.to_dict() if self.stats else None}


@dataclass
class BisectResult:
    boundaries: list[Boundary] = field(default_factory=list)
    first_divergent: str | None = None
    tolerance: float = PRECISIONS["fp32"].tolerance

    def to_dict(self) -> dict:
        return {"first_divergent": self.first_divergent, "tolerance": self.tolerance,
                "boundaries": [b.to_dict() for b in self.boundaries]}


def boundary_names(model: nn.Module, prefix: str = "") -> list[str]:
    """Top-level children of ``model``, containers expanded recursively into their elements."""
    names = []
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        # exact types only: a Sequential subclass (ConvBN) is one unit that deploys as one module
        if type(child) in (nn.Sequential, nn.ModuleList) and len(child):
            names += boundary_names(child, full)
        else:
            names.append(full)
    return names


def _record(model: nn.Module, names: list[str], x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs of the named modules (first call each) in execution order, and the model output."""
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, _inp, out, name=name):
            if name not in seen and isinstance(out, Tensor):
                seen[name] = out.detach().clone()
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.inference_mode():
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, y


def bisect(train: nn.Module, deploy: nn.Module, x: Tensor,
           tolerance: float = PRECISIONS["fp32"].tolerance) -> BisectResult:
    """Compare ``deploy`` against ``train`` at every shared boundary on input ``x`` (N, C, H, W)."""
    deploy_modules = dict(deploy.named_modules())
    train_modules = dict(train.named_modules())
    shared = [n for n in boundary_names(train) if n in deploy_modules]
    ref, y_ref = _record(train, shared, x)
    got, y = _record(deploy, shared, x)
    result = BisectResult(tolerance=tolerance)
    for name in ref:  # train's execution order
        if isinstance(deploy_modules[name], nn.Identity) and not isinstance(train_modules[name], nn.Identity):
            result.boundaries.append(Boundary(name, None, "folded into a neighbour (nn.Identity in the deploy form)"))
        elif name not in got:
            result.boundaries.append(Boundary(name, None, "not called in the deploy form"))
        elif got[name].shape != ref[name].shape:
            result.boundaries.append(Boundary(name, None,
                                              f"shapes differ {tuple(got[name].shape)} vs {tuple(ref[name].shape)}"))
        else:
            s = compare(got[name], ref[name])
            result.boundaries.append(Boundary(name, s, diverged=not s.passed(tolerance)))
    s = compare(y, y_ref)
    result.boundaries.append(Boundary(OUTPUT, s, diverged=not s.passed(tolerance)))
    compared = [b for b in result.boundaries if b.stats is not None]
    culprit = None
    for b in reversed(compared):  # walk back from the output while the divergence persists
        if not b.diverged:
            break
        culprit = b.name
        b.persistent = True
    for b in compared:
        if b.diverged and not b.persistent:
            b.note = "differs here but agrees again later: a fold moves work across this boundary"
    result.first_divergent = culprit
    return result
