"""ConvMixer (Trockman & Kolter): locuslab's flat ``nn.Sequential`` keys and timm's keys.

Train form (op order conv → act → BN everywhere)::

    a0 = act(stem(x));            r0 = BN0(a0)                     stem: p×p conv, stride p
    block:  u = r + BN1(act(DW(r)))                                DW: k×k depthwise, "same" zeros
            r' = BN2(act(PW(u)))                                   PW: 1×1 conv
    head:   y = Linear(mean_hw(r_D))

Every BN follows an activation, so no Conv→BN fuser folds anything. The deploy form
carries the residual stream *before* its pending BN affine and pushes each affine forward.

Derivation (s, t = scale/shift of a BN in eval mode; c ranges over channels). Let the
stream entering a block be ``r = s ⊙ a + t`` with ``a`` the activation output and
``(s, t)`` the previous BN (BN0 or the last BN2); write ``(s1, t1)``, ``(s2, t2)`` for
this block's BNs.

1. DW sees ``r``. Depthwise ⇒ the scale acts on exactly one filter per channel, so
   ``DW_W(s ⊙ a) = DW_{W·s}(a)`` holds at every position, padding included.
   The shift does not: with zero padding ``DW_W(t·1)`` is a per-position *bias map*
   (border taps read 0, not ``t``) — exact only at one input size. Two exact options:
   - size-agnostic (default): write ``s ⊙ a + t = s ⊙ a'`` with ``a' = a + t/s`` (needs
     ``s ≠ 0``). Zero padding of ``a'`` is zero padding of ``r``, so
     ``DW_W(r) = DW_{W·s}(a')`` exactly at every size. Cost: one per-channel add.
   - fixed size (``model.fixed_input_size = (H, W)``): ``DW_W(r) = DW_{W·s}(a) + M`` with
     ``M = b + DW_W(t·1)`` at the stem's output grid; the map replaces the conv bias.
2. ``u = r + s1 ⊙ d + t1`` with ``d = act(DW(r))``. Factor the skip scale out:
   ``u = s ⊙ (a' + (s1/s) ⊙ d) + t1``  (fixed size: ``s ⊙ (a + (s1/s) ⊙ d) + (t + t1)``).
   ``z = a' + g ⊙ d``, ``g = s1/s``, is one ``addcmul``: the only multiply on the stream.
   ``s1`` cannot go into DW (an activation separates them) nor into PW alone (the skip
   is added before PW), so one per-channel multiply is the minimum.
3. PW sees ``u = s ⊙ z + t'``: a 1×1 conv has no padding, so ``PW(s ⊙ z + t')`` folds
   exactly into ``W·diag(s)`` and ``b + W t'``.
4. ``r' = s2 ⊙ act(PW(z)) + t2``: ``a ← act(PW(z))``, the pending affine becomes ``(s2, t2)``.
5. Head: ``mean_hw(s ⊙ a + t) = s ⊙ mean_hw(a) + t`` (the pool is linear and per
   channel), so the last BN folds into the Linear exactly.

Remaining per block: one add (``t/s``; none at a fixed size) and one addcmul, versus two
BN affines and one add in the train form. ``s`` with an exact zero makes the division
impossible: such a model is refused (left in train form) rather than approximated.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, NotExactError, UserError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import bn_affine, clone_conv, clone_linear
from .registry import CheckpointFormat, StateDict, register_config, register_format, CONFIGS

ACTIVATIONS = {"GELU": nn.GELU, "ReLU": nn.ReLU}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_layer {name!r} not supported (known: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


# ----------------------------------------------------------------------------- train form
class Residual(nn.Module):
    """``x + fn(x)`` (key prefix ``fn.``, as upstream)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


class ConvMixer(nn.Module):
    """Train-time ConvMixer with timm's keys (``stem.0/2``, ``blocks.i.{0.fn.0,0.fn.2,1,3}``, ``head``).

    x (N, in_chans, H, W) -> logits (N, num_classes). Set ``fixed_input_size = (H, W)``
    before ``reparameterize`` to get the bias-map deploy form (exact only at that size).
    """

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 in_chans: int = 3, num_classes: int = 1000, act_layer: str = "GELU"):
        super().__init__()
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1 (a ConvMixer without head is not supported)")
        if kernel_size % 2 == 0:
            raise ValueError("padding='same' with an even kernel_size is asymmetric; not supported")
        self.act_name = act_layer
        self.fixed_input_size: tuple[int, int] | None = None
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), _act(act_layer), nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), _act(act_layer), nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, 1), _act(act_layer), nn.BatchNorm2d(dim))
            for _ in range(depth)
        ])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        """The deploy form of the module docstring; every fold is recorded in ``ctx``."""
        stem_conv, _, bn0 = self.stem
        s, t = bn_affine(bn0)  # pending affine on the stream, float64
        fixed = self.fixed_input_size
        grid = None
        if fixed is not None:
            p = stem_conv.stride
            grid = tuple((n - k) // st + 1 for n, k, st in zip(fixed, stem_conv.kernel_size, p))
        blocks = []
        for i, blk in enumerate(self.blocks):
            res, pw, _, bn2 = blk
            dw, _, bn1 = res.fn
            where = f"blocks.{i}"
            if bool((s == 0).any()):
                raise NotExactError(f"{where}: a BatchNorm scale feeding the stream is exactly 0; "
                                    "the skip-path factorization r = s*(a + t/s) divides by it")
            s1, t1 = bn_affine(bn1)
            dw_w, _ = T.fold_affine_before(dw.weight, None, s, None, groups=dw.groups)
            gain = (s1 / s).to(dw.weight.dtype)
            if grid is None:
                shift = (t / s).to(dw.weight.dtype) if bool((t != 0).any()) else None
                new_dw = clone_conv(dw, dw_w, dw.bias)
                bias_map, pw_shift = None, t1
                if shift is not None:
                    ctx.left(f"{where}.shift", "BatchNorm2d shift (per-channel add)",
                             "it enters the zero-padded depthwise conv, whose border taps read 0, not the "
                             "shift: folding is exact only as a fixed-size bias map (set fixed_input_size)")
            else:
                shift = None
                new_dw = clone_conv(dw, dw_w, None)
                padding = new_dw.padding
                bias_map = T.shift_bias_map(dw.weight.double(), t, grid, groups=dw.groups, padding=padding)
                bias_map = (bias_map + dw.bias.double()[:, None, None]).to(dw.weight.dtype)
                pw_shift = t + t1
                ctx.folded("BatchNorm2d shift->DWConv2d bias map", f"{where}.0.fn.0")
            ctx.folded("BatchNorm2d scale->DWConv2d", f"{where}.0.fn.0")
            ctx.left(f"{where}.gain", "BatchNorm2d scale ratio (per-channel multiply)",
                     "the residual adds BN(act(DW)) to the stream before the PW conv; an activation "
                     "separates this scale from every conv, so one multiply stays on the skip path")
            pw_w, pw_b = T.fold_affine_before(pw.weight, pw.bias, s, pw_shift)
            ctx.folded("BatchNorm2d->PWConv2d (forward)", f"{where}.1")
            blocks.append(ConvMixerDeployBlock(shift, new_dw, bias_map, gain, clone_conv(pw, pw_w, pw_b), _act(self.act_name)))
            s, t = bn_affine(bn2)
        head_w, head_b = T.fold_affine_before(self.head.weight, self.head.bias, s, t)
        ctx.folded("BatchNorm2d->Linear (through the pool)", "head")
        deploy = ConvMixerDeploy(stem_conv, _act(self.act_name), blocks, clone_linear(head_w, head_b))
        for attr in ("arch", "config", "input_size"):
            if hasattr(self, attr):
                setattr(deploy, attr, getattr(self, attr))
        return deploy


# ---------------------------------------------------------------------------- deploy form
class ConvMixerDeployBlock(nn.Module):
    """``a' = a + shift; z = a' + gain ⊙ act(DW(a') [+ bias_map]); a_next = act(PW(z))``.

    a (N, C, H, W) -> (N, C, H, W). ``shift`` and ``bias_map`` are mutually exclusive:
    the bias map (C, H, W) is the fixed-size form and rejects other sizes.
    """

    def __init__(self, shift: Tensor | None, dw: nn.Conv2d, bias_map: Tensor | None, gain: Tensor,
                 pw: nn.Conv2d, act: nn.Module):
        super().__init__()
        c = gain.numel()
        self.shift = None if shift is None else nn.Parameter(shift.reshape(1, c, 1, 1).clone())
        self.dw = dw
        self.bias_map = None if bias_map is None else nn.Parameter(bias_map.unsqueeze(0).clone())
        self.act = act
        self.gain = nn.Parameter(gain.reshape(1, c, 1, 1).clone())
        self.pw = pw

    def forward(self, a: Tensor) -> Tensor:
        if self.shift is not None:
            a = a + self.shift
        d = self.dw(a)
        if self.bias_map is not None:
            if d.shape[-2:] != self.bias_map.shape[-2:]:
                raise UserError(f"this deploy model was folded for a fixed input size (token grid "
                                f"{tuple(self.bias_map.shape[-2:])}); got grid {tuple(d.shape[-2:])}")
            d = d + self.bias_map
        z = torch.addcmul(a, self.gain, self.act(d))
        return self.act(self.pw(z))


class ConvMixerDeploy(nn.Module):
    """Deploy ConvMixer: stem conv → act → blocks → mean → Linear, no BatchNorm left."""

    def __init__(self, stem: nn.Conv2d, act: nn.Module, blocks: list[ConvMixerDeployBlock], head: nn.Linear):
        super().__init__()
        self.stem = stem
        self.act = act
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act(self.stem(x)))
        return self.head(x.mean((2, 3)))


# --------------------------------------------------------------------------- formats

def _named_activation(dim: int, depth: int, kernel_size: int, patch_size: int) -> tuple[str, str] | None:
    """(activation, config name) of the named config with these shapes, if any."""
    for nc in CONFIGS.values():
        c = nc.config
        if nc.format == "timm-convmixer" and (c["dim"], c["depth"], c["kernel_size"], c["patch_size"]) == (dim, depth, kernel_size, patch_size):
            return c["act_layer"], nc.name
    return None


def activation_note(config: dict) -> str:
    """Why the activation is what it is: it is never stored in the weights."""
    act = config.get("act_layer", "GELU")
    named = _named_activation(config["dim"], config["depth"], config.get("kernel_size", 9), config.get("patch_size", 7))
    if named and named[0] == act:
        src = f"as in the named config {named[1]}"
    elif named:
        src = f"differs from the named config {named[1]} ({named[0]})"
    else:
        src = "the upstream default" if act == "GELU" else "from the config"
    return f"activation {act}: not stored in the weights, {src}; pass --config with act_layer to change it"


def _build(config: dict, *, official: bool) -> ConvMixer:
    cfg = dict(config)
    cfg.pop("timm_model_name", None)  # schemas.json carries timm's registry name; not an argument
    if official:
        num_classes = cfg.pop("n_classes", 1000)
        in_chans = 3
    else:
        num_classes = cfg.pop("num_classes", 1000)
        in_chans = cfg.pop("in_chans", 3)
        if cfg.pop("global_pool", "avg") != "avg":
            raise ValueError("only global_pool='avg' is supported")
        cfg.pop("drop_rate", None)  # dropout: identity at inference
    return ConvMixer(in_chans=in_chans, num_classes=num_classes, **cfg)


def _official_to_model(sd: StateDict) -> dict[str, Tensor]:
    """locuslab index keys -> timm keys: 0 → stem.0, 2 → stem.2, 3+i → blocks.i, depth+5 → head."""
    depth = _official_depth(sd)
    out = {}
    for k, v in sd.items():
        idx, rest = k.split(".", 1)
        i = int(idx) if idx.isdigit() else -1
        if i in (0, 2):
            out[f"stem.{i}.{rest}"] = v
        elif 3 <= i < 3 + depth:
            out[f"blocks.{i - 3}.{rest}"] = v
        elif i == depth + 5:
            out[f"head.{rest}"] = v
        else:
            out[k] = v  # unexpected: reported by the strict loader
    return out


def _official_depth(sd: StateDict) -> int:
    return len({k.split(".")[0] for k in sd if re.fullmatch(r"\d+\.0\.fn\.0\.weight", k)})


def _official_matches(sd: StateDict) -> bool:
    return "0.weight" in sd and "2.running_var" in sd and all(re.match(r"\d+\.", k) for k in sd)


def _timm_matches(sd: StateDict) -> bool:
    return "stem.0.weight" in sd and "stem.2.running_var" in sd and all(k.split(".")[0] in ("stem", "blocks", "head") for k in sd)


def _infer(sd: StateDict, official: bool) -> dict:
    """Constructor arguments from shapes; the activation comes from a named config or the default."""
    m = _official_to_model(sd) if official else dict(sd)
    try:
        stem = m["stem.0.weight"]
        depth = len({k.split(".")[1] for k in m if k.startswith("blocks.")})
        dim, in_chans, kh, kw = stem.shape
        ks = m["blocks.0.0.fn.0.weight"].shape[-1] if depth else 9
        num_classes = m["head.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a ConvMixer state_dict ({e})") from None
    if kh != kw:
        raise CheckpointError(f"non-square patch {kh}x{kw} is not a ConvMixer stem")
    named = _named_activation(dim, depth, ks, kh)
    act = named[0] if named else "GELU"  # both upstreams default to GELU
    if official:
        if in_chans != 3:
            raise CheckpointError("the locuslab ConvMixer has 3 input channels")
        return {"dim": dim, "depth": depth, "kernel_size": ks, "patch_size": kh, "n_classes": num_classes, "act_layer": act}
    return {"dim": dim, "depth": depth, "kernel_size": ks, "patch_size": kh, "in_chans": in_chans,
            "num_classes": num_classes, "act_layer": act}


register_format(CheckpointFormat(
    name="official-convmixer", family="convmixer",
    build=lambda c: _build(c, official=True), to_model_keys=_official_to_model,
    matches=_official_matches, infer_config=lambda sd: _infer(sd, official=True),
    input_size=lambda c: (3, 224, 224), assumptions=lambda c: {"act_layer": activation_note(c)},
    description="ConvMixer, locuslab flat nn.Sequential (index keys); act_layer extends the GELU-only original",
))
register_format(CheckpointFormat(
    name="timm-convmixer", family="convmixer",
    build=lambda c: _build(c, official=False), to_model_keys=dict,
    matches=_timm_matches, infer_config=lambda sd: _infer(sd, official=False),
    input_size=lambda c: (c.get("in_chans", 3), 224, 224), assumptions=lambda c: {"act_layer": activation_note(c)},
    description="ConvMixer, timm keys (stem / blocks / head)",
))
register_config("convmixer_768_32", "timm-convmixer", "ConvMixer-768/32, k7 p7, ReLU (21.1M)",
                dim=768, depth=32, kernel_size=7, patch_size=7, in_chans=3, num_classes=1000, act_layer="ReLU")
register_config("convmixer_1536_20", "timm-convmixer", "ConvMixer-1536/20, k9 p7, GELU (51.6M)",
                dim=1536, depth=20, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000, act_layer="GELU")
register_config("convmixer_1024_20_ks9_p14", "timm-convmixer", "ConvMixer-1024/20, k9 p14, GELU (24.4M)",
                dim=1024, depth=20, kernel_size=9, patch_size=14, in_chans=3, num_classes=1000, act_layer="GELU")
