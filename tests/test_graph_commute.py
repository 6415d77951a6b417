"""Generic pass: affines through token mixing, merged with each other, and into the head through pooling.

Every model is randomized (``randomize_foreign_``: statistics, affines, layer-scales), folded
by ``fold_graph`` (which checks fp32 to 1e-5 and fp64 to 1e-10 itself) and checked again on
other inputs; each property test also asserts that the rule under test fired, and each trap
that it did not.
"""
from __future__ import annotations

import einops
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Reduce
from foreign_models import affine_census, fold_checked
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vismlp_deploy.errors import VerificationError
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.reparam import transforms as T
from vismlp_deploy.reparam.graph import fold_graph


def _left(rep) -> dict[str, str]:
    return {x.path: x.reason for x in rep.left}


def _kinds(rep) -> list[str]:
    return [k for _, k in rep.folded_paths]


class Aff(nn.Module):
    """A per-channel affine on the last axis in one of several styles."""

    def __init__(self, c: int, style: str):
        super().__init__()
        self.style = style
        if style == "layernorm":
            self.ln = nn.LayerNorm(c)
        else:
            self.alpha = nn.Parameter(torch.ones(1, 1, c))
            self.beta = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        if self.style == "layernorm":
            return self.ln(x)
        if self.style == "addcmul":
            return torch.addcmul(self.beta, self.alpha, x)
        if self.style == "mul_add":  # two ops, deit-style
            return self.alpha * x + self.beta
        return x * self.alpha  # scale only


class TokenBlock(nn.Module):
    """``x + ls ⊙ T(aff(x))`` on (B, N, C), T a linear over the N tokens written in several styles."""

    def __init__(self, n: int, c: int, aff: str, mix: str, ls: str, bias: bool):
        super().__init__()
        self.mix, self.ls_style = mix, ls
        self.aff = Aff(c, aff)
        self.tok = nn.Conv1d(n, n, 1, bias=bias) if mix == "conv1d" else nn.Linear(n, n, bias=bias)
        self.ls1 = nn.Parameter(torch.ones(c))

    def token_mix(self, y):
        if self.mix == "transpose":
            return self.tok(y.transpose(1, 2)).transpose(1, 2)
        if self.mix == "permute":
            return self.tok(y.permute(0, 2, 1).contiguous()).permute(0, 2, 1)
        if self.mix == "einops":
            return rearrange(self.tok(rearrange(y, "b n c -> b c n")), "b c n -> b n c")
        return self.tok(y)  # Conv1d(N, N, 1) on (B, N, C): mixes axis 1, the tokens

    def forward(self, x):
        y = self.token_mix(self.aff(x))
        if self.ls_style == "addcmul":
            return torch.addcmul(x, self.ls1, y)
        return x + (y * self.ls1 if self.ls_style == "mul_after" else self.ls1 * y)


@settings(max_examples=20)
@given(n=st.integers(2, 6), c=st.integers(2, 6), aff=st.sampled_from(["addcmul", "mul_add", "layernorm", "scale"]),
       mix=st.sampled_from(["transpose", "permute", "einops", "conv1d"]),
       ls=st.sampled_from(["mul", "mul_after", "addcmul"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_affine_through_token_mixing_merges_into_the_layer_scale(n, c, aff, mix, ls, bias, seed):
    """``ls ⊙ W_tok(alpha ⊙ x + beta) + ... = (ls·alpha) ⊙ (W_tok x) + table``: one scale and one
    (N, C) table are left where there were the affine, the layer-scale and the token bias."""
    block = TokenBlock(n, c, aff, mix, ls, bias)
    out, rep = fold_checked(block, torch.randn(3, n, c), seed)
    pushed = [k for k in _kinds(rep) if "(through" in k]
    expect = not (aff == "scale" and bias)  # scale + token bias -> scale + table: no constant less
    assert len(pushed) == expect, rep.folded_paths
    if expect:
        census = affine_census(out)
        assert census.norm_affines == 0 and census.vectors == 1
        assert census.tables == (aff != "scale" or bias)
        (reason,) = _left(rep).values()
        assert "bias table" in reason or census.tables == 0
        assert out.get_submodule("tok").bias is None  # the token bias went into the table
    else:
        assert "as many constants" in " ".join(_left(rep).values())


def _block(**kw) -> TokenBlock:
    return TokenBlock(**{"n": 4, "c": 5, "aff": "addcmul", "mix": "transpose", "ls": "mul", "bias": True, **kw})


def test_token_linear_called_twice_is_not_rewritten():
    class Twice(TokenBlock):
        def token_mix(self, y):
            return self.tok(self.tok(y.transpose(1, 2))).transpose(1, 2)

    _, rep = fold_checked(Twice(4, 5, "addcmul", "transpose", "mul", True), torch.randn(2, 4, 5))
    assert not rep.folded
    assert any("called 2 times" in r for r in _left(rep).values())


def test_nonlinearity_after_the_token_linear_is_not_crossed():
    class Gelu(TokenBlock):  # Mixer's order: LN -> token fc -> GELU; the affine must stay before the GELU
        def token_mix(self, y):
            return F.gelu(self.tok(y.transpose(1, 2))).transpose(1, 2)

    _, rep = fold_checked(Gelu(4, 5, "layernorm", "transpose", "mul", True), torch.randn(2, 4, 5))
    assert not any("(through" in k for k in _kinds(rep))
    assert "gelu" in _left(rep)["aff.ln"]


def test_scale_along_the_mixed_axis_does_not_commute():
    class TokenScale(TokenBlock):  # the affine varies along the tokens too (a table): W mixes that axis
        def __init__(self):
            super().__init__(4, 5, "addcmul", "transpose", "mul", True)
            self.aff.alpha = nn.Parameter(torch.ones(1, 4, 5))

    _, rep = fold_checked(TokenScale(), torch.randn(2, 4, 5))
    assert not any("(through" in k for k in _kinds(rep))
    assert "varies along the axis the linear mixes" in " ".join(_left(rep).values())


def test_token_output_used_twice_is_not_rewritten():
    class Tap(TokenBlock):
        def forward(self, x):
            t = self.tok(self.aff(x).transpose(1, 2))
            return x + self.ls1 * t.transpose(1, 2) + t.mean(1, keepdim=True).transpose(1, 2)

    _, rep = fold_checked(Tap(4, 5, "addcmul", "transpose", "mul", True), torch.randn(2, 4, 5))
    assert not any("(through" in k for k in _kinds(rep))
    assert any("used 2 times" in r for r in _left(rep).values())


def test_conv_with_a_kernel_mixes_positions_and_is_not_crossed():
    block = _block(mix="conv1d")
    block.tok = nn.Conv1d(4, 4, 3, padding=1)  # mixes tokens *and* channel positions
    _, rep = fold_checked(block, torch.randn(2, 4, 5))
    assert not any("(through" in k for k in _kinds(rep))
    assert "mixes positions too" in " ".join(_left(rep).values())


def test_wrong_table_is_caught_by_the_check(monkeypatch):
    def no_bias(weight, bias, scale, shift, axis, rank):
        return T.compose_affines(scale, None, None, None)[0], torch.zeros([1] * rank, dtype=torch.float64)
    monkeypatch.setattr(T, "affine_through_linear", no_bias)
    block = randomize_(_block()).eval()
    with pytest.raises(VerificationError):
        fold_graph(block, torch.randn(2, 4, 5))


# ------------------------------------------------------------------ consecutive affines
_CHAIN_OPS = ["mul", "add", "sub", "div", "addcmul", "bn", "transpose"]


@settings(max_examples=20)
@given(ops=st.lists(st.sampled_from(_CHAIN_OPS), min_size=2, max_size=6), seed=st.integers(0, 2**16))
def test_consecutive_affines_collapse_to_one(ops, seed):
    """Between two GELUs nothing can enter a Linear: any chain of affines (through transposes)
    becomes a single affine node."""
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = nn.ParameterList(nn.Parameter(torch.ones(5)) for _ in ops)
            self.bns = nn.ModuleList(nn.BatchNorm1d(5) for _ in ops)

        def forward(self, x):  # (B, 5, 5): channel axis alternates with each transpose
            x, axis = F.gelu(x), 2
            for op, p, bn in zip(ops, self.ps, self.bns):
                v = p.reshape([1, 5, 1] if axis == 1 else [1, 1, 5])
                if op == "transpose":
                    x, axis = x.transpose(1, 2), 3 - axis
                elif op == "bn":
                    x, axis = bn(x.transpose(1, 2) if axis == 2 else x), 1
                elif op == "mul":
                    x = x * v
                elif op == "add":
                    x = v + x
                elif op == "sub":
                    x = x - v
                elif op == "div":
                    x = x / v
                else:
                    x = torch.addcmul(v, v, x)
            return F.gelu(x)

    _, rep = fold_checked(Chain(), torch.randn(3, 5, 5), seed)
    n_affines = sum(1 for op in ops if op != "transpose")
    assert sum("(merged)" in k for k in _kinds(rep)) == max(n_affines - 1, 0)
    assert len(rep.left) == (n_affines > 0)


def test_affine_used_twice_is_not_merged():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))

        def forward(self, x):
            y = F.gelu(x) * self.a
            return F.gelu(y + self.b) + y

    _, rep = fold_checked(Fork(), torch.randn(2, 4))
    assert not rep.folded and len(rep.left) == 2


# ------------------------------------------------------------------ into the head through pooling
_POOLS = {
    "mean1": (lambda x: x.mean(1), "tokens"),
    "mean-2": (lambda x: x.mean(dim=-2), "tokens"),
    "reduce_layer": (Reduce("b n c -> b c", "mean"), "tokens"),
    "reduce_fn": (lambda x: einops.reduce(x, "b n c -> b c", "mean"), "tokens"),
    "deit": (lambda x: x.mean(dim=1).reshape(x.shape[0], 1, -1)[:, 0], "tokens"),
    "adaptive_flatten": (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), "nchw"),
    "mean23": (lambda x: x.mean((2, 3)), "nchw"),
    "functional_pool": (lambda x: torch.flatten(F.adaptive_avg_pool2d(x, 1), 1), "nchw"),
}


class PoolHead(nn.Module):
    def __init__(self, norm: str, pool: str, c: int = 6):
        super().__init__()
        fn, layout = _POOLS[pool]
        self.pool = fn if isinstance(fn, nn.Module) else None
        self.fn = None if self.pool is not None else fn
        self.gelu = nn.GELU()
        self.norm = {"layernorm": nn.LayerNorm(c), "affine": Aff(c, "addcmul"),
                     "bn": nn.BatchNorm2d(c) if layout == "nchw" else nn.BatchNorm1d(4)}[norm]
        self.layout = layout
        self.head_drop = nn.Dropout(0.1)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.gelu(x)
        if self.layout == "nchw" and not isinstance(self.norm, nn.BatchNorm2d):
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last norm, NCHW pool
        else:
            x = self.norm(x)
        x = self.pool(x) if self.pool is not None else self.fn(x)
        return self.head(self.head_drop(x))


@settings(max_examples=20)
@given(norm=st.sampled_from(["layernorm", "affine", "bn"]), pool=st.sampled_from(sorted(_POOLS)),
       seed=st.integers(0, 2**16))
def test_affine_before_pooling_folds_into_the_head(norm, pool, seed):
    """``head(mean(s ⊙ x + t)) = head'(mean(x))``: the mean's weights sum to 1 over the pooled axes."""
    layout = _POOLS[pool][1]
    x = torch.randn(2, 6, 3, 4) if layout == "nchw" else torch.randn(2, 4, 6)
    if norm == "bn" and layout == "tokens":  # BatchNorm1d(4) normalizes the tokens, not the channels
        _, rep = fold_checked(PoolHead(norm, pool), x, seed)
        assert not rep.folded and "reduces or mixes the axis it acts on" in _left(rep)["norm"]
        return
    out, rep = fold_checked(PoolHead(norm, pool), x, seed)
    assert [k.endswith("->Linear") for k in _kinds(rep)] == [True] and not rep.left
    assert affine_census(out).vectors == 0


@pytest.mark.parametrize("pool,width,why", [
    (lambda x: x.mean(2), 4, "reduces or mixes the axis it acts on"),  # the normalized axis itself
    (lambda x: x.amax(1), 6, "amax"),
    (Reduce("b n c -> b c", "sum"), 6, "Reduce"),  # a sum adds the shift N times
    (lambda x: F.gelu(x).mean(1), 6, "gelu"),
], ids=["mean_over_channels", "max", "sum", "gelu"])
def test_pool_that_does_not_commute_is_refused(pool, width, why):
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = pool if isinstance(pool, nn.Module) else None
            self.norm, self.head = nn.LayerNorm(6), nn.Linear(width, 3)

        def forward(self, x):
            x = self.norm(x)
            return self.head(self.pool(x) if self.pool is not None else pool(x))

    _, rep = fold_checked(Head(), torch.randn(2, 4, 6))
    assert not rep.folded and why in _left(rep)["norm"]


def test_head_used_twice_is_not_rewritten():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x):
            return self.head(self.head(self.norm(x).mean(1)))

    _, rep = fold_checked(Twice(), torch.randn(2, 4, 6))
    assert not rep.folded and "called 2 times" in _left(rep)["norm"]
