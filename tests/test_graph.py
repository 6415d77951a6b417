"""The generic graph pass on foreign-style models, each fold and each refusal.

The models below are written the way other libraries write them (timm/deit ResMLP with
``alpha``/``beta`` or ``g``/``b`` affines and layer-scales, an einops-heavy Mixer, flat
``nn.Sequential``s); none of their classes is known to the package. Every refusal test
first shows that the PyTorch fuser it guards against really is wrong on that model.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from foreign_models import fold_checked
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vismlp_deploy.errors import UserError, VerificationError
from vismlp_deploy.models.init import randomize_
from vismlp_deploy.reparam import graph_rules
from vismlp_deploy.reparam.graph import fold_graph

_fold = fold_checked


def _left(rep) -> dict[str, str]:
    return {x.path: x.reason for x in rep.left}


def _n_modules(m: nn.Module, cls) -> int:
    return sum(isinstance(x, cls) for x in m.modules())


# --------------------------------------------------------------------- foreign ResMLP
class AffAlphaBeta(nn.Module):  # deit/timm style: alpha * x + beta, parameters (1, 1, C)
    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class AffGB(nn.Module):  # another style: x * g + b with (C,) parameters
    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.g + self.b


class ResBlk(nn.Module):
    def __init__(self, n, c, aff, conv_tokens=False, addcmul_residual=False):
        super().__init__()
        self.norm1, self.norm2 = aff(c), aff(c)
        self.linear_tokens = nn.Conv1d(n, n, 1) if conv_tokens else nn.Linear(n, n)
        self.conv_tokens, self.addcmul_residual = conv_tokens, addcmul_residual
        self.mlp_channels = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.ls1 = nn.Parameter(torch.ones(c))
        self.ls2 = nn.Parameter(torch.ones(c))

    def forward(self, x):  # (B, N, C)
        y = self.norm1(x)
        y = self.linear_tokens(y) if self.conv_tokens else self.linear_tokens(y.transpose(1, 2)).transpose(1, 2)
        x = x + self.ls1 * y
        if self.addcmul_residual:
            return torch.addcmul(x, self.ls2, self.mlp_channels(self.norm2(x)))
        return x + self.ls2 * self.mlp_channels(self.norm2(x))


class ForeignResMLP(nn.Module):
    def __init__(self, c=16, depth=2, aff=AffAlphaBeta, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, 4)
        self.blocks = nn.Sequential(*[ResBlk(16, c, aff, **kw) for _ in range(depth)])
        self.norm = aff(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


@pytest.mark.parametrize("aff", [AffAlphaBeta, AffGB])
@pytest.mark.parametrize("kw", [{}, {"conv_tokens": True}, {"addcmul_residual": True}])
def test_resmlp_style_folds_every_foldable_affine(aff, kw):
    x = torch.randn(2, 3, 16, 16)
    depth = 2
    model = ForeignResMLP(16, depth, aff, **kw)
    out, rep = _fold(model, x)  # N == C == 16: axes, not shapes, decide
    folded = [p for p, _ in rep.folded_paths]
    for i in range(depth):  # Aff2 -> fc1 and ls2 -> fc2; Aff1 through the token linear into ls1
        assert any(f"blocks.{i}.norm2" in p for p in folded)
        assert f"blocks.{i}.mlp_channels.2" in folded
        assert any(f"blocks.{i}.norm1" in p for p in folded)
    assert any(p.startswith("norm.") for p in folded)  # final affine -> head through the mean
    left = _left(rep)  # per block one scale + (N, C) bias table after the token linear, as the family file
    assert len(left) == depth, left
    for i in range(depth):
        (path,) = [p for p in left if p.startswith(f"blocks.{i}.norm1")]
        assert f"blocks.{i}.ls1" in path and "bias table" in left[path]
    assert all(b is None for m in out.modules() if isinstance(m, nn.Conv1d) for b in [m.bias])  # into the table
    originals = {n for n, _ in model.named_parameters() if "norm" in n or ".ls" in n}
    assert not originals & {n for n, _ in out.named_parameters()}


# ------------------------------------------------------------- einops-heavy Mixer
class MixerBlk(nn.Module):
    def __init__(self, n, c):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c, eps=1e-6), nn.LayerNorm(c, eps=1e-6)
        self.mlp_tokens = nn.Sequential(nn.Linear(n, 2 * n), nn.GELU(), nn.Linear(2 * n, n))
        self.mlp_channels = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))

    def forward(self, x):
        x = x + rearrange(self.mlp_tokens(rearrange(self.norm1(x), "b n c -> b c n")), "b c n -> b n c")
        return x + self.mlp_channels(self.norm2(x))


class EinopsMixer(nn.Module):
    def __init__(self, c=16, depth=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 4, 4), Rearrange("b c h w -> b (h w) c"))
        self.blocks = nn.Sequential(*[MixerBlk(16, c) for _ in range(depth)])
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x))).mean(1))


def test_mixer_style_with_einops():
    out, rep = _fold(EinopsMixer(), torch.randn(2, 3, 16, 16))
    assert rep.folded["LayerNorm.affine->Linear"] == 3  # norm2 of each block + final norm
    left = _left(rep)
    assert set(left) == {"blocks.0.norm1", "blocks.1.norm1"}
    assert all("axis" in r for r in left.values())
    assert out.get_submodule("norm").weight is None and out.get_submodule("blocks.0.norm1").weight is not None


def test_rearrange_carries_the_channel_axis():
    m = nn.Sequential(nn.Conv2d(3, 8, 2, 2), nn.BatchNorm2d(8), Rearrange("b c h w -> b (h w) c"), nn.Linear(8, 4))
    _, rep = _fold(m, torch.randn(2, 3, 4, 4))
    assert rep.folded["BatchNorm2d->Conv2d"] == 1
    m2 = nn.Sequential(nn.Conv2d(3, 8, 2, 2), nn.ReLU(), nn.BatchNorm2d(8), Rearrange("b c h w -> b (h w) c"),
                       nn.Linear(8, 4))
    _, rep2 = _fold(m2, torch.randn(2, 3, 4, 4))
    assert rep2.folded["BatchNorm2d->Linear"] == 1  # channel axis 1 -> last, through the rearrange


# ------------------------------------------------------------------ the single folds
def test_conv_bn_both_directions_and_linear_bn():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8),
                      nn.Conv2d(8, 8, 1), nn.Flatten(1), nn.Linear(8 * 16, 10), nn.BatchNorm1d(10))
    out, rep = _fold(m, torch.randn(2, 3, 4, 4))
    assert rep.folded == {"BatchNorm2d->Conv2d": 2, "BatchNorm1d->Linear": 1}
    assert _n_modules(out, nn.modules.batchnorm._BatchNorm) == 0 and not rep.left


def test_layer_scale_on_conv_and_groupnorm():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.gn, self.pw, self.dw = nn.GroupNorm(1, 8), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.gamma = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x + self.gamma[:, None, None] * self.dw(self.pw(self.gn(x)))

    out, rep = _fold(Blk(), torch.randn(2, 8, 5, 5))
    assert rep.folded == {"GroupNorm.affine->Conv2d": 1, "mul->Conv2d": 1}


def test_parallel_branches_are_summed():
    class Par(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 1)
            self.c, self.d = nn.Linear(6, 5), nn.Linear(6, 5, bias=False)

        def forward(self, x):
            y = (self.a(x) + self.b(x)).permute(0, 2, 3, 1)
            return self.c(y) + self.d(y)

    out, rep = _fold(Par(), torch.randn(2, 4, 5, 5))
    assert rep.folded == {"parallel Conv2d+Conv2d": 1, "parallel Linear+Linear": 1}
    assert _n_modules(out, nn.Conv2d) == 1 and _n_modules(out, nn.Linear) == 1


# ------------------------------------------------- refusals of the known-wrong fusers
def test_bn_after_relu_is_not_adjacent():
    m = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8))).eval()
    x = torch.randn(2, 3, 6, 6)
    wrong = torch.ao.quantization.fuse_modules(copy.deepcopy(m), [["0", "2"]])
    assert rel_err(wrong(x), m(x)) > 1e-2  # the named-module fuser folds across the ReLU
    _, rep = _fold(m, x)  # only the BN's positive scale crosses the ReLU (relu(p*y) = p*relu(y)), not its shift
    assert rep.folded == {"BatchNorm2d scale->Conv2d (through the ReLU)": 1}
    assert "ReLU" in _left(rep)["2"]


def test_module_called_twice_is_not_rewritten():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            return self.conv(self.bn(self.conv(x)))

    m = randomize_(Twice()).eval()
    x = torch.randn(2, 8, 4, 4)
    from torch.fx.experimental.optimization import fuse
    assert rel_err(fuse(copy.deepcopy(m))(x), m(x)) > 1e-2  # fx fuse changes both calls
    _, rep = _fold(m, x)
    assert not rep.folded and "called 2 times" in _left(rep)["bn"]


def test_linear_bn1d_on_tokens_is_refused():
    m = randomize_(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))).eval()  # on (B, N=6, C=6)
    x = torch.randn(3, 6, 6)
    from torch.nn.utils.fusion import fuse_linear_bn_eval
    assert rel_err(fuse_linear_bn_eval(m[0], m[1])(x), m(x)) > 1e-2  # folds into the wrong axis
    _, rep = _fold(m, x)
    assert not rep.folded and "axis" in _left(rep)["1"]
    _, rep2 = _fold(m, torch.randn(3, 6))  # on (B, C) the same modules fold
    assert rep2.folded == {"BatchNorm1d->Linear": 1}


def test_intermediate_used_twice_is_refused():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    _, rep = _fold(Res(), torch.randn(2, 4, 3, 3))
    assert not rep.folded and "used 2 times" in _left(rep)["bn"]


def test_shift_meeting_zero_padding_is_refused():
    m = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    _, rep = _fold(m, torch.randn(2, 4, 5, 5))
    assert not rep.folded and "zero-padded" in _left(rep)["0"]
    for conv in (nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")):
        _, rep = _fold(nn.Sequential(nn.BatchNorm2d(4), conv), torch.randn(2, 4, 5, 5))
        assert rep.folded == {"BatchNorm2d->Conv2d": 1}


def test_norm_axis_mismatches_are_refused():
    class LNConv(nn.Module):  # LayerNorm over the last (W) axis then a 1x1 conv over C
        def __init__(self):
            super().__init__()
            self.ln, self.ln2, self.conv = nn.LayerNorm(5), nn.LayerNorm([5, 5]), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.ln2(self.ln(x)))

    _, rep = _fold(LNConv(), torch.randn(2, 4, 5, 5))
    left = _left(rep)
    assert not rep.folded and "2 axes" in left["ln2"] and "ln" in left


def test_tied_weights_are_not_rewritten():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    _, rep = _fold(Tied(), torch.randn(3, 4))
    assert not rep.folded and "shares parameters" in _left(rep)["bn"]


# ------------------------------------------------------------ untraceable modules
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x  # fx cannot branch on data


def test_untraceable_submodule_is_left_rest_folded():
    m = nn.Sequential(DataDependent(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    out, rep = _fold(m, torch.randn(2, 4, 3, 3))
    assert "not traceable" in _left(rep)["0"]
    assert rep.folded["BatchNorm2d->Conv2d"] == 2  # inside the leaf too
    assert _n_modules(out, nn.BatchNorm2d) == 0


def test_untraceable_root_folds_children():
    _, rep = _fold(DataDependent(), torch.randn(2, 4, 3, 3))
    assert "<model>" in _left(rep) and rep.folded["BatchNorm2d->Conv2d"] == 1


# ----------------------------------------------------------------------- guards
def test_failed_verification_raises(monkeypatch):
    def wrong(weight, bias, scale, shift):
        return weight * 1.01, bias
    monkeypatch.setattr(graph_rules.T, "fold_affine_after", wrong)
    m = randomize_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    with pytest.raises(VerificationError):
        fold_graph(m, torch.randn(2, 3, 3, 3))


def test_training_mode_and_input_untouched():
    m = randomize_(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    with pytest.raises(UserError):
        fold_graph(m, torch.randn(2, 3, 3, 3))
    m.eval()
    before = copy.deepcopy(m.state_dict())
    fold_graph(m, torch.randn(2, 3, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ---------------------------------------------------- property: random affine chains
_OPS = ["bn", "mul", "add", "addcmul", "relu", "ln"]


@settings(max_examples=12)
@given(st.lists(st.sampled_from(_OPS), min_size=1, max_size=5), st.booleans())
def test_random_chains_fold_exactly(ops, tokens):
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc_in, self.fc_out = nn.Linear(6, 6), nn.Linear(6, 6)
            self.bns = nn.ModuleList(nn.BatchNorm1d(6) for _ in ops)
            self.lns = nn.ModuleList(nn.LayerNorm(6) for _ in ops)
            self.ps = nn.ParameterList(nn.Parameter(torch.rand(6) + 0.5) for _ in ops)
            self.alpha = nn.Parameter(torch.ones(6))

        def forward(self, x):
            x = self.fc_in(x)
            for op, bn, ln, p in zip(ops, self.bns, self.lns, self.ps):
                if op == "bn":
                    x = bn(x)
                elif op == "mul":
                    x = x * p
                elif op == "add":
                    x = p + x
                elif op == "addcmul":
                    x = torch.addcmul(p, self.alpha, x)
                elif op == "ln":
                    x = ln(x)
                else:
                    x = F.relu(x)
            return self.fc_out(x)

    x = torch.randn(4, 6, 6) if tokens else torch.randn(5, 6)
    m = Chain()
    _fold(m, x)  # fold_graph verifies fp32 and fp64; _fold checks again on other inputs
