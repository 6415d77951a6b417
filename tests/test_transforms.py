"""Property tests for every identity in reparam/transforms.py, each against the module it replaces.

Random shapes, groups, kernel sizes, paddings, strides, dilations, eps and tiny variances;
fp64 relative error <= 1e-10 and fp32 <= 1e-5. Refusals are tested where the identity fails.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from hypothesis import assume, given
from hypothesis import strategies as st

from vismlp_deploy.errors import NotExactError
from vismlp_deploy.reparam import transforms as T

DTYPES = st.sampled_from([torch.float64, torch.float32])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn_stats(c: int, g: torch.Generator, tiny_var: bool, dtype) -> dict:
    var = torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.5
    if tiny_var:  # variances far below eps: the rsqrt is dominated by eps
        var = var * 1e-7
    return dict(
        running_mean=(torch.randn(c, generator=g, dtype=torch.float64) * 0.2).to(dtype),
        running_var=var.to(dtype),
        weight=(torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        bias=(torch.randn(c, generator=g, dtype=torch.float64) * 0.2).to(dtype),
    )


def _bn(x: torch.Tensor, s: dict, eps: float) -> torch.Tensor:
    return F.batch_norm(x, s["running_mean"], s["running_var"], s["weight"], s["bias"], False, 0.0, eps)


conv_cases = st.fixed_dictionaries(dict(
    groups=st.integers(1, 3),
    cpg=st.integers(1, 3),          # input channels per group
    opg=st.integers(1, 3),          # output channels per group
    k=st.sampled_from([1, 2, 3, 5]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    h=st.integers(5, 9),
    w=st.integers(5, 9),
    seed=st.integers(0, 2**16),
))


def _conv(case, dtype):
    eff = (case["k"] - 1) * case["dilation"] + 1
    assume(eff <= min(case["h"], case["w"]) + 2 * case["padding"])
    g = _gen(case["seed"])
    cin, out = case["cpg"] * case["groups"], case["opg"] * case["groups"]
    w = (torch.randn(out, case["cpg"], case["k"], case["k"], generator=g, dtype=torch.float64)
         / (case["cpg"] * case["k"] ** 2) ** 0.5)
    b = torch.randn(out, generator=g, dtype=torch.float64) * 0.1 if case["bias"] else None
    x = torch.randn(2, cin, case["h"], case["w"], generator=g, dtype=torch.float64)
    kw = dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"], groups=case["groups"])
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(w), cast(b), cast(x), kw, g


@given(case=conv_cases, eps=st.sampled_from([1e-5, 1e-3, 1e-6]), tiny=st.booleans(), dtype=DTYPES)
def test_fold_bn_after_conv(case, eps, tiny, dtype):
    w, b, x, kw, g = _conv(case, dtype)
    stats = _bn_stats(w.shape[0], g, tiny, dtype)
    ref = _bn(F.conv2d(x, w, b, **kw), stats, eps)
    w2, b2 = T.fold_bn_after(w, b, stats["running_mean"], stats["running_var"], stats["weight"], stats["bias"], eps)
    assert w2.dtype == dtype
    assert_close(F.conv2d(x, w2, b2, **kw), ref)


@given(cin=st.integers(1, 9), out=st.integers(1, 9), bias=st.booleans(), affine=st.booleans(),
       seed=st.integers(0, 2**16), dtype=DTYPES)
def test_fold_bn_after_linear(cin, out, bias, affine, seed, dtype):
    g = _gen(seed)
    w = torch.randn(out, cin, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    x = torch.randn(4, cin, generator=g, dtype=torch.float64).to(dtype)
    stats = _bn_stats(out, g, False, dtype)
    if not affine:
        stats["weight"] = stats["bias"] = None
    ref = _bn(F.linear(x, w, b), stats, 1e-5)
    w2, b2 = T.fold_bn_after(w, b, stats["running_mean"], stats["running_var"], stats["weight"], stats["bias"], 1e-5)
    assert_close(F.linear(x, w2, b2), ref)


@given(case=conv_cases, dtype=DTYPES)
def test_fold_affine_before_conv(case, dtype):
    """An input affine enters any conv exactly when there is no zero padding (bias sums the taps)."""
    case = {**case, "padding": 0}
    w, b, x, kw, g = _conv(case, dtype)
    cin = x.shape[1]
    s = (torch.rand(cin, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    t = (torch.randn(cin, generator=g, dtype=torch.float64) * 0.2).to(dtype)
    ref = F.conv2d(x * s[:, None, None] + t[:, None, None], w, b, **kw)
    w2, b2 = T.fold_affine_before(w, b, s, t, groups=case["groups"], padding=0)
    assert_close(F.conv2d(x, w2, b2, **kw), ref)


@given(case=conv_cases, dtype=DTYPES)
def test_fold_affine_before_padded_conv_scale_only_is_exact_shift_is_refused(case, dtype):
    case = {**case, "padding": max(1, case["padding"])}
    w, b, x, kw, g = _conv(case, dtype)
    cin = x.shape[1]
    s = (torch.rand(cin, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    ref = F.conv2d(x * s[:, None, None], w, b, **kw)
    w2, b2 = T.fold_affine_before(w, b, s, None, groups=case["groups"], padding=case["padding"])
    assert_close(F.conv2d(x, w2, b2, **kw), ref)
    t = torch.full((cin,), 0.3, dtype=dtype)
    with pytest.raises(NotExactError, match="zero-padded"):
        T.fold_affine_before(w, b, s, t, groups=case["groups"], padding=case["padding"])


@given(case=conv_cases, dtype=DTYPES)
def test_shift_bias_map_is_exact_at_fixed_size(case, dtype):
    w, b, x, kw, g = _conv(case, dtype)
    cin = x.shape[1]
    t = (torch.randn(cin, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    ref = F.conv2d(x + t[:, None, None], w, b, **kw)
    bias_map = T.shift_bias_map(w, t, x.shape[-2:], **kw)
    got = F.conv2d(x, w, b, **kw) + bias_map
    assert_close(got, ref)


@given(cin=st.integers(1, 9), out=st.integers(1, 9), tokens=st.integers(1, 6), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_fold_affine_before_and_after_linear(cin, out, tokens, seed, dtype):
    """LayerNorm γ/β or Affine -> fc1 (input side); layer-scale after fc2 (output side)."""
    g = _gen(seed)
    w = torch.randn(out, cin, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(2, tokens, cin, generator=g, dtype=torch.float64).to(dtype)
    s, t = (torch.rand(cin, generator=g, dtype=torch.float64).to(dtype) + 0.5,
            torch.randn(cin, generator=g, dtype=torch.float64).to(dtype))
    w2, b2 = T.fold_affine_before(w, b, s, t)
    assert_close(F.linear(x, w2, b2), F.linear(x * s + t, w, b))
    ls = torch.rand(out, generator=g, dtype=torch.float64).to(dtype) + 0.2
    w3, b3 = T.fold_affine_after(w, b, ls, torch.zeros(out, dtype=dtype))
    assert_close(F.linear(x, w3, b3), ls * F.linear(x, w, b))


@given(groups=st.integers(1, 3), cpg=st.integers(1, 3), opg=st.integers(1, 4), k=st.sampled_from([1, 3, 5, 7]),
       h=st.integers(1, 6), w=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_conv_to_fc_identity_trick(groups, cpg, opg, k, h, w, bias, seed, dtype):
    """Grouped conv with in != out channels, any odd k, non-square maps -> exact FC kernel."""
    g = _gen(seed)
    cin, out = cpg * groups, opg * groups
    ker = torch.randn(out, cpg, k, k, generator=g, dtype=torch.float64).to(dtype)
    bvec = torch.randn(out, generator=g, dtype=torch.float64).to(dtype) if bias else None
    x = torch.randn(3, cin, h, w, generator=g, dtype=torch.float64).to(dtype)
    ref = F.conv2d(x, ker, bvec, padding=k // 2, groups=groups)
    fc, fcb = T.conv_to_fc(ker, bvec, h, w, groups=groups, padding=k // 2)
    assert fc.shape == (out * h * w, cpg * h * w)
    # the FC kernel is a grouped 1x1 conv on the flattened (c, y, x) vectors
    got = F.conv1d(x.reshape(3, cin * h * w, 1), fc.unsqueeze(-1), fcb, groups=groups).reshape(ref.shape)
    assert_close(got, ref)


@pytest.mark.parametrize("cin,out", [(2, 3), (3, 3)])
def test_conv_to_fc_matches_published_reshape_only_when_in_equals_out(cin, out):
    """The published pseudo-code flattens the identity response to (O·h·w, C·h·w) rows before
    transposing; that is right only when C == O. Ours is exact in both cases."""
    g = _gen(0)
    h, w = 3, 4
    ker = torch.randn(out, cin, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(cin, h, w, generator=g, dtype=torch.float64)
    ref = F.conv2d(x[None], ker, padding=1)[0]
    fc, _ = T.conv_to_fc(ker, None, h, w, padding=1)
    assert_close((fc @ x.reshape(-1)).reshape(ref.shape), ref)
    eye = torch.eye(cin * h * w, dtype=torch.float64).reshape(-1, cin, h, w)
    published = F.conv2d(eye, ker, padding=1).reshape(out * h * w, cin * h * w).t().reshape(out * h * w, cin * h * w)
    err = ((published @ x.reshape(-1)).reshape(ref.shape) - ref).abs().max()
    assert (err < 1e-12) == (cin == out)


@given(s=st.integers(1, 5), k=st.sampled_from([1, 3, 5]), h=st.integers(1, 7), w=st.integers(1, 7),
       seed=st.integers(0, 2**16), dtype=DTYPES)
def test_depthwise_conv_to_fc(s, k, h, w, seed, dtype):
    g = _gen(seed)
    ker = torch.randn(s, 1, k, k, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(2, s, h, w, generator=g, dtype=torch.float64).to(dtype)
    ref = F.conv2d(x, ker, padding=k // 2, groups=s)
    m = T.depthwise_conv_to_fc(ker, h, w, k // 2)
    got = torch.einsum("soi,nsi->nso", m, x.reshape(2, s, h * w)).reshape(ref.shape)
    assert_close(got, ref)


@given(ks=st.lists(st.sampled_from([1, 3, 5, 7]), min_size=1, max_size=4), groups=st.integers(1, 3),
       cpg=st.integers(1, 2), opg=st.integers(1, 2), identity=st.booleans(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_merge_parallel_kernels_with_identity(ks, groups, cpg, opg, identity, seed, dtype):
    g = _gen(seed)
    cin, out = cpg * groups, opg * groups
    if identity:
        out = cin  # an identity branch needs in == out
    x = torch.randn(2, cin, 6, 5, generator=g, dtype=torch.float64).to(dtype)
    branches, ref = [], 0
    for k in ks:
        ker = torch.randn(out, cin // groups, k, k, generator=g, dtype=torch.float64).to(dtype)
        b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype)
        branches.append((ker, b, k // 2))
        ref = ref + F.conv2d(x, ker, b, padding=k // 2, groups=groups)
    if identity:  # RepVGG's identity branch: a 1x1 kernel with a one at each channel's own input
        eye = torch.zeros(cin, cin // groups, 1, 1, dtype=dtype)
        eye[torch.arange(cin), torch.arange(cin) % (cin // groups), 0, 0] = 1
        branches.append((eye, None, 0))
        ref = ref + x
    w, b, pad = T.merge_parallel_kernels(branches)
    assert_close(F.conv2d(x, w, b, padding=pad, groups=groups), ref)


def test_merge_parallel_kernels_refuses_misaligned_branch():
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(NotExactError, match="centre aligned"):
        T.merge_parallel_kernels([(w, None, 0), (w, None, 1)])


def test_bn_scale_shift_refuses_non_finite_statistics():
    with pytest.raises(NotExactError, match="NaN"):
        T.bn_scale_shift(torch.tensor([float("nan")]), torch.ones(1), None, None, 1e-5)
    with pytest.raises(NotExactError, match="batch statistics"):
        T.bn_scale_shift(None, None, None, None, 1e-5)


def test_pad_kernel_refuses_uncentrable():
    with pytest.raises(NotExactError):
        T.pad_kernel(torch.ones(1, 1, 2, 2), 3)


# ------------------------------------------------ identities of the generic graph pass
def _const(shape, g, dtype, lo=None):
    """A random broadcast constant; ``lo``: uniform in [lo, lo + 1) instead of normal."""
    t = torch.randn(shape, generator=g, dtype=torch.float64) if lo is None else \
        torch.rand(shape, generator=g, dtype=torch.float64) + lo
    return t.to(dtype)


def _bshape(full, keep):
    """``full`` with 1 on every axis not in ``keep`` (a broadcast constant's shape)."""
    return tuple(n if i in keep else 1 for i, n in enumerate(full))


axes_subsets = st.sets(st.integers(0, 2), max_size=3)


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)), ks1=axes_subsets, kt1=axes_subsets,
       ks2=axes_subsets, kt2=axes_subsets, present=st.tuples(*[st.booleans()] * 4), seed=st.integers(0, 2**16),
       dtype=DTYPES)
def test_compose_affines(shape, ks1, kt1, ks2, kt2, present, seed, dtype):
    """Any broadcast shapes (per channel, bias tables, scalars), any part absent."""
    g = _gen(seed)
    x = _const(shape, g, dtype)
    s1, t1, s2, t2 = (_const(_bshape(shape, k), g, dtype) if p else None
                      for k, p in zip((ks1, kt1, ks2, kt2), present))
    apply = (lambda s, t, v: (v if s is None else s * v) + (0 if t is None else t))
    s, t = T.compose_affines(s1, t1, s2, t2)
    assert (s is None) == (s1 is None and s2 is None) and (t is None) == (t1 is None and t2 is None)
    assert_close(apply(s, t, x.double()).to(dtype), apply(s2, t2, apply(s1, t1, x)))


@given(b=st.integers(1, 3), c=st.integers(1, 6), n_in=st.integers(1, 6), n_out=st.integers(1, 6),
       axis=st.sampled_from([1, 2]), bias=st.booleans(), shift_varies=st.booleans(), scale=st.booleans(),
       shift=st.booleans(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_affine_through_linear_on_another_axis(b, c, n_in, n_out, axis, bias, shift_varies, scale, shift, seed, dtype):
    """``W (s ⊙ x + t) + b = s ⊙ (W x) + table``: the linear mixes ``axis``, s acts on the other one
    (ResMLP: s per channel, W over tokens); t may be per channel or vary along the mixed axis too."""
    g = _gen(seed)
    other = 3 - axis
    full = [b, 0, 0]
    full[axis], full[other] = n_in, c
    x = _const(tuple(full), g, dtype)
    w = _const((n_out, n_in), g, dtype)
    bvec = _const((n_out,), g, dtype) if bias else None
    s = _const(_bshape(full, {other}), g, dtype, lo=0.5) if scale else None
    t = _const(_bshape(full, {other, axis} if shift_varies else {other}), g, dtype) if shift else None

    def linear(v):  # along ``axis``
        return F.linear(v.movedim(axis, -1), w.to(v.dtype),
                        None if bvec is None else bvec.to(v.dtype)).movedim(-1, axis)
    ref = linear((x if s is None else s * x) + (0 if t is None else t))
    s2, table = T.affine_through_linear(w, bvec, s, t, axis, 3)
    mixed = F.linear(x.movedim(axis, -1), w).movedim(-1, axis)
    got = (mixed if s2 is None else s2.to(dtype) * mixed) + table.to(dtype)
    assert table.dtype == torch.float64 and table.shape[axis] == n_out
    assert_close(got, ref)


def test_affine_through_linear_refuses_a_scale_along_the_mixed_axis():
    w = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(NotExactError, match="varies along the axis the linear mixes"):
        T.affine_through_linear(w, None, torch.rand(1, 3, 4) + 0.5, None, 2, 3)


@given(groups=st.integers(1, 3), cpg=st.integers(1, 3), opg=st.integers(1, 3), nd=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16), dtype=DTYPES)
def test_pointwise_conv_as_linear(groups, cpg, opg, nd, seed, dtype):
    g = _gen(seed)
    w = _const((opg * groups, cpg, *[1] * nd), g, dtype)
    x = _const((2, cpg * groups, *[3] * nd), g, dtype)
    conv = F.conv1d if nd == 1 else F.conv2d
    dense = T.pointwise_conv_as_linear(w, groups)
    got = torch.einsum("oc,nc...->no...", dense, x.double())
    assert_close(got.to(dtype), conv(x, w, groups=groups))
    with pytest.raises(NotExactError, match="pointwise"):
        T.pointwise_conv_as_linear(_const((2, 2, *[3] * nd), g, dtype))


@given(c=st.integers(1, 8), signs=st.booleans(), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_residual_skip_scale_factors_the_branch_affine_out(c, signs, seed, dtype):
    """``p + s ⊙ d + t = s ⊙ (k ⊙ p + d) + t`` with k = 1/s (any sign), refused for s = 0."""
    g = _gen(seed)
    p, d = _const((3, c, 4), g, dtype), _const((3, c, 4), g, dtype)
    s = _const((1, c, 1), g, dtype, lo=0.5)
    if signs:
        s = s * (torch.randint(0, 2, s.shape, generator=g) * 2 - 1).to(dtype)
    t = _const((1, c, 1), g, dtype)
    k = T.residual_skip_scale(s)
    assert_close((s.double() * (k * p.double() + d.double()) + t.double()).to(dtype), p + s * d + t)
    with pytest.raises(NotExactError, match="exactly 0"):
        T.residual_skip_scale(torch.cat([s.reshape(-1), torch.zeros(1, dtype=dtype)]))


@given(c=st.integers(1, 8), slope=st.sampled_from([0.0, 0.01, 0.2]), seed=st.integers(0, 2**16), dtype=DTYPES)
def test_positive_part_crosses_relu(c, slope, seed, dtype):
    """``s · act(y) = σ · act(p · y)`` for (leaky) ReLU, with scales of any sign and exact zeros."""
    g = _gen(seed)
    s = _const((c,), g, dtype) * 2
    s[0] = 0.0
    y = _const((5, c), g, dtype)
    p, sign = T.positive_part(s)
    assert bool((p > 0).all()) and set(sign.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert_close((p * sign).to(dtype), s)
    act = (lambda v: F.leaky_relu(v, slope))
    assert_close((sign * act(p * y.double())).to(dtype), s * act(y))
