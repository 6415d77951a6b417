"""AS-MLP's axial shift and its exact rewrites without ``torch.roll`` or custom kernels.

The shift (svip-lab AS-MLP): the C channels are cut into consecutive groups of
``ceil(C / S)`` channels (``torch.chunk`` semantics: the last group may be smaller and
there may be *fewer than S groups*); group g moves by ``S//2 - g`` along one spatial axis,
``out[..., i, ...] = in[..., i + off, ...]``, zero where ``i + off`` falls off the map.

Identities used by the deploy form (all exact, no arithmetic on the data):

* pad + slice + concat: ``out_g = pad(x_g, p)[..., p + off_g : p + off_g + L]`` with p = S//2.
* one-hot depthwise conv: channel c convolved with a 1xS (or Sx1) kernel, padding p, whose
  only non-zero tap is at ``p + off_c`` (a conv reads ``x[i + k - p]`` at tap k).
* shift then 1x1 conv == one dense 1xS conv whose tap ``p + off_c`` of input channel c holds
  the 1x1 weight column c (``merge_shift_into_1x1``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def shift_groups(channels: int, shift_size: int) -> list[tuple[int, int, int]]:
    """``(start, stop, offset)`` per channel group, in ``torch.chunk(x, shift_size, 1)`` order."""
    if shift_size < 1 or shift_size % 2 == 0:
        raise ValueError(f"shift_size must be odd and positive, got {shift_size}")
    size = math.ceil(channels / shift_size)
    return [(g * size, min((g + 1) * size, channels), shift_size // 2 - g)
            for g in range(math.ceil(channels / size))]


def channel_offsets(channels: int, shift_size: int) -> Tensor:
    """The offset of every channel, (C,) int64."""
    off = torch.empty(channels, dtype=torch.long)
    for start, stop, o in shift_groups(channels, shift_size):
        off[start:stop] = o
    return off


def shift_by_slicing(x: Tensor, shift_size: int, dim: int) -> Tensor:
    """The axial shift of x (N, C, H, W) along ``dim`` (2 = H, 3 = W) as pad + slice + concat."""
    p = shift_size // 2
    length = x.shape[dim]
    pad = (0, 0, p, p) if dim == 2 else (p, p)
    xp = F.pad(x, pad)
    parts = [xp[:, a:b].narrow(dim, p + o, length) for a, b, o in shift_groups(x.shape[1], shift_size)]
    return torch.cat(parts, 1)


def one_hot_shift_kernel(channels: int, shift_size: int, dim: int, dtype=torch.float32) -> Tensor:
    """Depthwise kernel (C, 1, 1, S) for dim 3 or (C, 1, S, 1) for dim 2; use with padding S//2 on ``dim``."""
    p = shift_size // 2
    ker = torch.zeros(channels, shift_size, dtype=dtype)
    ker[torch.arange(channels), p + channel_offsets(channels, shift_size)] = 1
    return ker.reshape(channels, 1, 1, shift_size) if dim == 3 else ker.reshape(channels, 1, shift_size, 1)


def merge_shift_into_1x1(weight: Tensor, shift_size: int, dim: int) -> Tensor:
    """``conv1x1(shift(x), W)`` == ``conv(x, W')`` with W' (O, C, 1, S) (dim 3) or (O, C, S, 1) (dim 2).

    Input channel c contributes only through tap ``S//2 + off_c``, so W' is W spread onto a
    one-hot tap per input channel. Padding of the merged conv: S//2 on ``dim``, 0 elsewhere.
    weight (O, C, 1, 1) or (O, C).
    """
    w = weight.reshape(weight.shape[0], weight.shape[1])
    onehot = one_hot_shift_kernel(w.shape[1], shift_size, 3, torch.float64)[:, 0, 0, :]  # (C, S)
    merged = w.to(torch.float64)[:, :, None] * onehot[None]  # (O, C, S)
    shape = (w.shape[0], w.shape[1], 1, shift_size) if dim == 3 else (w.shape[0], w.shape[1], shift_size, 1)
    return merged.reshape(shape).to(weight.dtype)
