"""Tracing for the generic graph pass: torch.fx with per-submodule fallback to leaves.

A model from another library may contain code fx cannot trace (data-dependent control
flow, ``torch.roll`` by a Python int taken from a shape, third-party tensor libraries).
:func:`trace_with_leaves` traces the whole model; when tracing fails it marks the
innermost submodule whose ``forward`` was running as a leaf (an opaque ``call_module``
node) and retries, so one bad block never stops the rest of the model from folding.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import einops
import torch
import torch.fx as fx
from torch import Tensor, nn


class RootNotTraceable(Exception):
    """The root module's own ``forward`` (not a submodule's) cannot be traced."""


class _LeafTracer(fx.Tracer):
    """fx tracer with extra leaves; records the innermost module whose trace raised.

    einops functions are auto-wrapped (recorded as ``call_function`` nodes instead of
    traced into, which fails on proxies); einops layers are leaves for the same reason.
    """

    def __init__(self, leaves: set[str]):
        super().__init__(autowrap_modules=(math, einops))
        self.leaves = leaves
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves or type(m).__module__.startswith("einops."):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # innermost frame sees the exception first
                self.failed_at = self.path_of_module(m)
            raise


def trace_with_leaves(root: nn.Module) -> tuple[fx.Graph, dict[str, str]]:
    """Trace ``root``; returns the graph and {submodule path: why it was made a leaf}.

    Raises :class:`RootNotTraceable` when ``root.forward`` itself fails to trace.
    """
    failed: dict[str, str] = {}
    for _ in range(sum(1 for _ in root.modules()) + 1):
        tracer = _LeafTracer(set(failed))
        try:
            return tracer.trace(root), failed
        except Exception as e:  # any trace failure: fall back to a leaf and retry
            where = tracer.failed_at
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not where or where in failed:
                raise RootNotTraceable(reason) from e
            failed[where] = reason
    raise RootNotTraceable("tracing did not converge")


def capture_inputs(
    root: nn.Module, paths: list[str], args: tuple, kwargs: dict
) -> dict[str, tuple[tuple, dict] | str]:
    """Run ``root`` once and record the inputs of each submodule in ``paths``.

    Returns path -> (args, kwargs) of its call, or a reason string when it was never
    called or was called with inputs of different shapes (one set of shapes is needed to
    know each tensor's channel axis).
    """
    seen: dict[str, list] = {p: [] for p in paths}
    hooks = []
    for p in paths:
        def hook(mod, a, kw, p=p):
            seen[p].append((a, kw))
        hooks.append(root.get_submodule(p).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            root(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, tuple[tuple, dict] | str] = {}
    for p, calls in seen.items():
        sigs = {_shapes(c) for c in calls}
        if not calls:
            out[p] = "never called on the example input"
        elif len(sigs) > 1:
            out[p] = "called with inputs of different shapes"
        else:
            out[p] = calls[0]
    return out


def _shapes(call: tuple[tuple, dict]) -> tuple:
    flat, _ = torch.utils._pytree.tree_flatten(call)
    return tuple(tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in flat)


def placeholder_values(module: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The values of ``forward``'s parameters in order (fx placeholders follow the signature)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


# Ops whose result is a constant when all inputs are constants (parameters, buffers, numbers):
# shape plumbing and elementwise arithmetic, never anything random or stateful.
_CONST_FUNCS = {
    operator.getitem, operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.transpose, torch.permute,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.exp,
}
_CONST_METHODS = {
    "view", "reshape", "unsqueeze", "squeeze", "flatten", "transpose", "permute", "contiguous",
    "expand", "mul", "add", "sub", "div", "neg", "exp", "t",
}


def annotate(gm: fx.GraphModule, inputs: list[Any]) -> None:
    """Run ``gm`` once; store each tensor node's shape/dtype and the value of constant nodes.

    ``node.meta["shape"]``, ``node.meta["dtype"]``; ``node.meta["const"]`` for nodes that
    depend only on parameters/buffers through the ops above (e.g. ``self.ls.view(1, -1, 1)``).
    """
    const: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n)
        elif (n.op == "call_function" and n.target in _CONST_FUNCS) or (
            n.op == "call_method" and n.target in _CONST_METHODS
        ):
            if n.all_input_nodes and all(a in const for a in n.all_input_nodes):
                const.add(n)

    class _Annotator(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, Tensor):
                n.meta["shape"], n.meta["dtype"] = tuple(result.shape), result.dtype
                if n in const:
                    n.meta["const"] = result.detach()
            return result

    with torch.no_grad():
        _Annotator(gm).run(*inputs)
