"""The fold rules of the generic graph pass, each with its exactness checks.

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
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..errors import NotExactError
from . import transforms as T
from .graph_affine import AffineOp
from .graph_axes import CONV, MIXERS, NOT_THROUGH, is_plain_add, mixer_axis, through


@dataclass
class GraphCtx:
    """The graph being folded and what the rules need to know about its modules."""

    gm: fx.GraphModule
    prefix: str
    folded: list[tuple[str, str]] = field(default_factory=list)  # (path, kind)
    tied: set[int] = field(default_factory=set)  # ids of parameters owned twice

    def __post_init__(self) -> None:
        counts = Counter(id(p) for _, p in self.gm.named_parameters(remove_duplicate=False))
        self.tied = {i for i, n in counts.items() if n > 1}

    def mixer(self, node: fx.Node) -> nn.Module | None:
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


def _single_user(node: fx.Node) -> str | None:
    n = len(node.users)
    return None if n == 1 else f"{node.name} is used {n} times (e.g. a residual), not only by the fold"


def _erase(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and the constant-only nodes that fed only it."""
    inputs = list(node.all_input_nodes)
    graph.erase_node(node)
    for a in inputs:
        if not a.users and (a.op == "get_attr" or a.meta.get("const") is not None):
            _erase(graph, a)


def _set(mod: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    mod.weight = nn.Parameter(weight, requires_grad=mod.weight.requires_grad)
    mod.bias = nn.Parameter(bias, requires_grad=mod.weight.requires_grad)


def _padding(conv: nn.Module) -> list[int]:
    """Zero padding per side of a conv (0 for reflect/replicate/circular: they pad with data)."""
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return [0]
    if conv.padding == "same":
        return [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
    return list(conv.padding)


def fold_after(ctx: GraphCtx, op: AffineOp) -> str | None:
    """Linear/ConvNd → [pass-through]* → ``op``: scale and shift its output features."""
    if op.data is None or op.strip is not None:
        return "not an elementwise affine"
    chain, cur = [], op.data
    while ctx.mixer(cur) is None:
        if cur.op not in ("call_module", "call_function", "call_method") or not cur.args:
            return f"its input {cur.name} is not produced by a Linear/Conv"
        src = cur.args[0]
        if not isinstance(src, fx.Node) or through(cur, src, None, ctx.gm) is NOT_THROUGH:
            return f"its input comes from {cur.name}, not from a Linear/Conv"
        chain.insert(0, cur)
        cur = src
    for n in [cur, *chain]:
        if reason := _single_user(n):
            return reason
    if reason := ctx.private(cur):
        return reason
    mod = ctx.mixer(cur)
    axis = mixer_axis(mod, len(cur.meta["shape"]))
    for n in chain:
        axis = through(n, n.args[0], axis, ctx.gm)
        if axis is NOT_THROUGH:
            return f"the output features of {cur.target} do not pass through {n.name}"
    if op.axis is not None and op.axis != axis:
        return (f"it acts on axis {op.axis} but {ctx.prefix}{cur.target} writes features on axis {axis}")
    one = torch.ones((), dtype=torch.float64)
    w, b = T.fold_affine_after(mod.weight, mod.bias, one if op.scale is None else op.scale,
                               0 * one if op.shift is None else op.shift)
    _set(mod, w, b)
    graph = ctx.gm.graph
    if op.residual is not None:  # addcmul(r, p, x) -> r + x'
        with graph.inserting_before(op.node):
            new = graph.call_function(torch.add, (op.residual, op.data))
        new.meta.update(shape=op.node.meta["shape"], dtype=op.node.meta["dtype"])
        op.node.replace_all_uses_with(new)
    else:
        op.node.replace_all_uses_with(op.data)
    _erase(graph, op.node)
    ctx.folded.append((ctx.prefix + cur.target, f"{op.kind}->{type(mod).__name__}"))
    return None


def fold_before(ctx: GraphCtx, op: AffineOp) -> str | None:
    """``op`` → [pass-through]* → Linear/ConvNd: scale its input features, shift into its bias."""
    if op.residual is not None:
        return "a layer-scaled residual is not an affine of one tensor"
    axis, cur = op.axis, op.node
    while True:
        if reason := _single_user(cur):
            return reason
        user = next(iter(cur.users))
        if ctx.mixer(user) is not None:
            break
        axis = through(user, cur, axis, ctx.gm)
        if axis is NOT_THROUGH:
            return f"it feeds {user.name} ({user.op} {getattr(user.target, '__name__', user.target)}), not a Linear/Conv"
        cur = user
    if user.args[0] is not cur or len(user.all_input_nodes) != 1:
        return f"it is not the only input of {user.target}"
    if reason := ctx.private(user):
        return reason
    if op.strip is not None and sum(
        1 for n in ctx.gm.graph.nodes if n.op == "call_module" and n.target == op.node.target
    ) != 1:
        return f"{op.path} is called more than once"
    mod = ctx.mixer(user)
    want = mixer_axis(mod, len(cur.meta["shape"]))
    if axis is not None and axis != want:
        return f"it acts on axis {axis} but {ctx.prefix}{user.target} reads features on axis {want}"
    try:
        w, b = T.fold_affine_before(mod.weight, mod.bias, op.scale, op.shift,
                                    getattr(mod, "groups", 1), _padding(mod) if isinstance(mod, CONV) else 0)
    except NotExactError as e:
        return str(e)
    _set(mod, w, b)
    if op.strip is not None:
        op.strip()
    else:
        op.node.replace_all_uses_with(op.data)
        _erase(ctx.gm.graph, op.node)
    ctx.folded.append((op.path, f"{op.kind}->{type(mod).__name__}"))
    return None


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
    if a.kwargs or b.kwargs or any(_single_user(n) or ctx.private(n) for n in (a, b)):
        return False
    if ma.weight.shape[:2] != mb.weight.shape[:2] or a.meta.get("shape") != b.meta.get("shape"):
        return False
    if isinstance(ma, CONV):
        if any(getattr(ma, k) != getattr(mb, k) for k in _SAME):
            return False
        if ma.kernel_size == mb.kernel_size and _padding(ma) == _padding(mb):
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
    _set(ma, w.to(ma.weight.dtype), bias.to(ma.weight.dtype))
    node.replace_all_uses_with(a)
    graph = ctx.gm.graph
    graph.erase_node(node)
    graph.erase_node(b)
    ctx.folded.append((ctx.prefix + a.target, f"parallel {type(ma).__name__}+{type(mb).__name__}"))
    return True


def _bias(mod: nn.Module) -> torch.Tensor:
    return torch.zeros(mod.weight.shape[0], dtype=torch.float64) if mod.bias is None else mod.bias.double()
