"""Property tests for the axial-shift identities (reparam/shift.py) against the upstream roll-based shift."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

from vismlp_deploy.models.asmlp import roll_shift
from vismlp_deploy.reparam.shift import (
    channel_offsets,
    merge_shift_into_1x1,
    one_hot_shift_kernel,
    shift_by_slicing,
    shift_groups,
)

cases = st.fixed_dictionaries(dict(
    channels=st.integers(1, 40),
    shift=st.sampled_from([3, 5, 7]),
    dim=st.sampled_from([2, 3]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    n=st.integers(1, 2),
    seed=st.integers(0, 2**16),
))


def _x(c: dict, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(c["seed"])
    return torch.randn(c["n"], c["channels"], c["h"], c["w"], generator=g, dtype=dtype)


def _index_formula(x: torch.Tensor, shift: int, dim: int) -> torch.Tensor:
    """out[..., i, ...] = in[..., i + off_c, ...], zero outside: the CUDA kernel's definition."""
    out = torch.zeros_like(x)
    off = channel_offsets(x.shape[1], shift)
    length = x.shape[dim]
    for c in range(x.shape[1]):
        for i in range(length):
            j = i + int(off[c])
            if 0 <= j < length:
                out[:, c].select(dim - 1, i).copy_(x[:, c].select(dim - 1, j))
    return out


@given(cases)
def test_roll_shift_is_the_index_formula(c: dict) -> None:
    x = _x(c)
    assert torch.equal(roll_shift(x, c["shift"], c["dim"]), _index_formula(x, c["shift"], c["dim"]))


@given(cases)
def test_slicing_equals_roll(c: dict) -> None:
    x = _x(c, torch.float32)
    assert torch.equal(shift_by_slicing(x, c["shift"], c["dim"]), roll_shift(x, c["shift"], c["dim"]))


@given(cases)
def test_one_hot_depthwise_equals_roll(c: dict) -> None:
    x = _x(c)
    s, ch = c["shift"], c["channels"]
    pad = (0, s // 2) if c["dim"] == 3 else (s // 2, 0)
    y = F.conv2d(x, one_hot_shift_kernel(ch, s, c["dim"], x.dtype), None, 1, pad, 1, ch)
    assert torch.equal(y, roll_shift(x, s, c["dim"]))  # one non-zero tap of 1.0: no rounding at all


@given(cases, st.integers(1, 12), st.sampled_from([torch.float32, torch.float64]))
def test_shift_then_1x1_is_one_dense_conv(c: dict, out: int, dtype: torch.dtype) -> None:
    x = _x(c, dtype)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    w = torch.randn(out, c["channels"], 1, 1, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype)
    s = c["shift"]
    pad = (0, s // 2) if c["dim"] == 3 else (s // 2, 0)
    y = F.conv2d(x, merge_shift_into_1x1(w, s, c["dim"]), b, 1, pad)
    assert_close(y, F.conv2d(roll_shift(x, s, c["dim"]), w, b))


def test_uneven_and_missing_groups() -> None:
    # torch.chunk semantics: ceil(C/S) channels per group, possibly fewer than S groups
    assert shift_groups(8, 5) == [(0, 2, 2), (2, 4, 1), (4, 6, 0), (6, 8, -1)]
    assert shift_groups(16, 5) == [(0, 4, 2), (4, 8, 1), (8, 12, 0), (12, 16, -1)]
    assert shift_groups(12, 5) == [(0, 3, 2), (3, 6, 1), (6, 9, 0), (9, 12, -1)]
    assert shift_groups(13, 5) == [(0, 3, 2), (3, 6, 1), (6, 9, 0), (9, 12, -1), (12, 13, -2)]
    assert shift_groups(2, 3) == [(0, 1, 1), (1, 2, 0)]
    assert channel_offsets(7, 3).tolist() == [1, 1, 1, 0, 0, 0, -1]
