"""Which axis is "the channel" of each tensor in an fx graph, and how ops move it.

The generic pass may fold a per-channel affine into a linear/conv only when the affine's
channel axis *is* the axis that linear/conv mixes (its input or output features). These
helpers answer that from the shapes recorded by :func:`graph_trace.annotate`:

- a linear reads/writes the last axis; a ConvNd reads/writes axis ``rank - N - 1``;
- BatchNorm and GroupNorm act on axis 1, LayerNorm((C,)) on the last axis;
- a per-channel constant is one whose broadcast shape is 1 everywhere but one axis;
- "pass-through" ops (views, permutes, means and average pools over other axes, einops
  rearranges, Identity/Dropout in eval) commute with a per-channel affine and carry its
  axis to a new position; anything else stops the search.

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


def per_channel(value: Tensor, shape: tuple[int, ...]) -> tuple[Axis, Tensor] | str:
    """Split a broadcast constant into (axis, vector); a reason string if it is not per-channel."""
    if value.dim() > len(shape):
        return f"constant of rank {value.dim()} broadcasts the tensor of rank {len(shape)} up"
    padded = (1,) * (len(shape) - value.dim()) + tuple(value.shape)
    if any(p not in (1, s) for p, s in zip(padded, shape)):
        return f"constant of shape {tuple(value.shape)} changes the shape {shape}"
    axes = [i for i, p in enumerate(padded) if p != 1]
    if not axes:
        return None, value.reshape(())
    if len(axes) > 1:
        return f"constant varies along axes {axes}, not along one channel axis"
    return axes[0], value.reshape(-1)


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
    if not node.args or node.args[0] is not src or sum(a is src for a in node.all_input_nodes) != 1:
        return NOT_THROUGH
    if list(node.all_input_nodes) != [src]:
        return NOT_THROUGH
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
        if type(mod).__module__.startswith("einops.") and type(mod).__name__ == "Rearrange":
            return axis if axis is None else _einops_axis(mod.pattern, axis, mod.axes_lengths)
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
    return NOT_THROUGH


def _is_shape_op(node: fx.Node) -> bool:
    """Ops that only move or average elements: commute with a scalar affine in any case."""
    tgt = node.target
    if node.op == "call_method":
        return tgt in _RESHAPES_M | {"permute", "transpose"} or (tgt == "mean" and len(node.args) + len(node.kwargs) > 1)
    return node.op == "call_function" and (
        tgt in _RESHAPES_F | {torch.permute, torch.transpose, F.adaptive_avg_pool2d, einops.rearrange}
        or (tgt is torch.mean and len(node.args) + len(node.kwargs) > 1)
    )


_TOKEN = re.compile(r"\(([^()]*)\)|(\S+)")


def _groups(side: str) -> list[list[str]]:
    return [(g.split() if g is not None else [s]) for g, s in ((m.group(1), m.group(2)) for m in _TOKEN.finditer(side))]


def _einops_axis(pattern: str, axis: int, lengths: dict) -> Axis | object:
    """Follow one input axis through an einops rearrange pattern (no ellipsis).

    The axis must be a single name on the left; on the right it may sit in a group only
    with names of length 1 (then the group's index is the new axis).
    """
    if "..." in pattern or "->" not in pattern:
        return NOT_THROUGH
    left, right = (_groups(s) for s in pattern.split("->"))
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
