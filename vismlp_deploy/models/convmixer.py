"""ConvMixer (Trockman & Kolter): locuslab's flat ``nn.Sequential`` keys and timm's keys.

Train form (op order conv → act → BN everywhere)::

    a0 = act(stem(x));            r0 = BN0(a0)                     stem: p×p conv, stride p
    block:  u = r + BN1(act(DW(r)))                                DW: k×k depthwise, "same" zeros
            r' = BN2(act(PW(u)))                                   PW: 1×1 conv
    head:   y = Linear(mean_hw(r_D))

Every BN follows an activation, so no Conv→BN fuser folds anything. The deploy form
carries the residual stream as ``r = σ ⊙ a + t`` (``a`` the stored activation output) and
pushes each affine forward. ``(s, t)``: BN scale/shift in eval mode; per channel throughout.

Positive homogeneity (ReLU only): ``p·relu(y) = relu(p·y)`` for ``p > 0``, so the positive
part ``p = |s|`` of a BN scale after a ReLU moves into the conv rows and bias before it; the
sign ``s/p = ±1`` is what remains. GELU is not homogeneous: ``p = 1`` (nothing crosses).

1. Stem: ``a = act(p0·stem(x))``, ``σ = s0/p0``, ``t = t0``.
2. Block (``s1, t1``: the DW branch's BN; ``s2, t2``: after PW). Factor ``γ = s1/q``
   out of the residual sum, ``q = |s1|`` for ReLU (so ``γ = ±1``), ``q = 1`` for GELU
   (``γ = s1``); needs ``s1 ≠ 0``, else the model is refused, never approximated::

       a'' = m ⊙ a + c,  m = σ/γ, c = t/γ          ⇒ r = γ ⊙ a''
       DW_W(r) = DW_{W·s1/q}(a'')                    depthwise: one filter per channel, and
                                                     zero padding of a'' is zero padding of r
       s1 ⊙ act(DW(r) + b) = γ ⊙ d,  d = act(DW_{W·s1}(a'') + q·b)
       u = r + s1 ⊙ act(...) + t1 = γ ⊙ (a'' + d) + t1
       PW(u) → W·diag(γ) and b + W·t1                1×1 conv, no padding: exact
       a_next = act(p2·PW(z)),  σ ← s2/p2, t ← t2

   ``c`` cannot enter the zero-padded DW conv size-agnostically (border taps read 0, not
   ``c``), so it stays as one per-channel add. ``m`` is 1 everywhere for ReLU when each
   channel's stream and branch scales share a sign (``σ·γ = 1``): then no multiply is left.
   Otherwise (GELU; ReLU with a sign disagreement or a zero stream scale) ``m ⊙ a + c``
   and ``c`` run as one pass: an eval batch norm with mean 0, var 1, eps 0 (exactly ``m·a + c``).
3. Head: ``mean_hw(σ ⊙ a + t) = σ ⊙ mean_hw(a) + t`` folds into the Linear.

Per block the train graph has BN, Add, BN around two activations; the deploy graph has
one add (ReLU, matching signs) or one fused affine (otherwise) and the residual add, and
for ReLU the activations fuse into the convs (Conv+Relu) in ONNX Runtime.

Fixed-size alternative (``model.fixed_input_size = (H, W)``): the shift enters the DW conv
as a bias map ``M = b + DW_W(t·1)`` at the stem's output grid (exact at that size only),
and ``g = s1/s`` stays as a multiply on the branch (needs ``s ≠ 0``).
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import CheckpointError, NotExactError, UserError
from ..reparam import transforms as T
from ..reparam.walker import ReparamContext
from .layers import bn_affine, clone_conv, clone_linear
from .registry import CONFIGS, StateDict, register_config, register_format

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
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), _act(act_layer),
                                  nn.BatchNorm2d(dim))
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), _act(act_layer),
                    nn.BatchNorm2d(dim))),
                nn.Conv2d(dim, dim, 1), _act(act_layer), nn.BatchNorm2d(dim))
            for _ in range(depth)
        ])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))

    def reparameterize(self, ctx: ReparamContext) -> nn.Module:
        """The deploy form of the module docstring; every fold is recorded in ``ctx``."""
        if self.fixed_input_size is not None:
            return self._reparameterize_fixed(ctx)
        relu = self.act_name == "ReLU"
        stem_conv, _, bn0 = self.stem
        s, t = bn_affine(bn0)
        # ReLU: c*relu(y) = relu(c*y) for c > 0, so |s| moves into the conv before the ReLU
        p = _homogeneous_part(s) if relu else torch.ones_like(s)
        stem = clone_conv(stem_conv, *_scale_rows(stem_conv.weight, stem_conv.bias, p))
        sigma = s / p  # stream r = sigma * a + t, a = the stored activation output
        blocks = []
        for i, blk in enumerate(self.blocks):
            res, pw, _, bn2 = blk
            dw, _, bn1 = res.fn
            where = f"blocks.{i}"
            s1, t1 = bn_affine(bn1)
            if bool((s1 == 0).any()):
                raise NotExactError(f"{where}: the depthwise branch's BatchNorm scale is exactly 0; "
                                    "the factorization u = gamma*(r/gamma + d) divides by it")
            q = _homogeneous_part(s1) if relu else torch.ones_like(s1)
            gamma = s1 / q  # factored out of the residual sum; ±1 for ReLU
            m, c = sigma / gamma, t / gamma  # a'' = m*a + c, so that r = gamma*a''
            dw_w, _ = T.fold_affine_before(dw.weight, None, s1, None, groups=dw.groups)  # W*gamma*q = W*s1
            dw_b = None if dw.bias is None else (q * dw.bias.double()).to(dw.weight.dtype)
            ctx.folded("BatchNorm2d scale->DWConv2d", f"{where}.0.fn.0")
            scale = None if bool((m == 1).all()) else m.to(dw.weight.dtype)
            shift = None if bool((c == 0).all()) else c.to(dw.weight.dtype)
            if scale is not None:
                ctx.left(f"{where}.scale", "BatchNorm2d scale ratio (per-channel multiply)",
                         _scale_reason(relu, sigma, gamma))
            if shift is not None:
                ctx.left(f"{where}.shift", "BatchNorm2d shift (per-channel add)",
                         "it enters the zero-padded depthwise conv, whose border taps read 0, not the "
                         "shift: folding is exact only as a fixed-size bias map (set fixed_input_size)")
            s2, t2 = bn_affine(bn2)
            p2 = _homogeneous_part(s2) if relu else torch.ones_like(s2)
            pw_w, pw_b = T.fold_affine_before(pw.weight, pw.bias, gamma, t1)  # u = gamma*z + t1
            pw_w, pw_b = _scale_rows(pw_w, pw_b, p2)
            ctx.folded("BatchNorm2d->PWConv2d (forward)", f"{where}.1")
            blocks.append(ConvMixerDeployBlock(scale, shift, clone_conv(dw, dw_w, dw_b), None, None,
                                               clone_conv(pw, pw_w, pw_b), _act(self.act_name)))
            sigma, t = s2 / p2, t2
        head_w, head_b = T.fold_affine_before(self.head.weight, self.head.bias, sigma, t)
        ctx.folded("BatchNorm2d->Linear (through the pool)", "head")
        return self._deploy(stem, blocks, clone_linear(head_w, head_b))

    def _reparameterize_fixed(self, ctx: ReparamContext) -> nn.Module:
        """Fixed-size form: the stream's shift becomes a bias map of the DW conv at the stem's grid."""
        stem_conv, _, bn0 = self.stem
        s, t = bn_affine(bn0)  # pending affine on the stream, float64
        grid = tuple((n - k) // st + 1 for n, k, st in
                     zip(self.fixed_input_size, stem_conv.kernel_size, stem_conv.stride))
        blocks = []
        for i, blk in enumerate(self.blocks):
            res, pw, _, bn2 = blk
            dw, _, bn1 = res.fn
            where = f"blocks.{i}"
            if bool((s == 0).any()):
                raise NotExactError(f"{where}: a BatchNorm scale feeding the stream is exactly 0; "
                                    "the skip-path factorization divides by it")
            s1, t1 = bn_affine(bn1)
            dw_w, _ = T.fold_affine_before(dw.weight, None, s, None, groups=dw.groups)
            gain = (s1 / s).to(dw.weight.dtype)
            new_dw = clone_conv(dw, dw_w, None)
            bias_map = T.shift_bias_map(dw.weight.double(), t, grid, groups=dw.groups, padding=new_dw.padding)
            bias_map = (bias_map + dw.bias.double()[:, None, None]).to(dw.weight.dtype)
            ctx.folded("BatchNorm2d shift->DWConv2d bias map", f"{where}.0.fn.0")
            ctx.folded("BatchNorm2d scale->DWConv2d", f"{where}.0.fn.0")
            ctx.left(f"{where}.gain", "BatchNorm2d scale ratio (per-channel multiply)",
                     "the residual adds BN(act(DW)) to the stream before the PW conv; an activation "
                     "separates this scale from every conv, so one multiply stays on the skip path")
            pw_w, pw_b = T.fold_affine_before(pw.weight, pw.bias, s, t + t1)
            ctx.folded("BatchNorm2d->PWConv2d (forward)", f"{where}.1")
            blocks.append(ConvMixerDeployBlock(None, None, new_dw, bias_map, gain, clone_conv(pw, pw_w, pw_b),
                                               _act(self.act_name)))
            s, t = bn_affine(bn2)
        head_w, head_b = T.fold_affine_before(self.head.weight, self.head.bias, s, t)
        ctx.folded("BatchNorm2d->Linear (through the pool)", "head")
        return self._deploy(stem_conv, blocks, clone_linear(head_w, head_b))

    def _deploy(self, stem: nn.Conv2d, blocks: list[ConvMixerDeployBlock], head: nn.Linear) -> ConvMixerDeploy:
        deploy = ConvMixerDeploy(stem, _act(self.act_name), blocks, head)
        for attr in ("arch", "config", "input_size"):
            if hasattr(self, attr):
                setattr(deploy, attr, getattr(self, attr))
        return deploy


def _homogeneous_part(s: Tensor) -> Tensor:
    """|s| where s != 0, else 1: the positive factor that may cross a ReLU (c*relu(y) = relu(c*y), c > 0)."""
    return torch.where(s != 0, s.abs(), torch.ones_like(s))


def _scale_rows(weight: Tensor, bias: Tensor | None, p: Tensor) -> tuple[Tensor, Tensor | None]:
    """Conv ``(W, b)`` -> ``(p*W, p*b)`` per output channel, computed in float64. p (O,)."""
    w = (weight.double() * p.reshape(-1, *[1] * (weight.dim() - 1))).to(weight.dtype)
    return w, None if bias is None else (bias.double() * p).to(bias.dtype)


def _scale_reason(relu: bool, sigma: Tensor, gamma: Tensor) -> str:
    if not relu:
        return ("GELU is not positively homogeneous: neither the stream's BN scale nor the branch's can "
                "cross an activation into a conv, so their ratio stays as one multiply on the stream")
    bad = int(((sigma * gamma) <= 0).sum())
    return (f"{bad} channel(s) where the stream's BN scale and the branch's BN scale differ in sign (or "
            "the stream's is 0): only positive factors cross a ReLU, so a multiply by -1/0 stays")


# ---------------------------------------------------------------------------- deploy form
class ConvMixerDeployBlock(nn.Module):
    """``a'' = scale ⊙ a + shift; z = a'' + [gain ⊙] act(DW(a'') [+ bias_map]); a_next = act(PW(z))``.

    a (N, C, H, W) -> (N, C, H, W). Size-agnostic form: ``scale``/``shift`` (either may be
    absent = 1/0), no gain. Fixed-size form: ``bias_map`` (C, H, W) + ``gain``, rejects other sizes.
    A shift (with or without scale) runs as an eval-mode batch norm with mean 0, var 1, eps 0:
    exactly ``scale*a + shift`` (sqrt(1) = 1). ONNX Runtime CPU turns a BatchNormalization into
    an NCHWc 1x1 depthwise conv (one pass, NCHWc layout kept); a broadcast Add/Mul instead forces
    a reorder out of and back into NCHWc around it (measured: 2 extra passes per block).
    """

    def __init__(self, scale: Tensor | None, shift: Tensor | None, dw: nn.Conv2d, bias_map: Tensor | None,
                 gain: Tensor | None, pw: nn.Conv2d, act: nn.Module):
        super().__init__()
        c = dw.out_channels
        self.scale = None if scale is None else nn.Parameter(scale.reshape(c).clone())
        self.shift = None if shift is None else nn.Parameter(shift.reshape(c).clone())
        if shift is not None:
            self.register_buffer("zero", torch.zeros(c, dtype=shift.dtype))
            self.register_buffer("one", torch.ones(c, dtype=shift.dtype))
        self.dw = dw
        self.bias_map = None if bias_map is None else nn.Parameter(bias_map.unsqueeze(0).clone())
        self.gain = None if gain is None else nn.Parameter(gain.reshape(1, c, 1, 1).clone())
        self.act = act
        self.pw = pw

    def forward(self, a: Tensor) -> Tensor:
        if self.shift is not None:
            a = F.batch_norm(a, self.zero, self.one, self.scale, self.shift, False, 0.0, 0.0)
        elif self.scale is not None:
            a = a * self.scale[:, None, None]
        elif self.shift is not None:
            a = a + self.shift[:, None, None]
        d = self.dw(a)
        if self.bias_map is not None:
            if d.shape[-2:] != self.bias_map.shape[-2:]:
                raise UserError(f"this deploy model was folded for a fixed input size (token grid "
                                f"{tuple(self.bias_map.shape[-2:])}); got grid {tuple(d.shape[-2:])}")
            d = d + self.bias_map
        d = self.act(d)
        z = a + d if self.gain is None else torch.addcmul(a, self.gain, d)
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
        if (nc.format == "timm-convmixer"
                and (c["dim"], c["depth"], c["kernel_size"], c["patch_size"]) == (dim, depth, kernel_size, patch_size)):
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


def _resize(config: dict, size: tuple[int, int]) -> dict:
    """Fully convolutional with a global mean: any size of at least one patch, same config."""
    if min(size) < config.get("patch_size", 7):
        raise ValueError(f"each side must be at least the patch size {config.get('patch_size', 7)}")
    return config


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
    return ("stem.0.weight" in sd and "stem.2.running_var" in sd
            and all(k.split(".")[0] in ("stem", "blocks", "head") for k in sd))


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
        return {"dim": dim, "depth": depth, "kernel_size": ks, "patch_size": kh, "n_classes": num_classes,
                "act_layer": act}
    return {"dim": dim, "depth": depth, "kernel_size": ks, "patch_size": kh, "in_chans": in_chans,
            "num_classes": num_classes, "act_layer": act}


register_format(
    "official-convmixer", family="convmixer", resize=_resize,
    build=lambda c: _build(c, official=True), to_model_keys=_official_to_model,
    matches=_official_matches, infer_config=lambda sd: _infer(sd, official=True),
    input_size=lambda c: (3, 224, 224), assumptions=lambda c: {"act_layer": activation_note(c)},
    description="ConvMixer, locuslab flat nn.Sequential (index keys); act_layer extends the GELU-only original",
)
register_format(
    "timm-convmixer", family="convmixer", resize=_resize,
    build=lambda c: _build(c, official=False),
    matches=_timm_matches, infer_config=lambda sd: _infer(sd, official=False),
    input_size=lambda c: (c.get("in_chans", 3), 224, 224), assumptions=lambda c: {"act_layer": activation_note(c)},
    description="ConvMixer, timm keys (stem / blocks / head)",
)
register_config("convmixer_768_32", "timm-convmixer", "ConvMixer-768/32, k7 p7, ReLU (21.1M)",
                dim=768, depth=32, kernel_size=7, patch_size=7, in_chans=3, num_classes=1000, act_layer="ReLU")
register_config("convmixer_1536_20", "timm-convmixer", "ConvMixer-1536/20, k9 p7, GELU (51.6M)",
                dim=1536, depth=20, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000, act_layer="GELU")
register_config("convmixer_1024_20_ks9_p14", "timm-convmixer", "ConvMixer-1024/20, k9 p14, GELU (24.4M)",
                dim=1024, depth=20, kernel_size=9, patch_size=14, in_chans=3, num_classes=1000, act_layer="GELU")
