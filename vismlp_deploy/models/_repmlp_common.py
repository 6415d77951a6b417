"""Helpers shared by the RepMLP families: partition layouts and memory-light FC folds.

RepMLPNet's block works on "sharesets": channel ``c = q*S + s`` uses weight set ``s``. The
official code partitions and reassembles with reshapes that are *not* inverse when both
the number of partitions P and the number of channel groups Q exceed 1 (result of block
``p*Q + q`` lands at ``q'*P + p'``). Train and deploy forms both go through the two
functions below, so the order cannot drift between them.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, NotExactError
from ..reparam import transforms as T

_F64 = torch.float64


def sharesets_partition(x: Tensor, h: int, w: int, s: int) -> Tensor:
    """(N, C, H, W) -> (N*P*Q, S, h, w), blocks enumerated ``(n, p, q)`` (partition-major).

    p = i*wp + j is the row-major partition index and q the group of S consecutive channels.
    """
    c, hh, ww = x.shape[1], x.shape[2], x.shape[3]
    x = x.reshape(-1, c, hh // h, h, ww // w, w).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, s, h, w)


def sharesets_reassemble(y: Tensor, c: int, hh: int, ww: int, h: int, w: int, s: int) -> Tensor:
    """Inverse layout of the official code (not the inverse of :func:`sharesets_partition`).

    y: (N*P*Q, S, h, w) or (N*P*Q, S, h*w) -> (N, C, H, W). The flat block list is read back
    as (N*Q, hp, wp, S, h, w): block ``p*Q + q`` of a sample becomes group ``q'``, partition
    ``p'`` with ``p*Q + q = q'*P + p'``.
    """
    hp, wp = hh // h, ww // w
    y = y.reshape(-1, hp, wp, s, h, w).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(-1, c, hh, ww)


def depthwise_conv_taps(kernel: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """The non-zeros of :func:`~vismlp_deploy.reparam.transforms.depthwise_conv_to_fc`.

    A size-preserving (padding k//2, odd k) per-channel conv on an h×w map is a banded matrix
    ``M[s, o, i] = kernel[s, 0, dy, dx]`` for every output pixel ``o = (y, x)`` whose tap
    ``(dy, dx)`` reads the in-map pixel ``i = (y+dy-k//2, x+dx-k//2)``; taps that fall on the
    zero padding contribute nothing. Each (o, i) pair belongs to exactly one tap, so the
    matrix is the scatter of these values; it costs O(S·h·w·k²) instead of the (h·w)²
    identity of the identity trick.

    kernel (S, 1, kh, kw) -> rows (n,), cols (n,), values (S, n) float64, n = #valid taps·pixels.
    """
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError("depthwise_conv_taps needs odd kernels (padding k//2 keeps the size)")
    rows, cols, tap = _tap_layout(h, w, kh, kw)
    return rows, cols, kernel.detach().to(_F64).flatten(1)[:, tap]


@functools.lru_cache(maxsize=32)
def _tap_layout(h: int, w: int, kh: int, kw: int) -> tuple[Tensor, Tensor, Tensor]:
    """(out pixel, in pixel, flat tap index) of every in-map tap; depends on the shapes only."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols, taps = [], [], []
    for dy in range(kh):
        for dx in range(kw):
            iy, ix = ys + dy - kh // 2, xs + dx - kw // 2
            ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
            rows.append((ys * w + xs)[ok])
            cols.append((iy * w + ix)[ok])
            taps.append(torch.full((int(ok.sum()),), dy * kw + dx))
    return torch.cat(rows), torch.cat(cols), torch.cat(taps)


@torch.no_grad()
def scale_rows_cols_(
    weight: Tensor,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
    col_shift: Tensor | None = None,
    chunk_elems: int = 1 << 16,
) -> Tensor | None:
    """In place: ``W[o, i] <- W[o, i] * rows[o] * cols[i]``; returns ``W_orig @ col_shift``.

    The two halves of every affine fold into a matrix (a per-output scale after it, a
    per-input affine before it), computed in float64 and rounded once per element, on the
    caller's private copy. The work goes in row chunks of ``chunk_elems`` elements: a float64
    copy of a whole 3136×3136 matrix (or an in-place multiply by a float64 tensor, which
    PyTorch also does through a full temporary) would cost several times the weight itself.

    weight (O, I) float32/64 (a view is fine); rows (O,), cols (I,), col_shift (I,) float64
    -> (O,) float64 or None when ``col_shift`` is None.
    """
    n_out, n_in = weight.shape
    step = max(1, chunk_elems // max(n_in, 1))
    shifted = None if col_shift is None else torch.empty(n_out, dtype=_F64)
    for r0 in range(0, n_out, step):
        block = weight[r0:r0 + step]
        b64 = block.to(_F64)
        if col_shift is not None:
            shifted[r0:r0 + step] = b64 @ col_shift.to(_F64)
        if cols is not None:
            b64 *= cols.to(_F64)
        if rows is not None:
            b64 *= rows[r0:r0 + step, None].to(_F64)
        block.copy_(b64)
    return shifted


@torch.no_grad()
def fold_sharesets_fc_(
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    kernel: Tensor | None,
    kernel_bias: Tensor | None,
    h: int,
    w: int,
) -> Tensor:
    """In place: ``weight[s] <- scale[s]*weight[s] + M_conv[s]``; returns the new bias.

    This is RepMLPNet's locality injection: fc3 (one (hw × hw) matrix per shareset), then
    fc3_bn (per-shareset scale/shift), plus the merged local-perceptron conv (kernel, bias)
    written as a partition-local matrix. weight (S, hw, hw) float32/64, overwritten; scale,
    shift, kernel_bias (S,) float64; kernel (S, 1, k, k) or None -> bias (S, hw), weight's dtype.

    Each element is computed in float64 and rounded once; the few conv taps are recomputed
    from the original values and written after the scaling. Extra memory: one row chunk
    plus O(S·hw·k²), even for the 3136×3136 matrices of the first stage.
    """
    n_s, n = weight.shape[0], h * w
    s64, t64 = scale.to(_F64), shift.to(_F64)
    bias = t64[:, None].expand(n_s, n).clone()
    taps = None
    if kernel is not None:
        rows, cols, vals = depthwise_conv_taps(kernel, h, w)
        at = (torch.arange(n_s)[:, None].expand(-1, rows.numel()), rows.expand(n_s, -1), cols.expand(n_s, -1))
        taps = at, (weight[at].to(_F64) * s64[:, None] + vals).to(weight.dtype)
        bias += kernel_bias.to(_F64)[:, None]
    scale_rows_cols_(weight.view(n_s * n, n), rows=s64.repeat_interleave(n))
    if taps is not None:
        weight[taps[0]] = taps[1]  # (shareset, row, col) triples are distinct
    return bias.to(weight.dtype)


@torch.no_grad()
def fold_conv_bn_(
    conv: nn.Conv2d,
    bn: nn.modules.batchnorm._BatchNorm,
    before: tuple[Tensor, Tensor] | None = None,
) -> nn.Conv2d:
    """``bn(conv(s_in * x + t_in))`` as one conv, *in place* on ``conv`` (walker copies only).

    The identities of :func:`~vismlp_deploy.reparam.transforms.fold_bn_after` (``W' = s W``,
    ``b' = s b + t``) and, with ``before = (s_in, t_in)``, of ``fold_affine_before``
    (``W' = W s_in``, ``b' += W t_in``; exact only for an ungrouped conv without padding,
    checked) in one float64 pass that allocates no second weight.
    """
    s, t = T.bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    b = torch.zeros_like(s) if conv.bias is None else conv.bias.detach().to(_F64)
    w2 = conv.weight.data.view(conv.weight.shape[0], -1)
    if before is None:
        scale_rows_cols_(w2, rows=s)
    else:
        if conv.groups != 1 or any(p != 0 for p in conv.padding) or conv.kernel_size != (1, 1):
            raise NotExactError("an input-side affine folds exactly only into an ungrouped 1x1 conv without padding")
        b = b + scale_rows_cols_(w2, rows=s, cols=before[0], col_shift=before[1])
    conv.bias = nn.Parameter((b * s + t).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return conv


def split_hw(hw: int, what: str) -> tuple[int, int]:
    """h, w from their product, only when it is a perfect square (h == w); else refuse."""
    r = math.isqrt(hw)
    if r * r != hw:
        raise CheckpointError(
            f"{what}: the partition has h*w = {hw} positions, which is not a square, so h and w "
            "cannot be told apart from the weights; pass the constructor arguments with --config"
        )
    return r, r


def min_input_side(sizes: Iterable[int], patch: int) -> int:
    """Smallest image side whose stage maps (patch, then /2 per stage) split into the given partitions."""
    side = 1
    for i, p in enumerate(sizes):
        side = math.lcm(side, p * 2 ** i)
    return side * patch


def merged_local_perceptron(block: nn.Module, ctx) -> tuple[Tensor, Tensor, int]:
    """The local-perceptron branches ``repconv{k}`` (k in ``block.ks``) of a RepMLP block summed into one
    centre-padded depthwise kernel: (kernel, bias, padding), float64.

    Each branch is a conv+BN: already folded by the post-order walker (a conv), or folded here
    (a block converted on its own). Parallel convs on the same input with padding k//2 add up
    exactly once their kernels are centre-padded to the largest size.
    """
    branches = []
    for k in block.ks:
        branch = getattr(block, f"repconv{k}")
        if hasattr(branch, "reparameterize"):  # not yet converted by the walker
            branch = branch.reparameterize(ctx.child(f"repconv{k}"))
        branches.append((branch.weight.double(), branch.bias.double(), k // 2))
    return T.merge_parallel_kernels(branches)
