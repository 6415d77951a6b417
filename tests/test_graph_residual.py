"""Generic pass: BatchNorm after an activation (ConvMixer's conv → act → BN) and around residual sums.

Models are randomized with negative BN gammas where it matters (the ReLU rule moves only
the positive part), folded by ``fold_graph`` (fp32 1e-5 and fp64 1e-10 checked inside) and
checked again on other inputs. Each property asserts the rules fired; each trap that the rule
refused, and a deliberately wrong identity is caught by the final check.
"""
from __future__ import annotations

import pytest
import torch
from foreign_models import affine_census, fold_checked
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vismlp_deploy.errors import VerificationError
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.reparam import transforms as T
from vismlp_deploy.reparam.graph import fold_graph

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky": lambda: nn.LeakyReLU(0.1)}


def _left(rep) -> dict[str, str]:
    return {x.path: x.reason for x in rep.left}


def _kinds(rep) -> list[str]:
    return [k for _, k in rep.folded_paths]


def _n_bn(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


class Res(nn.Module):
    def __init__(self, fn, branch_first: bool):
        super().__init__()
        self.fn, self.branch_first = fn, branch_first

    def forward(self, x):
        return self.fn(x) + x if self.branch_first else x + self.fn(x)


def convmixer_like(dim, depth, k, act, branch_first=True, pool="adaptive") -> nn.Module:
    """stem → act → BN, [Res(DW k×k "same" → act → BN) → PW → act → BN]*, pool → Linear."""
    a = _ACTS[act]
    blocks = [nn.Sequential(Res(nn.Sequential(nn.Conv2d(dim, dim, k, groups=dim, padding="same"), a(),
                                              nn.BatchNorm2d(dim)), branch_first),
                            nn.Conv2d(dim, dim, 1), a(), nn.BatchNorm2d(dim)) for _ in range(depth)]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if pool == "adaptive" else [Mean23()]
    return nn.Sequential(nn.Conv2d(3, dim, 2, 2), a(), nn.BatchNorm2d(dim), *blocks, *head, nn.Linear(dim, 3))


class Mean23(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


@settings(max_examples=20)
@given(dim=st.integers(2, 6), depth=st.integers(1, 2), k=st.sampled_from([1, 3, 5]), act=st.sampled_from(sorted(_ACTS)),
       branch_first=st.booleans(), pool=st.sampled_from(["adaptive", "mean"]), signs=st.booleans(),
       seed=st.integers(0, 2**16))
def test_bn_after_activation_leaves_one_stream_affine_per_block(dim, depth, k, act, branch_first, pool, signs, seed):
    """No BatchNorm is left. Per block one affine stays on the residual stream (its shift meets the
    DW conv's zero padding; GELU lets no scale cross): 2 vectors (GELU, or ReLU with negative
    gammas), 1 (ReLU with positive gammas) — what the ConvMixer family file leaves."""
    model = convmixer_like(dim, depth, k, act, branch_first, pool)
    out, rep = fold_checked(model, torch.randn(2, 3, 8, 8), seed, signs=signs)
    assert _n_bn(out) == 0
    census = affine_census(out)
    assert census.norm_affines == 0 and census.tables == 0
    assert census.vectors <= (1 if act != "gelu" and not signs else 2) * depth
    kinds = _kinds(rep)
    assert sum("(out of the residual sum)" in k for k in kinds) == depth
    # stem BN and every block's two BNs, but the last one, which goes straight into the head
    assert sum("(through the ReLU)" in k for k in kinds) == (0 if act == "gelu" else 2 * depth)
    n_skip = sum("(skip-path multiply" in k for k in kinds)  # ReLU: only where a branch gamma is negative
    assert n_skip == depth if act == "gelu" else n_skip <= (depth if signs else 0)
    assert any(k.endswith("->Linear") for k in kinds)  # the last BN through the pool into the head
    assert len(rep.left) == depth


def _stream_block(act="gelu", k=3) -> nn.Sequential:
    return convmixer_like(4, 1, k, act)


def test_stream_shift_meeting_zero_padding_is_left_with_the_reason():
    _, rep = fold_checked(_stream_block(), torch.randn(2, 3, 8, 8))
    (reason,) = _left(rep).values()
    assert "zero-padded" in reason and "used 2 times" in reason


def test_zero_branch_scale_is_not_factored_out():
    model = randomize_(_stream_block()).eval()
    bn1 = model[3][0].fn[2]
    with torch.no_grad():
        bn1.weight[1] = 0.0  # s1 = 0 in one channel: p + 0*d + t cannot be written s1 * (p/s1 + d) + t
    _, rep = fold_graph(model, torch.randn(2, 3, 8, 8))
    assert not any("(out of the residual sum)" in k for k in _kinds(rep))
    assert "exactly 0" in _left(rep)["3.0.fn.2"]


def test_shared_dw_conv_takes_no_inverse_scale():
    """A DW conv module called at two places cannot absorb 1/k for one of them: the skip multiply stays."""
    class SharedDW(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.act0, self.bn0 = nn.Conv2d(3, 4, 2, 2), nn.GELU(), nn.BatchNorm2d(4)
            self.dw, self.act1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.GELU(), nn.BatchNorm2d(4)
            self.pw = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            r = self.bn0(self.act0(self.stem(x)))
            u = self.bn1(self.act1(self.dw(r))) + r
            return self.pw(u) + self.dw(r)

    _, rep = fold_checked(SharedDW(), torch.randn(2, 3, 8, 8))
    assert any("(out of the residual sum)" in k for k in _kinds(rep))
    assert not any("(skip-path multiply" in k for k in _kinds(rep))
    left = _left(rep)  # the skip multiply 1/s1 (from bn1) stays; the stream affine says why
    assert "bn1" in left and "called 2 times" in left["bn0"]


@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU6, nn.SiLU, nn.Tanh])
def test_no_scale_crosses_a_non_homogeneous_activation(act):
    m = nn.Sequential(nn.Conv2d(3, 4, 1), act(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, rep = fold_checked(m, torch.randn(2, 3, 5, 5))
    assert not rep.folded and "2" in _left(rep)


def test_relu_then_padded_conv_moves_the_scale_refuses_the_shift():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, rep = fold_checked(m, torch.randn(2, 3, 5, 5))
    assert _kinds(rep) == ["BatchNorm2d scale->Conv2d (through the ReLU)"]
    assert "zero-padded" in _left(rep)["2"]


def test_relu_output_used_twice_keeps_the_scale():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.out = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            a = torch.relu(self.conv(x))
            return self.out(self.bn(a)) + a

    _, rep = fold_checked(Tap(), torch.randn(2, 3, 5, 5))
    assert not rep.folded and "used 2 times" in _left(rep)["bn"]


def test_bn_on_the_token_axis_after_relu_is_refused():
    """BatchNorm1d on (B, N, C) normalizes the N tokens; the Linear before the ReLU writes C."""
    m = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.GELU())
    _, rep = fold_checked(m, torch.randn(2, 5, 5))
    assert not rep.folded and "writes axis 2" in _left(rep)["2"]


def test_residual_sum_used_twice_keeps_the_branch_affine():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw, self.bn, self.pw = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            u = x + self.bn(torch.nn.functional.gelu(self.dw(x)))
            return self.pw(u) + u

    _, rep = fold_checked(Fork(), torch.randn(2, 4, 5, 5))
    assert not rep.folded and "the residual sum: its result is used 2 times" in _left(rep)["bn"]


@pytest.mark.parametrize("name,wrong", [
    ("positive_part", lambda s: (s.double().abs() * 1.001, s.double().sign())),
    ("residual_skip_scale", lambda s: 1.001 / s.double()),
])
def test_a_wrong_identity_is_caught_by_the_final_check(monkeypatch, name, wrong):
    monkeypatch.setattr(T, name, wrong)
    model = randomize_(_stream_block("relu" if name == "positive_part" else "gelu")).eval()
    with pytest.raises(VerificationError):
        fold_graph(model, torch.randn(2, 3, 8, 8))
