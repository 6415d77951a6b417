"""The one recursive walker: ``reparameterize(model)`` -> deploy model with a report.

Post-order: children are converted first, so a parent's ``reparameterize`` sees the
deploy forms of its children (plain convs/linears), which are the easiest to fold into.
A module's ``reparameterize(ctx)`` returns its replacement (or itself) and records what it
folded through ``ctx``; if it raises :class:`NotExactError` the module is kept as it was
and the reason goes into the report. The input model is never mutated.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import NotExactError, UserError
from .report import Left, ReparamReport, count_flops, count_params


@runtime_checkable
class Reparameterizable(Protocol):
    """A module that knows its own exact deploy form."""

    def reparameterize(self, ctx: ReparamContext) -> nn.Module: ...


@dataclass
class ReparamContext:
    """Handed to each ``reparameterize``: where the module sits and where to report."""

    report: ReparamReport
    path: str = ""

    def child(self, name: str) -> ReparamContext:
        return ReparamContext(self.report, self._join(name))

    def folded(self, kind: str, what: str = "") -> None:
        """Record one exact fold, e.g. ``ctx.folded("BatchNorm2d->Conv2d", "ffn.fc1")``."""
        self.report.folded[kind] += 1
        self.report.folded_paths.append((self._join(what), kind))

    def left(self, what: str, kind: str, reason: str) -> None:
        """Record a module left in place and why (a fold that is not exact)."""
        self.report.left.append(Left(self._join(what), kind, reason))

    def _join(self, what: str) -> str:
        return ".".join(p for p in (self.path, what) if p)


def _walk(module: nn.Module, ctx: ReparamContext) -> nn.Module:
    for name, child in list(module.named_children()):
        new = _walk(child, ctx.child(name))
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, Reparameterizable):
        try:
            return module.reparameterize(ctx)
        except NotExactError as e:
            ctx.left("", type(module).__name__, str(e))
    return module


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _report_remaining_norms(deploy: nn.Module, report: ReparamReport) -> None:
    """Every norm still in the deploy model is named in the report, with a reason."""
    known = {x.path for x in report.left}
    for path, mod in deploy.named_modules():
        if isinstance(mod, _NORMS) and path not in known:
            if (isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
                    and not getattr(mod, "elementwise_affine", getattr(mod, "affine", False))):
                reason = "normalization without affine (statistics are computed at run time)"
            else:
                reason = "no exact fold applies at this position"
            report.left.append(Left(path, type(mod).__name__, reason))



_CFG_ATTRS = ("pretrained_cfg", "default_cfg")  # timm models carry their input size there


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """The input size (without batch, e.g. (C, H, W)) a random example input gets when none is given.

    ``model.input_size`` (set by this package's loaders), else the ``input_size`` entry of a timm
    model's ``pretrained_cfg`` / ``default_cfg`` (a dict, or an object with ``.get`` or an
    ``input_size`` attribute such as timm's ``PretrainedCfg`` dataclass); None if there is none.
    Raises :class:`UserError` if the value found is not a tuple of positive sizes.
    """
    size, source = getattr(model, "input_size", None), "model.input_size"
    for attr in _CFG_ATTRS:
        if size is not None:
            break
        cfg = getattr(model, attr, None)
        if cfg is not None:
            size = cfg.get("input_size") if hasattr(cfg, "get") else getattr(cfg, "input_size", None)
            source = f"model.{attr} input_size"
    if size is None:
        return None
    try:
        dims = tuple(int(v) for v in size)
        ok = bool(dims) and all(d > 0 and d == v for d, v in zip(dims, size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{source} = {size!r} is not a tuple of positive sizes such as (3, 224, 224)")
    return dims


def reparameterize(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    count: bool = True,
) -> nn.Module:
    """A new, exactly equivalent deploy model; its report is ``result.reparam_report``.

    Modules that define ``reparameterize(ctx)`` (every family of this package) are
    converted by it. A model with none of them (a timm object, a user's nn.Sequential) goes
    through the generic torch.fx pass (:func:`graph.fold_graph`), which verifies its result
    numerically and raises ``VerificationError`` rather than return a wrong model.
    ``example_input`` (N, C, H, W) is used for FLOP counting and by the graph pass; by
    default one random image of :func:`default_input_size` (``model.input_size``, or timm's
    ``pretrained_cfg``/``default_cfg`` ``input_size``) when the model has one. The model must be in eval mode:
    folding batch statistics of a training-mode model is meaningless.
    """
    if model.training:
        raise UserError("model is in training mode; call model.eval() before reparameterize()")
    report = ReparamReport()
    size = default_input_size(model) if example_input is None else None
    if size is not None:
        p = next(model.parameters())
        # random, not zeros: the graph pass checks its result on this input
        g = torch.Generator(device=p.device).manual_seed(0)
        example_input = torch.randn(1, *size, generator=g, device=p.device).to(p.dtype)
    ours = any(isinstance(m, Reparameterizable) for m in model.modules())
    deploy = copy.deepcopy(model)
    with torch.no_grad():
        deploy = _walk(deploy, ReparamContext(report))
    if not ours:
        # A model this package did not define: the generic, verified torch.fx pass.
        if example_input is None:
            report.left.append(Left("", type(model).__name__, "the graph pass needs example_input, model.input_size "
                                    "or a timm pretrained_cfg/default_cfg with input_size"))
        else:
            from .graph import fold_graph

            deploy, _ = fold_graph(deploy, example_input, report=report)
    deploy.eval()
    for attr in ("arch", "config", "input_size"):  # a block may have replaced the root module
        if hasattr(model, attr) and not hasattr(deploy, attr):
            setattr(deploy, attr, getattr(model, attr))
    _report_remaining_norms(deploy, report)
    report.params_before, report.params_after = count_params(model), count_params(deploy)
    if count:
        if example_input is not None:
            report.input_size = tuple(example_input.shape[1:])
            report.flops_before = count_flops(model, example_input)
            report.flops_after = count_flops(deploy, example_input)
    deploy.reparam_report = report
    return deploy
