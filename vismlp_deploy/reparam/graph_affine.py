"""Recognise affine nodes in an fx graph: ``y = s * x + t`` with constant ``s``, ``t``.

Sources: eval-mode BatchNorm (axis 1), LayerNorm((C,)) / GroupNorm affines (last axis /
axis 1, folded by stripping the affine from the norm), and elementwise ops with a
constant operand: ``x * p``, ``x + p``, ``x - p``, ``p - x``, ``x / p``,
``torch.addcmul(p0, p1, x)`` (ResMLP's Affine), and ``torch.addcmul(r, p, x)`` = ``r + p*x``
(a layer-scaled residual: only the ``p*x`` part is an affine of ``x``).

``s`` and ``t`` are kept as float64 broadcast constants of the tensor's rank: a per-channel
affine varies along one axis, a bias table (a shift pushed through token mixing) along two.
:func:`emit_affine` writes such an affine back into the graph in the forms recognised here.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..errors import NotExactError
from . import transforms as T
from .graph_axes import Axis, along, broadcast_const, varying_axes


@dataclass
class AffineOp:
    """One affine node. ``data`` is None when the affine is inside a norm module.

    ``scale``/``shift``: float64 constants of the node's rank that broadcast to its shape
    (None: 1 / 0).
    """

    node: fx.Node
    data: fx.Node | None
    scale: Tensor | None
    shift: Tensor | None
    kind: str
    path: str
    strip: Callable[[], None] | None = None  # removes the affine from a norm module
    residual: fx.Node | None = None  # addcmul(r, p, x): the node becomes r + x after the fold

    @property
    def axes(self) -> list[int]:
        """The axes the constants vary along (empty: a scalar affine)."""
        return sorted({a for c in (self.scale, self.shift) if c is not None for a in varying_axes(c)})

    @property
    def axis(self) -> Axis:
        """The channel axis of a per-channel affine (None: scalar); see :meth:`not_per_channel`."""
        return self.axes[0] if self.axes else None

    def not_per_channel(self) -> str | None:
        """Why this is not a per-channel affine (None: it is, or a scalar one)."""
        if len(self.axes) <= 1:
            return None
        return (f"its constants vary along axes {self.axes} (a bias table): no Linear/Conv bias holds a table, "
                "and a scale that differs per channel cannot enter a linear shared by all channels")

    def vector(self, const: Tensor | None) -> Tensor | None:
        """A constant of a per-channel affine as a 1-D vector (length 1 for a scalar)."""
        return None if const is None else const.reshape(-1)

    def n_constants(self) -> int:
        """How many non-trivial constants the op applies (a scale of ones and a zero shift are none)."""
        return int(self.scale is not None and not bool((self.scale == 1).all())) + int(
            self.shift is not None and bool(self.shift.any()))


_MUL = ({operator.mul, torch.mul}, "mul")
_ADD = ({operator.add, torch.add}, "add")
_SUB = ({operator.sub, torch.sub}, "sub")
_DIV = ({operator.truediv, torch.div}, "div")


def _is(node: fx.Node, spec) -> bool:
    funcs, method = spec
    return (node.op == "call_function" and node.target in funcs) or (node.op == "call_method" and node.target == method)


def _const(arg, like: fx.Node) -> Tensor | None:
    """Constant value of an argument (constant node or Python number), else None."""
    if isinstance(arg, fx.Node):
        return arg.meta.get("const")
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=torch.float64)
    return None


def _attr_path(arg, prefix: str) -> list[str]:
    """The parameter/buffer names a constant argument is computed from (for a constant a
    rule emitted: the paths of the modules/parameters it was merged from)."""
    if not isinstance(arg, fx.Node):
        return []
    if "origin" in arg.meta:
        return arg.meta["origin"].split(",")
    if arg.op == "get_attr":
        return [prefix + arg.target]
    return [p for a in arg.all_input_nodes for p in _attr_path(a, prefix)]


def _join(paths: list[str]) -> str:
    return ",".join(dict.fromkeys(paths))  # de-duplicated, in order


def affine_of(node: fx.Node, gm: fx.GraphModule, prefix: str) -> AffineOp | str | None:
    """The affine ``node`` computes (per channel, scalar or with bias tables); a reason string
    if it is an affine-like op that cannot be written so; None if it is not a candidate at all."""
    if "shape" not in node.meta or node.meta.get("const") is not None:
        return None
    if node.op == "call_module":
        return _norm_affine(node, gm.get_submodule(node.target), prefix)
    if node.op not in ("call_function", "call_method"):
        return None
    args, kw = list(node.args), dict(node.kwargs)
    if node.target in (torch.addcmul, "addcmul"):
        return _addcmul(node, args, kw, prefix)
    for spec in (_MUL, _ADD, _SUB, _DIV):
        if _is(node, spec):
            break
    else:
        return None
    if len(args) != 2:
        return None
    extra = {k: v for k, v in kw.items() if not (k == "alpha" and spec is not _MUL and spec is not _DIV)}
    if extra:
        return "op with extra arguments " + ", ".join(extra)
    a, b = args
    ca, cb = _const(a, node), _const(b, node)
    if (ca is None) == (cb is None):
        return None  # tensor-tensor or constant-constant: not an affine of one tensor
    data, c, data_first = (a, cb, True) if ca is None else (b, ca, False)
    if not isinstance(data, fx.Node):
        return None
    alpha = float(kw.get("alpha", 1.0))
    one = torch.tensor(1.0, dtype=torch.float64)
    if spec is _MUL:
        scale, shift = c, None
    elif spec is _ADD:
        scale, shift = None, c * alpha
    elif spec is _SUB:
        scale, shift = (None, -c * alpha) if data_first else (-one * alpha, c)
    else:
        if not data_first or kw.get("rounding_mode") is not None:
            return None
        scale, shift = 1.0 / c.double(), None
    path = _join(_attr_path(b if data_first else a, prefix)) or node.name
    return _build(node, data, scale, shift, spec[1], path)


def _addcmul(node: fx.Node, args: list, kw: dict, prefix: str) -> AffineOp | str | None:
    """``addcmul(input, t1, t2, value=v) = input + v * t1 * t2`` with exactly one data factor."""
    if len(args) != 3 or set(kw) - {"value"}:
        return None
    inp, t1, t2 = args
    v = float(kw.get("value", 1.0))
    c1, c2 = _const(t1, node), _const(t2, node)
    if (c1 is None) == (c2 is None):
        return None
    data, c, carg = (t2, c1, t1) if c2 is None else (t1, c2, t2)
    if not isinstance(data, fx.Node):
        return None
    paths = _attr_path(carg, prefix)
    path = _join(paths) or node.name
    cin = _const(inp, node)
    if cin is not None:  # beta + alpha * x: a full affine of x
        return _build(node, data, c * v, cin, "addcmul", _join([*paths, *_attr_path(inp, prefix)]))
    if not isinstance(inp, fx.Node) or inp.meta.get("shape") != node.meta["shape"]:
        return None
    op = _build(node, data, c * v, None, "addcmul", path)
    if isinstance(op, AffineOp):
        op.residual = inp
    return op


def _build(node, data, scale, shift, kind, path) -> AffineOp | str:
    shape, dtype = data.meta.get("shape"), data.meta.get("dtype")
    if shape is None or node.meta["shape"] != shape:
        return "the op broadcasts its input to a new shape"
    if node.meta["dtype"] != dtype or not dtype.is_floating_point:
        return f"the op changes the dtype {dtype} -> {node.meta['dtype']}"
    consts = []
    for c in (scale, shift):
        c = None if c is None else broadcast_const(c, shape)
        if isinstance(c, str):
            return c
        consts.append(c)
    op = AffineOp(node, data, consts[0], consts[1], kind, path)
    if any("origin" in a.meta for a in node.all_input_nodes):  # emitted by a rule: say what it is
        op.kind = "+".join(n for n, c in (("scale", op.scale), ("shift", op.shift)) if c is not None)
        op.kind = ("per-channel " if len(op.axes) <= 1 else "bias-table ") + op.kind
    return op


def _norm_affine(node: fx.Node, mod: nn.Module, prefix: str) -> AffineOp | str | None:
    path = prefix + node.target
    data = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = data.meta.get("shape") if data is not None else None
    if data is None or shape is None or len(node.args) != 1 or node.kwargs:
        return None
    kind = type(mod).__name__
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.training:
            return "BatchNorm in training mode"
        if len(shape) < 2:
            return "BatchNorm on an unbatched tensor"
        try:
            s, t = T.bn_scale_shift(mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps)
        except NotExactError as e:
            return str(e)
        return AffineOp(node, data, along(s, 1, len(shape)), along(t, 1, len(shape)), kind, path)
    if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
        if len(mod.normalized_shape) != 1:
            return f"LayerNorm over {len(mod.normalized_shape)} axes: its affine is not per-channel"
        def strip_ln(mod=mod):
            mod.weight, mod.bias, mod.elementwise_affine = None, None, False
        return AffineOp(node, None, _along(mod.weight, -1, shape), _along(mod.bias, -1, shape), kind + ".affine",
                        path, strip_ln)
    if isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        def strip_gn(mod=mod):
            mod.weight, mod.bias, mod.affine = None, None, False
        return AffineOp(node, None, _along(mod.weight, 1, shape), _along(mod.bias, 1, shape), kind + ".affine",
                        path, strip_gn)
    return None


def _along(vec: Tensor | None, axis: int, shape: tuple[int, ...]) -> Tensor | None:
    return None if vec is None else along(vec.detach().to(torch.float64), axis % len(shape), len(shape))
