"""What a re-parameterization did: folds by kind, modules left and why, size before/after."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Left:
    """A module the walker left as it was."""

    path: str
    kind: str
    reason: str


@dataclass
class ReparamReport:
    """Filled by :func:`vismlp_deploy.reparameterize`; ``to_dict()`` is the ``--json`` form."""

    folded: Counter = field(default_factory=Counter)  # kind -> count
    folded_paths: list[tuple[str, str]] = field(default_factory=list)  # (path, kind)
    left: list[Left] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    input_size: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return {
            "folded": dict(self.folded),
            "folded_paths": [{"path": p, "kind": k} for p, k in self.folded_paths],
            "left": [{"path": x.path, "kind": x.kind, "reason": x.reason} for x in self.left],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "input_size": list(self.input_size) if self.input_size else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReparamReport:
        """The inverse of :meth:`to_dict` (a report stored in a deploy artifact)."""
        return cls(Counter(d.get("folded", {})), [(x["path"], x["kind"]) for x in d.get("folded_paths", [])],
                   [Left(x["path"], x["kind"], x["reason"]) for x in d.get("left", [])], d.get("params_before", 0),
                   d.get("params_after", 0), d.get("flops_before"), d.get("flops_after"),
                   tuple(d["input_size"]) if d.get("input_size") else None)

    def left_groups(self) -> list[tuple[str, str, str, int]]:
        """(path pattern, kind, reason, count): ``blocks.0.x`` … ``blocks.11.x`` with one reason read
        as ``blocks.*.x`` ×12."""
        groups: dict[tuple[str, str, str], int] = {}
        for x in self.left:
            key = (re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", x.path) or "<model>", x.kind, x.reason)
            groups[key] = groups.get(key, 0) + 1
        return [(*key, n) for key, n in groups.items()]

    def summary(self) -> str:
        """One line, for logs and ONNX metadata: folds by kind, and what was left and why."""
        folded = ", ".join(f"{k}×{n}" for k, n in sorted(self.folded.items())) or "nothing"
        left = "".join(f"; left {path}{f' (×{n})' if n > 1 else ''} [{kind}]: {reason}"
                       for path, kind, reason, n in self.left_groups())
        return f"folded {folded}; params {self.params_before:,} -> {self.params_after:,}{left}"


def count_params(model: nn.Module) -> int:
    """Parameters and persistent floating buffers (BN statistics count: they are weights to ship)."""
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward (matmul/conv counted by torch's FlopCounterMode, 2 per MAC).

    Runs on meta tensors (shapes only, no arithmetic: milliseconds instead of a full-size
    forward); a model that keeps plain tensor attributes the meta run cannot replace falls
    back to a real forward.
    """
    from torch.func import functional_call
    from torch.utils.flop_counter import FlopCounterMode

    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    meta = {k: torch.empty_like(v, device="meta") for k, v in state.items()}
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            functional_call(model, meta, (example.to("meta"),))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model(example)
    return counter.get_total_flops()
