"""Graph surgery shared by the fold rules: who owns what, single use, carrying constants, new nodes.

- :class:`GraphCtx`: the graph being folded; whether a Linear/Conv may be rewritten
  (:meth:`GraphCtx.private`); new constants (:meth:`GraphCtx.constant`).
- :func:`single_user`: the one check behind every removed intermediate (shape reads such as
  ``x.shape[0]`` are not uses: no fold changes a shape).
- :func:`carry`: follow broadcast constants forward along pass-through ops from an edge.
- :func:`emit_affine`: write ``s * x + t`` (or ``r + s * x + t``) back as nodes that
  :func:`graph_affine.affine_of` recognises, so the rules compose to a fixed point.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn

from .graph_axes import MIXERS, NOT_THROUGH, move_const, value_users


@dataclass
class GraphCtx:
    """The graph being folded and what the rules need to know about its modules."""

    gm: fx.GraphModule
    prefix: str
    folded: list[tuple[str, str]] = field(default_factory=list)  # (path, kind)
    tied: set[int] = field(default_factory=set)  # ids of parameters owned twice
    _names: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        counts = Counter(id(p) for _, p in self.gm.named_parameters(remove_duplicate=False))
        self.tied = {i for i, n in counts.items() if n > 1}

    def mixer(self, node: fx.Node) -> nn.Module | None:
        """The Linear/ConvNd ``node`` calls, if it calls one."""
        if node.op != "call_module":
            return None
        mod = self.gm.get_submodule(node.target)
        return mod if isinstance(mod, MIXERS) else None

    def private(self, node: fx.Node) -> str | None:
        """Why the module called by ``node`` must not be rewritten (None: it may)."""
        calls = sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == node.target)
        if calls != 1:
            return f"module {self.prefix}{node.target} is called {calls} times in the graph"
        mod = self.gm.get_submodule(node.target)
        if any(id(p) in self.tied for p in mod.parameters()):
            return f"module {self.prefix}{node.target} shares parameters with another module"
        pre = node.target + "."
        if any(n.op == "get_attr" and n.target.startswith(pre) for n in self.gm.graph.nodes):
            return f"parameters of {self.prefix}{node.target} are also read directly"
        return None

    def constant(self, value: Tensor, dtype: torch.dtype, origin: str) -> fx.Node:
        """A new parameter holding ``value`` (float64, cast once to ``dtype``) and its get_attr node.

        The node keeps the float64 value (``meta["const"]``) so that later folds start from it,
        and ``origin`` (the comma-separated paths it was computed from) for the report.
        """
        base = re.sub(r"\W+", "_", origin.split(",")[0]).strip("_")[:48] or "affine"
        self._names[base] += 1
        name = f"{base}_folded{self._names[base]}"
        while hasattr(self.gm, name):
            self._names[base] += 1
            name = f"{base}_folded{self._names[base]}"
        self.gm.register_parameter(name, nn.Parameter(value.to(dtype), requires_grad=False))
        node = self.gm.graph.get_attr(name)
        node.meta.update(shape=tuple(value.shape), dtype=dtype, const=value, origin=origin)
        return node


class Inapplicable(str):
    """A rule's reason that only says its pattern does not start here (left out of the report
    when another rule gives a reason that does)."""


def describe(ctx: GraphCtx, node: fx.Node) -> str:
    """``node`` for a reader: the module path and type, or the function name."""
    if node.op == "call_module":
        return f"{ctx.prefix}{node.target} ({type(ctx.gm.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the output"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def single_user(node: fx.Node, ctx: GraphCtx | None = None) -> str | None:
    users = value_users(node)
    if len(users) == 1:
        return None
    names = f" ({', '.join(describe(ctx, u) for u in users)})" if ctx is not None else ""
    return f"its result is used {len(users)} times{names}, not only by the fold"


def only_user(node: fx.Node) -> fx.Node:
    return value_users(node)[0]


def erase(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the constant-only nodes that fed only it."""
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for a in inputs:
        if not a.users and (a.op == "get_attr" or a.meta.get("const") is not None):
            erase(graph, a)


def set_weights(mod: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    mod.weight = nn.Parameter(weight, requires_grad=mod.weight.requires_grad)
    if bias is None:
        mod.register_parameter("bias", None)
    else:
        mod.bias = nn.Parameter(bias, requires_grad=mod.weight.requires_grad)


@dataclass
class Carried:
    """Constants followed forward: they now describe ``last``, whose one value user is ``end``."""

    chain: list[fx.Node]  # the pass-through nodes crossed
    last: fx.Node
    end: fx.Node
    consts: list[Tensor | None]


def carry(ctx: GraphCtx, src: fx.Node, user: fx.Node, consts: list[Tensor | None]) -> Carried | str:
    """Move ``consts`` (broadcast constants in ``src``'s frame) from the edge ``src -> user``
    through pass-through ops, each used once, up to the first op they do not pass."""
    chain, last, nxt = [], src, user
    while ctx.mixer(nxt) is None:
        moved = [move_const(nxt, last, c, ctx.gm) for c in consts]
        if any(m is NOT_THROUGH for m in moved):
            break
        if reason := single_user(nxt):
            return reason
        chain.append(nxt)
        last, nxt, consts = nxt, only_user(nxt), moved
    return Carried(chain, last, nxt, consts)


def trivial(scale: Tensor | None, shift: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Drop a scale of ones and a shift of zeros (exactly: ``1 * x == x``, ``x + 0 == x``)."""
    return (None if scale is None or bool((scale == 1).all()) else scale,
            None if shift is None or not bool(shift.any()) else shift)


def emit_affine(ctx: GraphCtx, before: fx.Node, data: fx.Node, scale: Tensor | None, shift: Tensor | None,
                origin: str, residual: fx.Node | None = None) -> fx.Node:
    """Nodes computing ``[residual +] scale * data + shift``, inserted before ``before``.

    ``scale``/``shift``: float64 broadcast constants (None: 1 / 0). Forms:
    ``addcmul(t, s, x)``, ``mul(x, s)``, ``add(x, t)``; with a residual ``addcmul(r, s, x)``
    or ``add(r, ...)``. Returns ``data`` itself when nothing is left to apply.
    """
    scale, shift = trivial(scale, shift)
    graph, meta = ctx.gm.graph, {"shape": data.meta["shape"], "dtype": data.meta["dtype"]}
    dtype = meta["dtype"]

    def call(fn, args):
        n = graph.call_function(fn, args)
        n.meta.update(meta)
        return n

    with graph.inserting_before(before):
        s = None if scale is None else ctx.constant(scale, dtype, origin)
        t = None if shift is None else ctx.constant(shift, dtype, origin)
        if residual is not None and t is None:
            return call(torch.addcmul, (residual, s, data)) if s is not None else call(torch.add, (residual, data))
        if s is not None and t is not None:
            out = call(torch.addcmul, (t, s, data))
        elif s is not None:
            out = call(torch.mul, (data, s))
        elif t is not None:
            out = call(torch.add, (data, t))
        else:
            out = data
        return out if residual is None else call(torch.add, (residual, out))


def replace(ctx: GraphCtx, old: fx.Node, new: fx.Node) -> None:
    """Point every user of ``old`` at ``new`` and erase ``old`` (and constants only it used)."""
    old.replace_all_uses_with(new)
    erase(ctx.gm.graph, old)
