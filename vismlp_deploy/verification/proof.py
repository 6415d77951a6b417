"""The equivalence proof of ``convert``: each produced stage judged against the train form."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .compare import Comparison, judge

REFERENCE = "train (torch fp32)"


def prove_stage(stage: str, run: Callable[[Tensor], Tensor], x: Tensor, ref: Tensor, precision: str = "fp32",
                inputs: str = "random", reference: str = REFERENCE, min_top1: float | None = None) -> Comparison:
    """Run ``stage`` on ``x`` and judge it against ``ref`` (the reference's outputs on ``x``); ``min_top1``
    overrides the precision's top-1 agreement target."""
    with torch.inference_mode():
        y = run(x)
    return judge(stage, y, ref, precision, reference=reference, inputs=inputs, min_top1=min_top1)
