"""Which axis is "the channel" of each tensor in an fx graph, and how ops move it.

The generic pass may fold a per-channel affine into a linear/conv only when the affine's
channel axis *is* the axis that linear/conv mixes (its input or output features). These
helpers answer that from the shapes recorded by :func:`graph_trace.annotate`:

- a linear reads/writes the last axis; a ConvNd reads/writes axis ``rank - N - 1``;
- BatchNorm and GroupNorm act on axis 1, LayerNorm((C,)) on the last axis;
- a per-channel constant is one whose broadcast shape is 1 everywhere but one axis;
- "pass-through" ops (views, flattens, permutes, basic indexing, means and average pools
  over other axes, einops rearranges and mean reductions, Identity/Dropout in eval) commute
  with a per-channel affine and carry its axis to a new position; anything else stops the
  search. A constant that varies along several axes (a bias table) moves axis by axis
  (:func:`move_const`);
- reads of a tensor's shape (``x.shape``, ``x.size()``) are not uses of its values.

An axis of ``None`` means a scalar affine: it commutes with every op listed here.
"""
from __future__ import annotations

import math
import operator
import re

import einops
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MIXERS = (nn.Linear, *CONV)
Axis = int | None
NOT_THROUGH = object()  # sentinel: the op does not commute with a per-channel affine


def mixer_axis(mod: nn.Module, rank: int) -> int:
    """The feature axis a Linear (last) or ConvNd (before the N spatial axes) mixes."""
    if isinstance(mod, nn.Linear):
        return rank - 1
    return rank - len(mod.kernel_size) - 1


def broadcast_const(value: Tensor, shape: tuple[int, ...]) -> Tensor | str:
    """``value`` as a float64 tensor of rank ``len(shape)`` (1 on the axes it is constant
    along) that broadcasts to ``shape``; a reason string if it would change the shape."""
    if value.dim() > len(shape):
        return f"constant of rank {value.dim()} broadcasts the tensor of rank {len(shape)} up"
    padded = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if any(p not in (1, s) for p, s in zip(padded, shape)):
        return f"constant of shape {tuple(value.shape)} changes the shape {shape}"
    return value.detach().to(torch.float64).reshape(padded)


def varying_axes(const: Tensor) -> list[int]:
    """The axes a broadcast constant varies along (size > 1)."""
    return [i for i, n in enumerate(const.shape) if n != 1]


def along(vec: Tensor, axis: Axis, rank: int) -> Tensor:
    """A per-channel vector (or scalar, axis None) as a broadcast constant of ``rank``."""
    shape = [1] * rank
    if axis is not None:
        shape[axis] = -1
    return vec.reshape(shape)


def move_const(node: fx.Node, src: fx.Node, const: Tensor | None, gm: fx.GraphModule) -> Tensor | None | object:
    """The broadcast constant ``const`` (in ``src``'s frame) in the frame of ``node``'s output,
    if ``node`` commutes with adding/multiplying it; :data:`NOT_THROUGH` otherwise.

    Each varying axis moves on its own (:func:`through`); they must land on distinct axes.
    ``None`` (no constant) passes every op :func:`through` passes for a scalar.
    """
    out_shape = node.meta.get("shape")
    axes = [] if const is None else varying_axes(const)
    if not axes:
        if out_shape is None or through(node, src, None, gm) is NOT_THROUGH:
            return NOT_THROUGH
        return None if const is None else const.reshape((1,) * len(out_shape))
    new = [through(node, src, a, gm) for a in axes]
    if any(j is NOT_THROUGH for j in new) or len(set(new)) != len(new):
        return NOT_THROUGH
    sizes = [const.shape[a] for a in axes]
    if any(out_shape[j] != n for j, n in zip(new, sizes)):
        return NOT_THROUGH
    order = sorted(range(len(axes)), key=lambda i: new[i])  # the varying axes in their new order
    shape = [1] * len(out_shape)
    for j, n in zip(new, sizes):
        shape[j] = n
    return const.reshape(sizes).permute(order).reshape(shape)


_SIZE_ATTRS = {"shape"}
_SIZE_METHODS = {"size", "dim", "numel"}
_SIZE_ARITH = {operator.getitem, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
               operator.neg}


def is_size_expr(node: fx.Node) -> bool:
    """``node`` computes from tensor shapes only (``x.shape[0]``, ``x.size(1) * 2``), never from values."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SIZE_ATTRS
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    if node.op == "call_function" and node.target in _SIZE_ARITH:
        return all(is_size_expr(a) for a in node.all_input_nodes) and "shape" not in node.meta
    return False


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (shape reads do not: folds keep every shape)."""
    return [u for u in node.users if not is_size_expr(u)]


def _norm_dims(dims, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % rank for d in dims]


def _reshape_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> Axis | object:
    """Where axis ``axis`` of ``src`` lands after a row-major reshape to ``dst``.

    It survives intact iff some output axis j has the same size and the same product of
    sizes before it (then also after it): element (pre, c, post) keeps its c.
    """
    pre = math.prod(src[:axis])
    for j in range(len(dst)):
        if dst[j] == src[axis] and math.prod(dst[:j]) == pre:
            return j
    return NOT_THROUGH


_RESHAPES_F = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
_RESHAPES_M = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous"}


def through(node: fx.Node, src: fx.Node, axis: Axis, gm: fx.GraphModule) -> Axis | object:
    """The channel axis after ``node`` if ``node`` commutes with a per-channel affine on ``src``.

    ``src`` must be the op's only data input (first argument, used once); returns
    :data:`NOT_THROUGH` otherwise.
    """
    if not node.args or node.args[0] is not src:
        return NOT_THROUGH
    if any(a is not src and not is_size_expr(a) for a in node.all_input_nodes):
        return NOT_THROUGH  # another tensor enters the op
    in_shape, out_shape = src.meta.get("shape"), node.meta.get("shape")
    if in_shape is None or out_shape is None:
        return NOT_THROUGH
    rank, op, tgt = len(in_shape), node.op, node.target
    if op == "call_module":
        mod = gm.get_submodule(tgt)
        if isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return axis
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            # averages with weights summing to 1 over the trailing spatial axes
            nsp = int(type(mod).__name__[-2])
            return axis if axis is None or axis < rank - nsp else NOT_THROUGH
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            nsp = int(type(mod).__name__[-2])
            pads = [mod.padding] if isinstance(mod.padding, int) else list(mod.padding)
            plain = all(p == 0 for p in pads) and not mod.ceil_mode and getattr(mod, "divisor_override", None) is None
            return axis if plain and (axis is None or axis < rank - nsp) else NOT_THROUGH
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return None if axis is None else _reshape_axis(in_shape, out_shape, axis)
        if type(mod).__module__.startswith("einops."):
            name = type(mod).__name__
            if name == "Rearrange" or (name == "Reduce" and mod.reduction == "mean"):
                return _einops_axis(mod.pattern, axis, mod.axes_lengths)
        return NOT_THROUGH
    if axis is None and _is_shape_op(node):
        return None
    if (op == "call_function" and tgt in _RESHAPES_F) or (op == "call_method" and tgt in _RESHAPES_M):
        return _reshape_axis(in_shape, out_shape, axis)
    if (op == "call_function" and tgt is torch.permute) or (op == "call_method" and tgt == "permute"):
        dims = node.args[1] if len(node.args) == 2 and not isinstance(node.args[1], int) else node.args[1:]
        dims = node.kwargs.get("dims", dims)
        return _norm_dims(dims, rank).index(axis)
    if (op == "call_function" and tgt is torch.transpose) or (op == "call_method" and tgt == "transpose"):
        d0, d1 = _norm_dims(node.args[1:3], rank)
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if (op == "call_function" and tgt is torch.mean) or (op == "call_method" and tgt == "mean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or node.kwargs.get("dtype") is not None:
            return NOT_THROUGH  # a mean over everything mixes the channels
        dims = _norm_dims(dims, rank)
        if axis in dims:
            return NOT_THROUGH
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return axis if keep else axis - sum(d < axis for d in dims)
    if op == "call_function" and tgt is F.adaptive_avg_pool2d:
        return axis if axis < rank - 2 else NOT_THROUGH
    if op == "call_function" and tgt is einops.rearrange and isinstance(node.args[1], str):
        return _einops_axis(node.args[1], axis, node.kwargs)
    if op == "call_function" and tgt is einops.reduce and len(node.args) >= 3 and node.args[2] == "mean":
        return _einops_axis(node.args[1], axis, node.kwargs)  # a mean over the names that disappear
    if op == "call_function" and tgt is operator.getitem:
        return _index_axis(node.args[1], in_shape, axis)
    return NOT_THROUGH


def _index_axis(index, shape: tuple[int, ...], axis: Axis) -> Axis | object:
    """Basic indexing by ints and slices: axes indexed by an int disappear; the channel axis
    itself must be taken whole (a per-channel constant then indexes along with the data)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(i, (int, slice)) and not isinstance(i, bool) for i in index):
        return NOT_THROUGH  # None, Ellipsis, tensors, lists: not followed
    if axis is None:
        return None
    if axis < len(index):
        i = index[axis]
        if isinstance(i, int) or range(shape[axis])[i] != range(shape[axis]):
            return NOT_THROUGH
    return axis - sum(isinstance(i, int) for i in index[:axis])


def _is_shape_op(node: fx.Node) -> bool:
    """Ops that only move or average elements: commute with a scalar affine in any case."""
    tgt = node.target
    if node.op == "call_method":
        return (tgt in _RESHAPES_M | {"permute", "transpose"}
                or (tgt == "mean" and len(node.args) + len(node.kwargs) > 1))
    return node.op == "call_function" and (
        tgt in _RESHAPES_F | {torch.permute, torch.transpose, F.adaptive_avg_pool2d, einops.rearrange}
        or (tgt is torch.mean and len(node.args) + len(node.kwargs) > 1)
    )


_TOKEN = re.compile(r"\(([^()]*)\)|(\S+)")


def _groups(side: str) -> list[list[str]]:
    return [(g.split() if g is not None else [s]) for g, s in ((m.group(1), m.group(2)) for m in _TOKEN.finditer(side))]


def _einops_axis(pattern: str, axis: Axis, lengths: dict) -> Axis | object:
    """Follow one input axis through an einops rearrange/reduce pattern (no ellipsis).

    The axis must be a single name on the left; on the right it may sit in a group only
    with names of length 1 (then the group's index is the new axis). A name missing on the
    right is reduced over: the channel axis must not be. ``axis`` None: any valid pattern.
    """
    if "..." in pattern or "->" not in pattern:
        return NOT_THROUGH
    left, right = (_groups(s) for s in pattern.split("->"))
    if axis is None:
        return None
    if axis >= len(left) or len(left[axis]) != 1:
        return NOT_THROUGH
    name = left[axis][0]
    for j, grp in enumerate(right):
        if name in grp:
            others = [n for n in grp if n != name]
            return j if all(lengths.get(n) == 1 or n == "1" for n in others) else NOT_THROUGH
    return NOT_THROUGH


def is_plain_add(node: fx.Node) -> bool:
    """``a + b`` between two tensors (no alpha, no in-place)."""
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target == "add" and len(node.args) == 2 and not node.kwargs
