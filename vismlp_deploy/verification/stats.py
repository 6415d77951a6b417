"""Polygraphy-style comparison statistics between a reference output and a candidate."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

SQNR_CAP_DB = 300.0  # reported for identical outputs (no noise at all): finite, so JSON stays valid


@dataclass
class Stats:
    """Equivalence of ``y`` against ``ref``, both (N, classes) logits (or any (N, ...))."""

    max_abs: float
    mean_abs: float
    median_abs: float
    rel: float  # max|y - ref| / max|ref|: the numerics policy's measure
    max_elementwise_rel: float
    cosine: float  # worst per-sample cosine similarity
    sqnr_db: float  # 10 log10(sum ref^2 / sum (y - ref)^2) over all outputs; SQNR_CAP_DB when identical
    top1: float  # fraction of samples with the same argmax
    top5: float | None
    n: int

    def passed(self, tol: float) -> bool:
        return self.rel <= tol

    @property
    def min_tolerance(self) -> float:
        """The smallest tolerance this comparison passes (Polygraphy's "minimum required tolerance")."""
        return self.rel

    def to_dict(self) -> dict:
        return {**asdict(self), "min_tolerance": self.min_tolerance}


def rel_err(y, ref) -> float:
    """max|y - ref| / max|ref|, the numerics policy's measure, worst over the tensors of two
    outputs of the same structure (a tensor, or tuples/lists/dicts of them); inf where the
    structures or shapes differ."""
    ys, _ = tree_flatten(y)
    refs, _ = tree_flatten(ref)
    if len(ys) != len(refs):
        return float("inf")
    worst = 0.0
    for a, b in zip(ys, refs):
        if not isinstance(b, Tensor):
            continue
        if a.shape != b.shape:
            return float("inf")
        a, b = a.double(), b.double()
        worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0)
    return worst


def compare(y: Tensor, ref: Tensor) -> Stats:
    y, ref = y.detach().double().cpu(), ref.detach().double().cpu()
    if y.shape != ref.shape:
        raise ValueError(f"output shapes differ: {tuple(y.shape)} vs {tuple(ref.shape)}")
    diff = (y - ref).abs()
    n = y.shape[0]
    yf, rf = y.reshape(n, -1), ref.reshape(n, -1)
    cos = torch.nn.functional.cosine_similarity(yf, rf, dim=1, eps=1e-300)
    signal, noise = ref.square().sum().item(), (y - ref).square().sum().item()
    sqnr = SQNR_CAP_DB if noise <= signal * 10 ** (-SQNR_CAP_DB / 10) else 10 * math.log10(signal / noise)
    top1 = (yf.argmax(1) == rf.argmax(1)).double().mean().item()
    top5 = None
    if yf.shape[1] >= 5:
        # top-5 agreement: the reference's top-1 class is among the candidate's top 5
        top5 = (yf.topk(5, 1).indices == rf.argmax(1, keepdim=True)).any(1).double().mean().item()
    return Stats(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        median_abs=diff.median().item(),
        rel=(diff.max() / ref.abs().max().clamp_min(1e-300)).item(),
        max_elementwise_rel=(diff / ref.abs().clamp_min(1e-12)).max().item(),
        cosine=cos.min().item(),
        sqnr_db=sqnr,
        top1=top1,
        top5=top5,
        n=n,
    )

