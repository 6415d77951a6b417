"""Exact re-parameterization identities as pure functions on tensors.

Every function computes in float64 and casts back to the dtype of its main input, and
either returns an exactly equivalent parameterization or raises ``NotExactError`` with
the reason. None of them touches an ``nn.Module``: the blocks' ``reparameterize()``
methods assemble them, and each identity is verified alone in ``tests/test_transforms.py``.

Notation: a per-channel affine is ``y = s * x + t`` (BN in eval mode, Affine, LayerNorm's
γ/β, layer-scale). Conv weights are ``(O, C/g, *k)``, linear weights ``(O, C)``; a linear
is treated as a conv with an empty kernel, so every function below serves both.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import NotExactError

_F64 = torch.float64


def _f64(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().to(_F64)


def _f64_copy(x: Tensor) -> Tensor:
    """A private float64 copy (``.to`` alone returns the input itself when it is float64)."""
    return x.detach().to(_F64, copy=True)


def _bias_or_zeros(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.zeros(n, dtype=_F64, device=like.device) if bias is None else bias.detach().to(_F64)


# ----------------------------------------------------------------------------- norms
def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as a per-channel affine ``y = s * x + t`` (float64).

    ``s = γ / sqrt(σ² + eps)``, ``t = β − μ·s``; ``weight``/``bias`` None means affine=False.
    Shapes: all (C,) -> (C,), (C,).
    """
    if running_mean is None or running_var is None:
        raise NotExactError("BatchNorm without running statistics uses batch statistics at inference")
    mean, var = _f64(running_mean), _f64(running_var)
    if not torch.isfinite(mean).all() or not torch.isfinite(var).all():
        raise NotExactError("BatchNorm running statistics contain NaN or Inf")
    if (var + eps <= 0).any():
        raise NotExactError("BatchNorm running_var + eps is not positive")
    inv_std = torch.rsqrt(var + eps)
    gamma = torch.ones_like(mean) if weight is None else _f64(weight)
    beta = torch.zeros_like(mean) if bias is None else _f64(bias)
    s = gamma * inv_std
    return s, beta - mean * s


# -------------------------------------------------------- affine after conv/linear
def fold_affine_after(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor]:
    """``s * (W x + b) + t`` -> ``W' x + b'`` for a conv/linear followed by a per-out-channel affine.

    This is the Conv→BN / Linear→BN fold (``s, t`` from :func:`bn_scale_shift`) and the
    layer-scale fold. Exact for any groups, stride, padding and dilation because the affine
    acts on whole output channels. weight (O, ...), bias (O,) or None, scale/shift (O,) or
    broadcastable scalars -> (O, ...), (O,).
    """
    out = weight.shape[0]
    s = torch.broadcast_to(_f64(scale), (out,))
    t = torch.broadcast_to(_f64(shift), (out,))
    w = _f64_copy(weight).mul_(s.reshape(-1, *([1] * (weight.dim() - 1))))  # one float64 temporary
    b = _bias_or_zeros(bias, out, weight) * s + t
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_bn_after(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Conv/Linear followed by eval-mode BatchNorm over its output channels -> one conv/linear."""
    s, t = bn_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    return fold_affine_after(weight, bias, s, t)


# ------------------------------------------------------- affine before conv/linear
def fold_affine_before(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None,
    shift: Tensor | None,
    groups: int = 1,
    padding: int | Sequence[int] = 0,
) -> tuple[Tensor, Tensor]:
    """``W (s * x + t) + b`` -> ``W' x + b'`` for a per-in-channel affine feeding a conv/linear.

    ``W' = W · s`` along the input-channel axis (mapped through the groups), and
    ``b' = b + Σ_{c,k} W[o, c, k] · t[c]``. The bias identity holds only where every tap of
    the kernel reads a real input pixel: with zero padding the border taps read 0 instead
    of ``t``, so a non-zero shift with padding > 0 is refused (a fixed-size bias map is the
    exact alternative, see :func:`shift_bias_map`). weight (O, C/g, *k) -> same; bias (O,).
    """
    out, cin_per_group = weight.shape[0], weight.shape[1]
    cin = cin_per_group * groups
    if out % groups:
        raise NotExactError(f"out channels {out} not divisible by groups {groups}")
    pads = [padding] if isinstance(padding, int) else list(padding)
    b = _bias_or_zeros(bias, out, weight)
    # grouped view: (g, O/g, C/g, taps); output channel o of group j reads inputs j*C/g ..
    w64 = _f64_copy(weight).reshape(groups, out // groups, cin_per_group, -1)
    if shift is not None:
        t = torch.broadcast_to(_f64(shift), (cin,))
        if any(p != 0 for p in pads) and bool((t != 0).any()):
            raise NotExactError(
                "a per-channel shift enters a zero-padded conv: border outputs see 0, not the "
                "shift; fold it as a fixed-size bias map or leave the affine in place"
            )
        # W (s x + t) = (W s) x + W t: the shift meets the *unscaled* W, summed over taps
        b = b + torch.einsum("gock,gc->go", w64, t.reshape(groups, cin_per_group)).reshape(out)
    if scale is not None:
        s = torch.broadcast_to(_f64(scale), (cin,))
        w64.mul_(s.reshape(groups, 1, cin_per_group, 1))  # in place on the private float64 copy
    return w64.reshape(weight.shape).to(weight.dtype), b.to(weight.dtype)


def shift_bias_map(
    weight: Tensor,
    shift: Tensor,
    input_size: Sequence[int],
    groups: int = 1,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """The exact per-position output of a zero-padded conv on a constant-per-channel input.

    ``conv(x + t) = conv(x) + conv(t·1)``; the second term is a bias map that is constant in
    the interior and differs at the borders. Exact only at the given ``input_size``.
    weight (O, C/g, kh, kw), shift (C,) -> (O, H_out, W_out) in weight's dtype.
    """
    cin = weight.shape[1] * groups
    t = torch.broadcast_to(_f64(shift), (cin,))
    const = t.reshape(1, cin, *([1] * len(input_size))).expand(1, cin, *input_size)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(input_size)]
    out = conv(const, _f64(weight), None, stride, padding, dilation, groups)
    return out[0].to(weight.dtype)


# ------------------------------------------------------------ conv -> FC (RepMLP)
def conv_to_fc(
    weight: Tensor,
    bias: Tensor | None,
    h: int,
    w: int,
    groups: int = 1,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> tuple[Tensor, Tensor | None]:
    """A 2-D conv on an ``h × w`` map (zero padded at the map border) as an FC kernel.

    The identity-matrix trick (RepMLP, Algorithm 1): convolving the identity basis of a
    group's input space gives, for each basis vector, one column of the FC matrix. The
    result has shape (C/g·h·w, O/g, h', w'), which must be flattened to (C/g·h·w, O/g·h'·w')
    and then transposed. (The published pseudo-code reshapes to O·h·w/g rows, which is right
    only when C == O.) Groups are processed one at a time, so peak extra memory is one
    group's identity, never the C·h·w-square identity of all groups.

    weight (O, C/g, k, k) -> fc weight (O·h'·w', C/g·h·w): a grouped "1x1 conv" on the
    flattened (c, y, x) vectors with the same ``groups``; bias (O,) -> (O·h'·w',) or None.
    """
    out, cpg = weight.shape[0], weight.shape[1]
    if out % groups:
        raise NotExactError(f"out channels {out} not divisible by groups {groups}")
    opg = out // groups
    n_in = cpg * h * w
    w64 = _f64(weight)
    eye = torch.eye(n_in, dtype=_F64, device=weight.device).reshape(n_in, cpg, h, w)
    blocks = []
    for j in range(groups):
        resp = F.conv2d(eye, w64[j * opg:(j + 1) * opg], None, stride, padding, dilation)
        hp, wp = resp.shape[-2:]
        blocks.append(resp.reshape(n_in, opg * hp * wp).t())
    fc = torch.cat(blocks, 0) if groups > 1 else blocks[0]
    fc_bias = None
    if bias is not None:
        fc_bias = _f64(bias).repeat_interleave(hp * wp).to(weight.dtype)
    return fc.to(weight.dtype), fc_bias


def depthwise_conv_to_fc(kernel: Tensor, h: int, w: int, padding: int | tuple[int, int]) -> Tensor:
    """Per-channel convs on an ``h × w`` map as one (h·w × h·w) matrix per channel.

    The depthwise special case of :func:`conv_to_fc` used by RepMLPNet's local perceptron:
    ``M[s] @ vec(x_s) == vec(conv(x_s, kernel[s]))``. One identity of size (h·w)² serves all
    channels (a single-input-channel conv with S filters), so the peak memory is that of the
    output. kernel (S, 1, k, k) -> (S, h·w, h·w).
    """
    s = kernel.shape[0]
    n = h * w
    eye = torch.eye(n, dtype=_F64, device=kernel.device).reshape(n, 1, h, w)
    resp = F.conv2d(eye, _f64(kernel), None, 1, padding)  # (n_in, S, h, w): resp[i, s, o] = M[s, o, i]
    if resp.shape[-2:] != (h, w):
        raise NotExactError("depthwise_conv_to_fc needs a size-preserving conv (odd k, padding k//2)")
    return resp.reshape(n, s, n).permute(1, 2, 0).to(kernel.dtype)


# ------------------------------------------------------------------ kernel merging
def pad_kernel(kernel: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a (…, kh, kw) kernel symmetrically to ``size``.

    With padding ``k//2`` for each kernel, a centred pad keeps every tap aligned with the
    same input pixel, so the padded kernel computes the same output.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    kh, kw = kernel.shape[-2:]
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise NotExactError(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}")
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def merge_parallel_kernels(
    branches: Sequence[tuple[Tensor, Tensor | None, int | tuple[int, int]]],
) -> tuple[Tensor, Tensor, int]:
    """Sum of parallel convs with the same input, stride and groups -> one conv.

    Each branch is ``(weight, bias, padding)``; kernels are centre-padded to the largest
    size. Exact when every branch is "centre aligned": padding == k//2 per axis, odd k.
    Returns (weight, bias, padding of the merged conv).
    """
    kmax = max(max(w.shape[-2:]) for w, _, _ in branches)
    total_w, total_b = None, None
    for w, b, pad in branches:
        ph, pw = (pad, pad) if isinstance(pad, int) else pad
        kh, kw = w.shape[-2:]
        if kh % 2 == 0 or kw % 2 == 0 or ph != kh // 2 or pw != kw // 2:
            raise NotExactError(f"branch kernel {kh}x{kw} with padding {pad} is not centre aligned")
        pw64 = pad_kernel(_f64(w), kmax)
        b64 = _bias_or_zeros(b, w.shape[0], w)
        total_w = pw64 if total_w is None else total_w + pw64
        total_b = b64 if total_b is None else total_b + b64
    ref = branches[0][0]
    return total_w.to(ref.dtype), total_b.to(ref.dtype), kmax // 2


def compose_affines(
    s1: Tensor | None, t1: Tensor | None, s2: Tensor | None, t2: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """``s2 * (s1 * x + t1) + t2`` -> ``s * x + t`` with ``s = s2·s1``, ``t = s2·t1 + t2`` (float64).

    Broadcast constants of any shape; None means 1 (scale) or 0 (shift) and stays None when
    both parts are absent.
    """
    s1, t1, s2, t2 = (_f64(c) for c in (s1, t1, s2, t2))
    s = s1 if s2 is None else s2 if s1 is None else s2 * s1
    t = None if t1 is None else t1 if s2 is None else s2 * t1
    t = t2 if t is None else t if t2 is None else t + t2
    return s, t


def affine_through_linear(
    weight: Tensor, bias: Tensor | None, scale: Tensor | None, shift: Tensor | None, axis: int, rank: int
) -> tuple[Tensor | None, Tensor]:
    """A linear map along ``axis`` applied to ``s ⊙ x + t`` -> ``s ⊙ (W x) + table``.

    ``W`` mixes positions along ``axis`` (e.g. ResMLP's token linear) and ``s`` is constant
    along ``axis`` (it acts on another one, e.g. the channels), so ``W (s ⊙ x) = s ⊙ (W x)``;
    the shift becomes ``table = W t + b``: a constant ``t`` along ``axis`` is summed by each row
    of W (``t · W 1``), and one that varies along it is mixed like the data. weight (O, C),
    bias (O,) or None; scale/shift broadcast constants of rank ``rank`` (None: 1 / 0) ->
    (scale, table) in float64, the table with O entries along ``axis``.
    """
    if scale is not None and scale.shape[axis] != 1:
        raise NotExactError("the scale varies along the axis the linear mixes: it does not commute with it")
    t = torch.zeros([1] * rank, dtype=_F64, device=weight.device) if shift is None else _f64(shift)
    t = t.movedim(axis, -1)
    t = t.expand(*t.shape[:-1], weight.shape[1])
    table = F.linear(t, _f64(weight), _f64(bias)).movedim(-1, axis)
    return _f64(scale), table


def pointwise_conv_as_linear(weight: Tensor, groups: int = 1) -> Tensor:
    """A 1x1 (kernel 1 on every spatial axis) grouped conv as the dense (O, C) matrix it applies
    to the channels of each position: block-diagonal over the groups. weight (O, C/g, 1, ...)."""
    out, cpg = weight.shape[:2]
    if any(k != 1 for k in weight.shape[2:]):
        raise NotExactError("not a pointwise (kernel 1) conv")
    if out % groups:
        raise NotExactError(f"out channels {out} not divisible by groups {groups}")
    opg = out // groups
    dense = torch.zeros(out, cpg * groups, dtype=_F64, device=weight.device)
    w = _f64(weight).reshape(out, cpg)
    for j in range(groups):
        dense[j * opg:(j + 1) * opg, j * cpg:(j + 1) * cpg] = w[j * opg:(j + 1) * opg]
    return dense


def residual_skip_scale(scale: Tensor) -> Tensor:
    """``p + s ⊙ d + t = s ⊙ (p ⊙ k + d) + t`` with ``k = 1/s``: the per-channel multiply the skip
    path needs when a branch's affine is factored out of a residual sum (float64).

    Refused when some ``s`` is exactly 0 (the factorization divides by it).
    """
    s = _f64(scale)
    if bool((s == 0).any()):
        raise NotExactError("the branch's scale is exactly 0 in some channel: factoring it out divides by 0")
    return 1.0 / s


def positive_part(scale: Tensor) -> tuple[Tensor, Tensor]:
    """``s = p · σ`` with ``p = |s|`` (1 where s = 0) and ``σ = s / p`` ∈ {-1, 0, 1} (float64).

    ``p > 0`` crosses a positively homogeneous activation: ``p · relu(y) = relu(p · y)``
    (also leaky ReLU), so ``s · relu(W x + b) = σ · relu(p W x + p b)``.
    """
    s = _f64(scale)
    p = torch.where(s != 0, s.abs(), torch.ones_like(s))
    return p, s / p
