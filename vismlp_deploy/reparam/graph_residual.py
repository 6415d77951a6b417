"""Rules for affines after an activation and around residual sums (ConvMixer's order: conv → act → BN).

No Conv→BN fuser folds a BatchNorm that follows an activation. These three rules carry the
residual stream in pre-BN form instead, as the ConvMixer family file does, each exact:

- :func:`scale_into_relu`: ``s ⊙ relu(W x + b) + t = σ ⊙ relu(p W x + p b) + t`` with
  ``p = |s|``, ``σ = s/p`` (ReLU and leaky ReLU are positively homogeneous): the positive part
  of the scale enters the conv before the activation; for ``s > 0`` only the shift is left.
- :func:`factor_out_of_sum`: ``p + (s ⊙ d + t) = s ⊙ (k ⊙ p + d) + t``, ``k = 1/s``: a branch's
  affine leaves the sum and folds into the Linear/Conv that reads the sum (ConvMixer: the DW
  branch's BN into the PW conv); the skip path gets one per-channel multiply ``k``.
- :func:`absorb_skip_scale`: an affine ``a = s ⊙ x + t`` read by that multiply ``k ⊙ a`` and by
  Linear/Convs: ``a' = k ⊙ a`` replaces both, and each conv takes ``1/k`` on its input
  features (a scale commutes with zero padding: ``c · 0 = 0``; a shift would not, so the
  stream's shift stays before a zero-padded conv, never approximated).

Each removes at least one constant, so the fixed point terminates.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import NotExactError
from . import transforms as T
from .graph_affine import AffineOp, affine_of
from .graph_axes import is_plain_add, value_users
from .graph_edit import GraphCtx, Inapplicable, carry, describe, emit_affine, only_user, replace, single_user, trivial
from .graph_rules import chain_back, output_axis, plan_into_mixer, remove, scale_rows

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU)
_HOMOGENEOUS_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu}


def _elementwise(op: AffineOp) -> str | None:
    if op.data is None or op.strip is not None or op.residual is not None:
        return Inapplicable("not an elementwise affine of one tensor")
    return op.not_per_channel()


def _homogeneous(ctx: GraphCtx, node: fx.Node) -> bool:
    """``node`` is relu/leaky_relu of its one tensor input: ``act(p·y) = p·act(y)`` for ``p > 0``."""
    if not node.args or not isinstance(node.args[0], fx.Node) or node.all_input_nodes != [node.args[0]]:
        return False
    if node.op == "call_module":
        return isinstance(ctx.gm.get_submodule(node.target), _HOMOGENEOUS_MODULES)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS


def scale_into_relu(ctx: GraphCtx, op: AffineOp) -> str | None:
    """Linear/Conv → relu → ``op``: the positive part of ``op``'s scale into the Linear/Conv."""
    if reason := _elementwise(op):
        return reason
    if op.scale is None or bool(((op.scale == 0) | (op.scale.abs() == 1)).all()):
        return Inapplicable("its scale is ±1 or 0: no positive factor to move")
    act = op.data
    if not _homogeneous(ctx, act):
        return Inapplicable(f"its input comes from {describe(ctx, act)}, not from a ReLU (only a positively "
                            "homogeneous activation lets a scale cross it)")
    if reason := single_user(act):
        return reason
    found = chain_back(ctx, act.args[0])
    if isinstance(found, str):
        return f"before the activation: {found}"
    mixer, chain = found
    axis = output_axis(ctx, mixer, chain)
    if isinstance(axis, str) or (op.axis is not None and op.axis != axis):
        return axis if isinstance(axis, str) else f"it acts on axis {op.axis}, {mixer.target} writes axis {axis}"
    p, sign = T.positive_part(op.scale)
    scale_rows(ctx, mixer, p.reshape(-1), None)
    replace(ctx, op.node, emit_affine(ctx, op.node, act, sign, op.shift, op.path))
    ctx.folded.append((op.path, f"{op.kind} scale->{type(ctx.mixer(mixer)).__name__} (through the ReLU)"))
    return None


def factor_out_of_sum(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``skip + op(d)`` → Linear/Conv: ``op`` folds into the Linear/Conv, ``k = 1/s`` onto the skip."""
    if reason := _elementwise(op) or single_user(op.node):
        return reason
    add = only_user(op.node)
    if not is_plain_add(add) or not all(isinstance(a, fx.Node) for a in add.args) or add.args[0] is add.args[1]:
        return Inapplicable(f"it feeds {describe(ctx, add)}, not a residual sum")
    skip = add.args[1] if add.args[0] is op.node else add.args[0]
    if skip is op.data or not skip.meta.get("shape") == op.node.meta["shape"] == add.meta["shape"]:
        return "the residual sum broadcasts or adds the branch's own input"
    if reason := single_user(add, ctx):
        return f"the residual sum: {reason}"
    got = carry(ctx, add, only_user(add), [op.scale, op.shift])
    if isinstance(got, str):
        return f"after the residual sum: {got}"
    if ctx.mixer(got.end) is None:
        return f"the residual sum feeds {describe(ctx, got.end)}, not a Linear/Conv"
    commit = plan_into_mixer(ctx, got.last, got.end, *got.consts)
    if isinstance(commit, str):
        return f"after the residual sum: {commit}"
    try:
        k = None if op.scale is None else trivial(T.residual_skip_scale(op.scale), None)[0]
    except NotExactError as e:
        return str(e)
    if (k is not None) >= op.n_constants():
        return "factored out of the residual sum it would leave as many multiplies on the skip path"
    commit()
    remove(ctx, op)
    add.replace_input_with(skip, emit_affine(ctx, add, skip, k, None, op.path))
    ctx.folded.append((op.path, f"{op.kind}->{type(ctx.mixer(got.end)).__name__} (out of the residual sum)"))
    return None


def _skip_scale(op: AffineOp, user: fx.Node, ctx: GraphCtx) -> AffineOp | None:
    """``user`` as a pure per-channel multiply of ``op``'s output on ``op``'s axis, else None."""
    k = affine_of(user, ctx.gm, ctx.prefix)
    if not isinstance(k, AffineOp) or k.data is not op.node or k.shift is not None or k.residual is not None:
        return None
    return k if k.scale is not None and len(set(op.axes) | set(k.axes)) <= 1 else None


def absorb_skip_scale(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``op`` read by ``k ⊙ op`` and by Linear/Convs: ``k ⊙ op`` for all, ``1/k`` into the convs."""
    if reason := _elementwise(op):
        return reason
    users = value_users(op.node)
    scaled = [k for u in users if (k := _skip_scale(op, u, ctx)) is not None]
    if len(users) < 2 or not scaled:
        return Inapplicable("it is not read both by a per-channel multiply and by Linear/Convs")
    k = scaled[0]
    try:
        inverse = T.residual_skip_scale(k.scale)
    except NotExactError as e:
        return str(e)
    commits = []
    for u in users:
        if u is k.node:
            continue
        got = carry(ctx, op.node, u, [inverse])
        if isinstance(got, str) or ctx.mixer(got.end) is None:
            return f"its user {u.name} is not a Linear/Conv that could take the inverse scale"
        commit = plan_into_mixer(ctx, got.last, got.end, got.consts[0], None)
        if isinstance(commit, str):
            return f"its user {u.name}: {commit}"
        commits.append(commit)
    for commit in commits:
        commit()
    origin = ",".join(dict.fromkeys(op.path.split(",") + k.path.split(",")))
    new = emit_affine(ctx, op.node, op.data, *T.compose_affines(op.scale, op.shift, k.scale, None), origin)
    replace(ctx, op.node, new)
    replace(ctx, k.node, new)
    ctx.folded.append((k.path, f"{k.kind}->{op.kind} (skip-path multiply, inverse into the convs)"))
    return None
