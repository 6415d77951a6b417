"""Generic, exact re-parameterization of models this package did not define.

``fold_graph(model, example_input)`` traces the model with torch.fx (submodules that do not
trace become opaque leaves and are folded inside separately), then applies the rules of
:mod:`graph_rules` to a fixed point:

- Conv/Linear → BatchNorm, and BatchNorm → Conv/Linear (no zero padding meets the shift);
- per-channel affine ops written with parameters (``alpha * x + beta``, ``addcmul``,
  layer-scale ``ls * x``) into the adjacent Linear/Conv on the axis it mixes, also through
  views, permutes, indexing, einops rearranges, means, einops mean reductions and average
  pools over the other axes (an affine before the token mean / global pool enters the head);
- LayerNorm / GroupNorm affines into the following Linear / Conv;
- two consecutive affines merged; an affine pushed through a linear that mixes another axis
  (ResMLP's token linear) into the layer-scale after it (:mod:`graph_commute`);
- a BatchNorm after a ReLU: its positive scale into the conv before the ReLU; a branch's
  affine out of a residual sum into the next conv, and the skip-path multiply this needs
  into the stream's affine (:mod:`graph_residual`, ConvMixer's conv → act → BN order);
- identical parallel Linear/Conv branches on the same input that are summed.

Every fold checks data-flow adjacency, single use of every removed intermediate, that the
rewritten module is called once and owns its parameters, and which axis each op acts on —
the checks whose absence makes ``torch.ao.quantization.fuse_modules``, ``torch.fx``'s
``fuse`` and ``fuse_linear_bn_eval`` silently wrong. The result is verified numerically
against the input model (float32 and, where the model runs in it, float64) before it is
returned; a mismatch raises :class:`VerificationError`.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import UserError, VerificationError
from ..verification.stats import rel_err
from .graph_affine import AffineOp, affine_of
from .graph_commute import merge_next, push_through_mixer
from .graph_edit import GraphCtx, Inapplicable
from .graph_residual import absorb_skip_scale, factor_out_of_sum, scale_into_relu
from .graph_rules import fold_after, fold_before, merge_parallel
from .graph_trace import RootNotTraceable, annotate, capture_inputs, placeholder_values, trace_with_leaves
from .report import Left, ReparamReport

FP64_RTOL = 1e-10
_FP64_MAX_PARAMS = 50_000_000  # above this the float64 copy costs more than it is worth

# tried in this order on every affine node; the first that applies rewrites the graph
_RULES = (
    ("after a Linear/Conv", fold_after),
    ("before a Linear/Conv", fold_before),
    ("through a ReLU", scale_into_relu),
    ("merged with the next affine", merge_next),
    ("out of a residual sum", factor_out_of_sum),
    ("through token mixing", push_through_mixer),
    ("as the skip-path multiply", absorb_skip_scale),
)


def fold_graph(
    model: nn.Module,
    example_input: Tensor,
    *,
    rtol: float = 1e-5,
    report: ReparamReport | None = None,
) -> tuple[nn.Module, ReparamReport]:
    """A folded, verified copy of ``model`` (never mutated) and the report it filled.

    ``example_input`` (e.g. (N, C, H, W)) fixes the rank of every tensor, hence its channel
    axes; the folds themselves do not depend on its size. ``report.folded``/``folded_paths``
    get one entry per fold, ``report.left`` one per affine/norm left and per submodule that
    could not be traced. Raises :class:`VerificationError` if the folded model's output
    differs from ``model``'s by more than ``rtol`` relative (``max|Δ| / max|ref|``; where the
    model runs in float64, from the float64 output, plus the float32 model's own error from it),
    or if the float64 fold differs from the float64 model by more than 1e-10.
    """
    if model.training:
        raise UserError("model is in training mode; call model.eval() before folding")
    report = ReparamReport() if report is None else report
    work = copy.deepcopy(model)
    with torch.no_grad():
        folded = _fold_module(work, (example_input,), {}, "", report)
    folded.eval()
    fp64 = _float64_reference(model, example_input)
    verify_equal(model, folded, example_input, rtol, exact=None if fp64 is None else fp64[2])
    if fp64 is not None:  # float32 rounding hides small inexact folds (a mis-applied eps) that float64 exposes
        ref64, x64, y64 = fp64
        with torch.no_grad():
            new64 = _fold_module(ref64, (x64,), {}, "", ReparamReport())  # ref64 is a private copy
        verify_equal(y64, new64, x64, FP64_RTOL)
    return folded, report


def _fold_module(mod: nn.Module, args: tuple, kwargs: dict, prefix: str, report: ReparamReport) -> nn.Module:
    """Fold inside ``mod`` (called with ``args``/``kwargs``); returns its replacement."""
    if not any(True for _ in mod.children()) and type(mod).__module__.startswith("torch.nn"):
        return mod  # a plain torch layer: nothing inside to fold
    try:
        graph, failed = trace_with_leaves(mod)
    except RootNotTraceable as e:
        report.left.append(Left(prefix.rstrip(".") or "<model>", type(mod).__name__,
                                f"forward not traceable by torch.fx ({e}); its submodules are folded separately"))
        _fold_children(mod, dict(mod.named_children()), args, kwargs, prefix, report)
        return mod
    for path, reason in failed.items():
        report.left.append(Left(prefix + path, type(mod.get_submodule(path)).__name__,
                                f"not traceable by torch.fx ({reason}); folded inside separately"))
    _fold_children(mod, {p: mod.get_submodule(p) for p in failed}, args, kwargs, prefix, report)
    gm = fx.GraphModule(mod, graph)
    annotate(gm, placeholder_values(mod, args, kwargs))
    ctx = GraphCtx(gm, prefix)
    reasons = _fold_to_fixed_point(ctx)
    for path, kind in ctx.folded:
        report.folded[kind] += 1
        report.folded_paths.append((path, kind))
    for node in gm.graph.nodes:  # what is still there, with the reason every rule gave
        op = affine_of(node, gm, prefix) if node in reasons else None
        if isinstance(op, AffineOp):
            report.left.append(Left(op.path, op.kind, reasons[node]))
        elif isinstance(op, str):
            what = node.target if node.op == "call_module" else node.name
            report.left.append(Left(prefix + what, _op_name(node, gm), reasons[node]))
    gm.graph.lint()
    out = fx.GraphModule(gm, gm.graph, class_name=type(mod).__name__)
    for k, v in vars(mod).items():  # user attributes (input_size, arch, config, ...)
        if not k.startswith("_") and k != "training" and not hasattr(out, k):
            setattr(out, k, v)
    return out


def _fold_children(mod: nn.Module, children: dict[str, nn.Module], args, kwargs, prefix, report) -> None:
    """Fold inside each of ``children`` (opaque to the parent's trace) on its captured inputs."""
    inputs = capture_inputs(mod, list(children), args, kwargs)
    for path, child in children.items():
        got = inputs[path]
        if isinstance(got, str):
            report.left.append(Left(prefix + path, type(child).__name__, f"not folded: {got}"))
            continue
        new = _fold_module(child, *got, prefix + path + ".", report)
        if new is not child:
            parent, _, name = path.rpartition(".")
            setattr(mod.get_submodule(parent), name, new)


def _fold_to_fixed_point(ctx: GraphCtx) -> dict[fx.Node, str]:
    """Apply the rules until none applies; returns {affine-like node: why no rule applied}."""
    reasons: dict[fx.Node, str] = {}
    changed = True
    while changed:
        changed = False
        for node in list(ctx.gm.graph.nodes):
            if node._erased or not node.users:
                continue  # dead (the output node has no users either: nothing to fold there)
            if merge_parallel(ctx, node):
                changed = True
                continue
            op = affine_of(node, ctx.gm, ctx.prefix)
            if isinstance(op, str):
                reasons[node] = op
            elif op is not None:
                why = {}
                for name, rule in _RULES:
                    why[name] = rule(ctx, op)
                    if why[name] is None:
                        changed = True
                        break
                else:
                    reasons[node] = _summary(why)
    return reasons


def _summary(why: dict[str, str]) -> str:
    """One line from every rule's refusal: the informative ones, each text once."""
    real = {r: name for name, r in reversed(why.items()) if not isinstance(r, Inapplicable)}
    kept = real or {r: name for name, r in reversed(why.items())}
    return "; ".join(f"{name}: {r}" for r, name in reversed(kept.items()))


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return getattr(node.target, "__name__", str(node.target))


def verify_equal(ref: nn.Module | Any, new: nn.Module, x: Tensor, rtol: float, exact: Any = None) -> None:
    """Raise :class:`VerificationError` unless ``new(x)`` matches ``ref(x)`` within ``rtol``.

    ``ref`` is the reference model or its output on ``x``, already computed. ``exact``, where
    given, is ``ref``'s output computed in float64: ``new`` is then judged against it, with the
    reference's own rounding error added to the budget. A chain of affines that cancels
    (``(x - a) / b - c`` near zero) loses digits in float32 whichever way it is computed; the
    fold must not be blamed for what the model it replaces already gets wrong.
    """
    with torch.no_grad():
        y_new, y_ref = new(x), ref(x) if isinstance(ref, nn.Module) else ref
    if exact is None:
        err, budget = rel_err(y_new, y_ref), rtol
    else:
        err, budget = rel_err(y_new, exact), rtol + rel_err(y_ref, exact)
    if not err <= budget:
        raise VerificationError(f"graph folding changed the output: relative error {err:.3e} > {budget:.1e}")


def _float64_reference(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor, Any] | None:
    """(float64 copy of ``model``, ``x`` in float64, its output), or None where the model is too
    large for the copy to be worth it or hard-codes float32 somewhere."""
    if sum(p.numel() for p in model.parameters()) > _FP64_MAX_PARAMS or not x.is_floating_point():
        return None
    ref64, x64 = copy.deepcopy(model).double(), x.double()
    try:
        with torch.no_grad():
            return ref64, x64, ref64(x64)
    except RuntimeError:
        return None
