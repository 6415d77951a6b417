"""The basic fold rules of the generic graph pass, each with its exactness checks.

Every rule rewrites one place in the graph and changes the weights of exactly one
Linear/ConvNd module, which must therefore be *private* to that place: called once in
the graph, its parameters not tied to any other module and not read elsewhere by
``get_attr``. Every intermediate tensor that disappears must have a single user (else the
other user would see the folded values). Each rule returns a reason string when it
refuses, so the report can say why an affine was left.

- :func:`fold_after`: Linear/ConvNd [→ pass-through ops] → affine on its output features.
- :func:`fold_before`: affine [→ pass-through ops] → Linear/ConvNd on its input features
  (a shift entering a zero-padded conv is refused: border outputs see 0, not the shift).
- :func:`merge_parallel`: ``m1(x) + m2(x)`` with identical hyper-parameters → one module.

The rules that move affines past token mixing and residual sums live in
:mod:`graph_commute` and :mod:`graph_residual`; the primitives in :mod:`graph_edit`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import NotExactError
from . import transforms as T
from .graph_affine import AffineOp
from .graph_axes import CONV, NOT_THROUGH, is_plain_add, mixer_axis, move_const, through, value_users, varying_axes
from .graph_edit import (
    GraphCtx,
    Inapplicable,
    carry,
    describe,
    emit_affine,
    only_user,
    replace,
    set_weights,
    single_user,
)


def padding_of(conv: nn.Module) -> list[int]:
    """Zero padding per side of a conv (0 for reflect/replicate/circular: they pad with data)."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return [0]
    if conv.padding == "same":
        return [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    return list(conv.padding)


def removable(ctx: GraphCtx, op: AffineOp) -> str | None:
    """Why ``op`` cannot be taken out of the graph (a norm module called twice keeps its affine)."""
    if op.strip is not None and sum(
        1 for n in ctx.gm.graph.nodes if n.op == "call_module" and n.target == op.node.target
    ) != 1:
        return f"{op.path} is called more than once"
    return None


def remove(ctx: GraphCtx, op: AffineOp) -> fx.Node:
    """Take ``op`` out of the graph; returns the node that now carries its input's values."""
    if op.strip is not None:
        op.strip()
        return op.node
    replace(ctx, op.node, op.data)
    return op.data


def chain_back(ctx: GraphCtx, data: fx.Node) -> tuple[fx.Node, list[fx.Node]] | str:
    """The private Linear/ConvNd whose output reaches ``data`` through pass-through ops, each used once."""
    chain, cur = [], data
    while ctx.mixer(cur) is None:
        if cur.op not in ("call_module", "call_function", "call_method") or not cur.args:
            return f"its input {cur.name} is not produced by a Linear/Conv"
        src = cur.args[0]
        if not isinstance(src, fx.Node) or through(cur, src, None, ctx.gm) is NOT_THROUGH:
            return f"its input comes from {describe(ctx, cur)}, not from a Linear/Conv"
        chain.insert(0, cur)
        cur = src
    for n in [cur, *chain]:
        if reason := single_user(n, ctx):
            return f"the output of {describe(ctx, n)}: {reason}"
    if reason := ctx.private(cur):
        return reason
    return cur, chain


def output_axis(ctx: GraphCtx, mixer: fx.Node, chain: list[fx.Node]) -> int | str:
    """The axis of ``chain[-1]`` (or of ``mixer``) holding the mixer's output features."""
    axis = mixer_axis(ctx.mixer(mixer), len(mixer.meta["shape"]))
    for n in chain:
        axis = through(n, n.args[0], axis, ctx.gm)
        if axis is NOT_THROUGH:
            return f"the output features of {mixer.target} do not pass through {n.name}"
    return axis


def scale_rows(ctx: GraphCtx, mixer: fx.Node, scale: Tensor | None, shift: Tensor | None) -> None:
    """``mixer``'s output features times ``scale`` plus ``shift`` (vectors, float64)."""
    mod = ctx.mixer(mixer)
    one = torch.ones((), dtype=torch.float64)
    w, b = T.fold_affine_after(mod.weight, mod.bias, one if scale is None else scale,
                               0 * one if shift is None else shift)
    set_weights(mod, w, b)


def fold_after(ctx: GraphCtx, op: AffineOp) -> str | None:
    """Linear/ConvNd → [pass-through]* → ``op``: scale and shift its output features."""
    if op.data is None or op.strip is not None:
        return Inapplicable("not an elementwise affine")
    if reason := op.not_per_channel():
        return reason
    found = chain_back(ctx, op.data)
    if isinstance(found, str):
        return found
    cur, chain = found
    axis = output_axis(ctx, cur, chain)
    if isinstance(axis, str):
        return axis
    if op.axis is not None and op.axis != axis:
        return f"it acts on axis {op.axis} but {ctx.prefix}{cur.target} writes features on axis {axis}"
    scale_rows(ctx, cur, op.vector(op.scale), op.vector(op.shift))
    if op.residual is not None:  # addcmul(r, p, x) -> r + x'
        replace(ctx, op.node, emit_affine(ctx, op.node, op.data, None, None, op.path, residual=op.residual))
    else:
        replace(ctx, op.node, op.data)
    ctx.folded.append((ctx.prefix + cur.target, f"{op.kind}->{type(ctx.mixer(cur)).__name__}"))
    return None


def plan_into_mixer(ctx: GraphCtx, last: fx.Node, user: fx.Node, scale: Tensor | None,
                    shift: Tensor | None) -> Callable[[], None] | str:
    """A commit that folds ``scale * last + shift`` (broadcast constants in ``last``'s frame)
    into the input features of the Linear/ConvNd ``user`` reading ``last``; or why it cannot."""
    if user.args[0] is not last or len(user.all_input_nodes) != 1 or user.kwargs:
        return f"it is not the only input of {user.target}"
    if reason := ctx.private(user):
        return reason
    mod = ctx.mixer(user)
    want = mixer_axis(mod, len(last.meta["shape"]))
    axes = sorted({a for c in (scale, shift) if c is not None for a in varying_axes(c)})
    if len(axes) > 1:
        return f"its constants vary along axes {axes}, not along the features of {ctx.prefix}{user.target}"
    if axes and axes[0] != want:
        return f"it acts on axis {axes[0]} but {ctx.prefix}{user.target} reads features on axis {want}"
    vec = (lambda c: None if c is None else c.reshape(-1))
    try:
        w, b = T.fold_affine_before(mod.weight, mod.bias, vec(scale), vec(shift), getattr(mod, "groups", 1),
                                    padding_of(mod) if isinstance(mod, CONV) else 0)
    except NotExactError as e:
        return str(e)
    return lambda: set_weights(mod, w, b)


def fold_before(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``op`` → [pass-through]* → Linear/ConvNd: scale its input features, shift into its bias."""
    if op.residual is not None:
        return "a layer-scaled residual is not an affine of one tensor"
    if reason := op.not_per_channel() or removable(ctx, op):
        return reason
    if reason := single_user(op.node, ctx):
        return reason + _blocked_shift(ctx, op)
    got = carry(ctx, op.node, only_user(op.node), [op.scale, op.shift])
    if isinstance(got, str):
        return got
    if ctx.mixer(got.end) is None:
        if move_const(got.end, got.last, None, ctx.gm) is not NOT_THROUGH:  # passes a scalar, not this affine
            return f"{describe(ctx, got.end)} reduces or mixes the axis it acts on"
        return f"it feeds {describe(ctx, got.end)}, not a Linear/Conv"
    commit = plan_into_mixer(ctx, got.last, got.end, *got.consts)
    if isinstance(commit, str):
        return commit
    commit()
    remove(ctx, op)
    ctx.folded.append((op.path, f"{op.kind}->{type(ctx.mixer(got.end)).__name__}"))
    return None


def _blocked_shift(ctx: GraphCtx, op: AffineOp) -> str:
    """For an affine with several users: which Linear/Conv among them could not take it, and why."""
    notes = []
    for user in value_users(op.node):
        got = carry(ctx, op.node, user, [op.scale, op.shift])
        if not isinstance(got, str) and ctx.mixer(got.end) is not None:
            why = plan_into_mixer(ctx, got.last, got.end, *got.consts)
            if isinstance(why, str):
                notes.append(f"; into {describe(ctx, got.end)}: {why}")
    return "".join(notes)


_SAME = ("stride", "dilation", "groups", "padding_mode", "in_channels", "out_channels")


def merge_parallel(ctx: GraphCtx, node: fx.Node) -> bool:
    """``m1(x) + m2(x)`` -> ``m1'(x)`` for two Linear/ConvNd of the same kind on the same input."""
    if not is_plain_add(node) or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    a, b = node.args
    ma, mb = ctx.mixer(a), ctx.mixer(b)
    if ma is None or mb is None or type(ma) is not type(mb) or a.target == b.target:
        return False
    if a.args[0] is not b.args[0] or len(a.all_input_nodes) != 1 or len(b.all_input_nodes) != 1:
        return False
    if a.kwargs or b.kwargs or any(single_user(n) or ctx.private(n) for n in (a, b)):
        return False
    if ma.weight.shape[:2] != mb.weight.shape[:2] or a.meta.get("shape") != b.meta.get("shape"):
        return False
    if isinstance(ma, CONV):
        if any(getattr(ma, k) != getattr(mb, k) for k in _SAME):
            return False
        if ma.kernel_size == mb.kernel_size and padding_of(ma) == padding_of(mb):
            w = ma.weight.double() + mb.weight.double()
            bias = _bias(ma) + _bias(mb)
        elif isinstance(ma, nn.Conv2d) and ma.padding_mode == "zeros" and not any(
            isinstance(m.padding, str) for m in (ma, mb)
        ):
            try:
                w, bias, pad = T.merge_parallel_kernels(
                    [(ma.weight.double(), _bias(ma), ma.padding), (mb.weight.double(), _bias(mb), mb.padding)])
            except NotExactError:
                return False
            ma.kernel_size, ma.padding = tuple(w.shape[-2:]), (pad, pad)
        else:
            return False
    else:
        w = ma.weight.double() + mb.weight.double()
        bias = _bias(ma) + _bias(mb)
    set_weights(ma, w.to(ma.weight.dtype), bias.to(ma.weight.dtype))
    node.replace_all_uses_with(a)
    graph = ctx.gm.graph
    graph.erase_node(node)
    graph.erase_node(b)
    ctx.folded.append((ctx.prefix + a.target, f"parallel {type(ma).__name__}+{type(mb).__name__}"))
    return True


def _bias(mod: nn.Module) -> torch.Tensor:
    return torch.zeros(mod.weight.shape[0], dtype=torch.float64) if mod.bias is None else mod.bias.double()
