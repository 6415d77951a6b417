"""Rules that move an affine forward to merge it with the next one (generic graph pass).

- :func:`merge_next`: ``A`` → [pass-through]* → ``B`` (two affines of the same values) -> one
  affine, e.g. deit's ``alpha * x + beta`` written as two ops, or an Affine before a layer-scale.
- :func:`push_through_mixer`: ``A`` → [pass-through]* → a Linear / pointwise Conv that mixes
  *another* axis (ResMLP's token linear: A acts on channels, the linear on tokens) →
  [pass-through]* → ``B``. The scale commutes with the linear (``W (s ⊙ x) = s ⊙ (W x)``), the
  shift and the linear's bias become a bias table (``W t + b``), and all of it merges into
  ``B`` (the layer-scale that follows). Applied only when it leaves fewer constants than
  ``A`` and ``B`` had: pushing an affine through alone (Mixer's LN1 before a GELU) would add work.

Both remove ``A`` (a norm module loses its affine) and rewrite ``B`` as one emitted affine.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import NotExactError
from . import transforms as T
from .graph_affine import AffineOp, affine_of
from .graph_axes import CONV, mixer_axis
from .graph_edit import (
    Carried,
    GraphCtx,
    Inapplicable,
    carry,
    describe,
    emit_affine,
    only_user,
    replace,
    single_user,
    trivial,
)
from .graph_rules import removable, remove


def _start(ctx: GraphCtx, op: AffineOp) -> Carried | str:
    """``op``'s constants carried forward from its single use."""
    if op.residual is not None:
        return "a layer-scaled residual is not an affine of one tensor"
    if reason := single_user(op.node) or removable(ctx, op):
        return reason
    return carry(ctx, op.node, only_user(op.node), [op.scale, op.shift])


def _next_affine(ctx: GraphCtx, got: Carried) -> AffineOp | str:
    nxt = affine_of(got.end, ctx.gm, ctx.prefix)
    if not isinstance(nxt, AffineOp) or nxt.data is not got.last or nxt.strip is not None:
        return Inapplicable(f"it then feeds {describe(ctx, got.end)}, not an affine to merge with")
    return nxt


def _rewrite(ctx: GraphCtx, op: AffineOp, got: Carried, nxt: AffineOp, scale: Tensor | None,
             shift: Tensor | None) -> None:
    """Remove ``op``; ``nxt`` becomes ``scale * x + shift`` of the values it read."""
    rest = remove(ctx, op)  # what carries op's input now
    data = rest if got.last is op.node else got.last
    origin = ",".join(dict.fromkeys(op.path.split(",") + nxt.path.split(",")))
    replace(ctx, nxt.node, emit_affine(ctx, nxt.node, data, scale, shift, origin, residual=nxt.residual))


def merge_next(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``op`` → [pass-through]* → affine: ``s2 (s1 x + t1) + t2`` as one affine."""
    got = _start(ctx, op)
    if isinstance(got, str):
        return got
    nxt = _next_affine(ctx, got)
    if isinstance(nxt, str):
        return nxt
    _rewrite(ctx, op, got, nxt, *T.compose_affines(*got.consts, nxt.scale, nxt.shift))
    ctx.folded.append((op.path, f"{op.kind}->{nxt.kind} (merged)"))
    return None


def _as_linear(mod: nn.Module) -> Tensor | str:
    """The (O, C) matrix a Linear or a pointwise conv applies along its feature axis."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if isinstance(mod, CONV):
        pointwise = all(k == 1 for k in mod.kernel_size) and all(s == 1 for s in mod.stride)
        if not pointwise or not (mod.padding == "valid" or all(p == 0 for p in mod.padding)):
            return f"{type(mod).__name__} with kernel {mod.kernel_size}, stride {mod.stride}, padding " \
                   f"{mod.padding} mixes positions too"
        return T.pointwise_conv_as_linear(mod.weight, mod.groups)
    return f"{type(mod).__name__} is not a Linear/Conv"


def push_through_mixer(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``op`` → Linear/pointwise Conv on another axis → affine: the scale commutes, the shift
    becomes a bias table, and both merge into the affine after the linear."""
    got = _start(ctx, op)
    if isinstance(got, str):
        return got
    m = got.end
    mod = ctx.mixer(m)
    if mod is None:
        return Inapplicable(f"it feeds {describe(ctx, m)}, not a Linear/Conv")
    if m.args[0] is not got.last or len(m.all_input_nodes) != 1 or m.kwargs:
        return f"it is not the only input of {m.target}"
    weight = _as_linear(mod)
    if isinstance(weight, str):
        return weight
    if reason := ctx.private(m) or single_user(m):
        return reason
    rank = len(got.last.meta["shape"])
    try:
        scale, table = T.affine_through_linear(weight, mod.bias, *got.consts, mixer_axis(mod, rank), rank)
    except NotExactError as e:
        return f"through {ctx.prefix}{m.target}: {e}"
    after = carry(ctx, m, only_user(m), [scale, table])
    if isinstance(after, str):
        return after
    nxt = _next_affine(ctx, after)
    if isinstance(nxt, str):
        return f"after {describe(ctx, m)} {nxt} (pushed through alone it would add a bias table, no constant less)"
    s, t = trivial(*T.compose_affines(*after.consts, nxt.scale, nxt.shift))
    if (s is not None) + (t is not None) >= op.n_constants() + nxt.n_constants():
        return f"pushed through {ctx.prefix}{m.target} it would leave as many constants as it removes"
    mod.register_parameter("bias", None)  # now a part of the table
    _rewrite(ctx, op, after, nxt, s, t)
    ctx.folded.append((op.path, f"{op.kind}->{nxt.kind} (through {type(mod).__name__} {ctx.prefix}{m.target})"))
    return None
