"""The C++ CPU provider (``backend="cpp"``, csrc/) against the reference provider and the reference
math: forward and every gradient, odd shapes, float32/float64, modules, determinism, opcheck, and
the package without the extension."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from salstm_kernels import cpp_extension

_ok, _reason = cpp_extension.status()
if not _ok:
    pytest.skip(f"C++ extension not available: {_reason}", allow_module_level=True)

import salstm_kernels as sk  # noqa: E402
from salstm_kernels import cpp_kernels as ck  # noqa: E402
from salstm_kernels import ops, recurrence, reference  # noqa: E402
from salstm_kernels.ops import reference_kernels as rk  # noqa: E402
from salstm_kernels.testing import assert_close, grads_of, nan_allocations, random_projections  # noqa: E402

# (B, C, H, W): odd N, C not a power of two, several pixel tiles (N > 256), a single pixel.
SHAPES = [(1, 8, 7, 9), (2, 24, 7, 9), (2, 8, 19, 17), (1, 24, 1, 1)]
DTYPES = [torch.float32, torch.float64]
VARIANTS = [("linear", False), ("nonlinear", False), ("linear", True), ("nonlinear", True), ("none", True)]
PROJ_NAMES = ["dwq", "dbq", "dwk", "dbk", "dwv", "dbv"]


def _inputs(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(B, 4 * C, H, W, generator=g, dtype=torch.float64) * 2).to(dtype)
    c = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return A, c, g


def _randn(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _proj(C, dtype, g):
    return tuple(p.detach() for p in random_projections(C, dtype, generator=g))


# ------------------------------------------------------------------------------------------------
# Provider level: cpp vs reference_kernels (same contract, same formulas)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cell_provider_matches_reference_kernels(shape, dtype):
    A, c, g = _inputs(*shape, dtype)
    dh, dcn = _randn(c.shape, dtype, g), _randn(c.shape, dtype, g)
    for name, a, b in zip(("h", "c'"), ck.cell_forward(A, c), rk.cell_forward(A, c)):
        assert a.dtype == dtype
        assert_close(a, b, dtype, name=name)
    for name, a, b in zip(("dA", "dc"), ck.cell_backward(A, c, dh, dcn), rk.cell_backward(A, c, dh, dcn)):
        assert_close(a, b, dtype, backward=True, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("combination,gated", VARIANTS)
def test_attention_provider_matches_reference_kernels(shape, dtype, combination, gated):
    A, c, g = _inputs(*shape, dtype, seed=1)
    proj = _proj(shape[1], dtype, g) if gated else None
    got = ck.attention_forward(A, c, proj, 0.3, combination)
    ref = rk.attention_forward(A, c, proj, 0.3, combination)
    assert got[3].dtype == ref[3].dtype
    for name, a, b in zip(("out", "h", "c'", "P"), got, ref):
        assert_close(a, b, dtype, name=name)
    dout, dh, dcn = (_randn(c.shape, dtype, g) for _ in range(3))
    dA, dc, dproj = ck.attention_backward(A, c, proj, ref[3], dout, dh, dcn, 0.3, combination)
    rA, rc, rproj = rk.attention_backward(A, c, proj, ref[3], dout, dh, dcn, 0.3, combination)
    assert_close(dA, rA, dtype, backward=True, name="dA")
    assert_close(dc, rc, dtype, backward=True, name="dc")
    if gated:
        for name, a, b in zip(PROJ_NAMES, dproj, rproj):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close(a, b, dtype, backward=True, name=name)
    else:
        assert dproj is None


def test_provider_accepts_non_contiguous_inputs():
    dtype = torch.float64
    A, c, g = _inputs(2, 8, 9, 7, dtype, seed=2)
    # transposed spatial dims: same values, non-contiguous storage
    At, ct = A.transpose(2, 3).contiguous().transpose(2, 3), c.transpose(2, 3).contiguous().transpose(2, 3)
    assert not At.is_contiguous() and not ct.is_contiguous()
    proj = _proj(8, dtype, g)
    wq_t = proj[0].t().contiguous().t()  # non-contiguous weight
    proj_nc = (wq_t,) + proj[1:]
    for a, b in zip(ck.cell_forward(At, ct), rk.cell_forward(A, c)):
        assert_close(a, b, dtype)
    got = ck.attention_forward(At, ct, proj_nc, 0.5, "linear")
    ref = rk.attention_forward(A, c, proj, 0.5, "linear")
    for a, b in zip(got, ref):
        assert_close(a, b, dtype)
    dout = _randn(c.shape, dtype, g).transpose(2, 3).contiguous().transpose(2, 3)
    dh, dcn = _randn(c.shape, dtype, g)[:, :, :, :], _randn((2, 8, 7, 9), dtype, g).transpose(2, 3)
    b1 = ck.attention_backward(At, ct, proj_nc, ref[3].transpose(1, 2).contiguous().transpose(1, 2), dout, dh, dcn, 0.5, "linear")
    b2 = rk.attention_backward(A, c, proj, ref[3], dout.contiguous(), dh, dcn.contiguous(), 0.5, "linear")
    for a, b in zip(b1[:2] + b1[2], b2[:2] + b2[2]):
        assert_close(a, b, dtype, backward=True)


def _is_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 7, 9), (3, 24, 19, 17), (2, 8, 1, 9), (2, 8, 9, 1)])
def test_channels_last_A_runs_channels_last(shape, dtype):
    """``A`` channels_last per image (a step's slice of a time-major channels_last conv output: any
    batch stride) is read in place and sets the working layout: every (B, C, H, W) output and
    ``dA`` come back channels_last (the layout the fake kernels promise), NCHW ``c`` / gradients
    are converted.  The cell ops are pointwise, so bitwise equal to the NCHW path; the attention
    ops sum in another BLAS orientation, so they match it (and the reference provider) to
    tolerance."""
    B, C, H, W = shape
    A, c, g = _inputs(B, C, H, W, dtype, seed=3)
    A_steps = torch.cat([A, A.flip(0)]).contiguous(memory_format=torch.channels_last).split(B)
    # a step's slice of a batch-major (B, 2, ...) channels_last output: batch stride 2 * 4C * N
    big = torch.stack([A.flip(0), A], 1).reshape(2 * B, 4 * C, H, W).contiguous(memory_format=torch.channels_last)
    strided = big.view(B, 2, 4 * C, H, W)[:, 1]
    assert strided.stride(0) == 2 * 4 * C * H * W
    for a_cl in (A_steps[0], strided):
        assert torch.equal(a_cl, A) and not a_cl.is_contiguous()
        dh, dcn, dout = (_randn(c.shape, dtype, g) for _ in range(3))
        for cc in (c, c.contiguous(memory_format=torch.channels_last)):
            for x, y in zip(ck.cell_forward(a_cl, cc), ck.cell_forward(A, c)):
                assert torch.equal(x, y) and _is_cl(x)
            dA_cl, dc_cl = ck.cell_backward(a_cl, cc, dh, dcn)
            dA, dc = ck.cell_backward(A, c, dh, dcn)
            assert torch.equal(dA_cl, dA) and torch.equal(dc_cl, dc) and _is_cl(dc_cl)
            assert dA_cl.stride() == torch.empty_like(a_cl).stride()
        for proj in (None, _proj(C, dtype, g)):
            for comb in ("linear", "nonlinear") + (("none",) if proj else ()):
                f_cl, f = ck.attention_forward(a_cl, c, proj, 0.3, comb), ck.attention_forward(A, c, proj, 0.3, comb)
                ref = rk.attention_forward(A, c, proj, 0.3, comb)
                for x, y, z in zip(f_cl, f, ref):
                    assert_close(x, y, dtype)
                    assert_close(x, z, dtype)
                assert all(_is_cl(x) for x in f_cl[:3])
                b_cl = ck.attention_backward(a_cl, c, proj, f[3], dout, dh, dcn, 0.3, comb)
                b = ck.attention_backward(A, c, proj, f[3], dout, dh, dcn, 0.3, comb)
                rb = rk.attention_backward(A, c, proj, f[3], dout, dh, dcn, 0.3, comb)
                assert b_cl[0].stride() == torch.empty_like(a_cl).stride() and _is_cl(b_cl[1])
                for x, y, z in zip(b_cl[:2] + (b_cl[2] or ()), b[:2] + (b[2] or ()), rb[:2] + (rb[2] or ())):
                    assert_close(x, y, dtype, backward=True)
                    assert_close(x, z, dtype, backward=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_backward_with_forward_h_is_bitwise_the_same(dtype, channels_last):
    """Given the forward's ``h'`` the backward skips recomputing it for ``V``: the same values,
    so the same bits (for bfloat16 the rounded ``h'`` is ignored and recomputed in float32)."""
    A, c, g = _inputs(2, 24, 19, 17, dtype, seed=11)
    if channels_last:
        A, c = A.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last)
    dout, dh, dcn = (_randn(c.shape, dtype, g) for _ in range(3))
    for proj in (None, _proj(24, dtype, g)):
        for comb in ("linear", "nonlinear") + (("none",) if proj else ()):
            out, h, cn, P = ck.attention_forward(A, c, proj, 0.3, comb)
            with_h = ck.attention_backward(A, c, proj, P, dout, dh, dcn, 0.3, comb, h=h)
            without = ck.attention_backward(A, c, proj, P, dout, dh, dcn, 0.3, comb)
            for x, y in zip(with_h[:2] + (with_h[2] or ()), without[:2] + (without[2] or ())):
                assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match=r"h must be \(B, C, H, W\)"):
        ck.attention_backward(A, c, None, P, dout, dh, dcn, 0.3, "linear", h=h[:, :3])


@pytest.mark.parametrize("channels_last", [False, True])
def test_absent_state_grads_read_as_zero(channels_last):
    """``dh`` / ``dc_new`` = None (no gradient on that output) give bitwise the results of zeros,
    through the provider and through the custom ops (whose other providers get zeros)."""
    A, c, g = _inputs(2, 24, 19, 17, torch.float32, seed=12)
    if channels_last:
        A, c = A.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last)
    dout, dh, dcn = (_randn(c.shape, torch.float32, g) for _ in range(3))
    z = torch.zeros_like(c)
    for a, b in ((None, dcn), (dh, None), (None, None)):
        za, zb = (z if a is None else a), (z if b is None else b)
        for x, y in zip(ck.cell_backward(A, c, a, b), ck.cell_backward(A, c, za, zb)):
            assert torch.equal(x, y)
        for proj in (None, _proj(24, torch.float32, g)):
            P = ck.attention_forward(A, c, proj, 0.3, "linear")[3]
            got = ck.attention_backward(A, c, proj, P, dout, a, b, 0.3, "linear")
            exp = ck.attention_backward(A, c, proj, P, dout, za, zb, 0.3, "linear")
            for x, y in zip(got[:2] + (got[2] or ()), exp[:2] + (exp[2] or ())):
                assert torch.equal(x, y)
        for backend in ("cpp", "reference"):
            got = ops.lstm_cell_backward(A, c, a, b, backend)
            for x, y in zip(got, rk.cell_backward(A, c, za, zb)):
                assert_close(x, y, torch.float32, backward=True)
    with pytest.raises(RuntimeError, match=r"dh must be \(B, C, H, W\)"):
        ck.cell_backward(A, c, dh[:, :3], None)


@pytest.mark.parametrize("gated", [False, True])
def test_empty_images_match_the_reference(gated):
    """H or W = 0: no pixel tiles; the scores are zero, so P is uniform as in the reference, and
    nothing is read from scratch left by an earlier call (run one first to leave some)."""
    A, c, g = _inputs(2, 16, 5, 7, torch.float32, seed=13)
    proj = _proj(16, torch.float32, g) if gated else None
    ck.attention_forward(A, c, proj, 0.3, "linear")
    for shape in ((2, 16, 0, 5), (2, 16, 5, 0)):
        A0, c0, _ = _inputs(*shape, torch.float32)
        got, exp = ck.attention_forward(A0, c0, proj, 0.3, "linear"), rk.attention_forward(A0, c0, proj, 0.3, "linear")
        for x, y in zip(got, exp):
            assert x.shape == y.shape
            assert_close(x, y, torch.float32)
        d = torch.zeros_like(c0)
        gb = ck.attention_backward(A0, c0, proj, got[3], d, d, d, 0.3, "linear")
        rb = rk.attention_backward(A0, c0, proj, exp[3], d, d, d, 0.3, "linear")
        for x, y in zip(gb[:2] + (gb[2] or ()), rb[:2] + (rb[2] or ())):
            assert x.shape == y.shape
            assert_close(x, y, torch.float32, backward=True)


def test_nchw_A_with_channels_last_state_runs_nchw():
    """The layout follows ``A``: with NCHW ``A`` a channels_last ``c`` is converted and the outputs
    are contiguous NCHW."""
    A, c, g = _inputs(2, 8, 7, 9, torch.float32, seed=5)
    c_cl = c.contiguous(memory_format=torch.channels_last)
    for x, y in zip(ck.cell_forward(A, c_cl), ck.cell_forward(A, c)):
        assert torch.equal(x, y) and x.is_contiguous()
    for x, y in zip(ck.attention_forward(A, c_cl, None, 0.3, "linear"), ck.attention_forward(A, c, None, 0.3, "linear")):
        assert torch.equal(x, y) and x.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_float32(dtype):
    A, c, g = _inputs(2, 8, 7, 9, dtype, seed=4)
    proj = _proj(8, dtype, g)
    out, h, c1, P = ck.attention_forward(A, c, proj, 0.3, "linear")
    assert out.dtype == h.dtype == c1.dtype == dtype and P.dtype == torch.float32
    ref = rk.attention_forward(A, c, proj, 0.3, "linear")
    for a, b in zip((out, h, c1, P), ref):
        assert_close(a, b, dtype)
    dout, dh, dcn = (_randn(c.shape, dtype, g) for _ in range(3))
    got = ck.attention_backward(A, c, proj, P, dout, dh, dcn, 0.3, "linear")
    exp = rk.attention_backward(A, c, proj, P, dout, dh, dcn, 0.3, "linear")
    for a, b in zip(got[:2] + got[2], exp[:2] + exp[2]):
        assert a.dtype == b.dtype
        assert_close(a, b, dtype, backward=True)


# ------------------------------------------------------------------------------------------------
# Zero-state cell (h = c = 0, the first step): A (B, 3C, H, W) has the gate rows i, o, g only
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def nan_alloc():
    """Output elements a kernel never wrote show up as NaN: Python-side ``torch.empty`` through
    ``nan_allocations``, the extension's ``at::empty`` through PyTorch's deterministic fill of
    uninitialized memory (NaN for floating tensors)."""
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with nan_allocations():
            yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _zero_state_inputs(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 3 * C, H, W, generator=g, dtype=torch.float64) * 2).to(dtype), g


def _zero_state_ref(A, dh, dcn):
    """The zero-state cell and its dA (rows i, o, g) in float64; None gradients are zero."""
    ai, ao, ag = A.double().chunk(3, 1)
    i, o, g = torch.sigmoid(ai), torch.sigmoid(ao), torch.tanh(ag)
    cn = i * g
    tc = torch.tanh(cn)
    dh = torch.zeros_like(cn) if dh is None else dh.double()
    dcn = torch.zeros_like(cn) if dcn is None else dcn.double()
    dct = dcn + dh * o * (1 - tc * tc)
    return o * tc, cn, torch.cat([dct * g * i * (1 - i), dh * tc * o * (1 - o), dct * i * (1 - g * g)], 1)


def _zero_state_layouts(A):
    """``A`` as given to the ops: NCHW, channels_last, and channels_last step slices of bigger
    (T, B) / (B, T) conv outputs (the latter with batch stride T * 3C * N)."""
    B, C3, H, W = A.shape
    yield "nchw", A.contiguous()
    yield "channels_last", A.contiguous(memory_format=torch.channels_last)
    tm = torch.cat([A.flip(0), A, A.flip(0)]).contiguous(memory_format=torch.channels_last).view(3, B, C3, H, W)
    yield "time-major slice", tm[1]
    bm = torch.stack([A.flip(0), A, A.flip(0)], 1).flatten(0, 1).contiguous(memory_format=torch.channels_last)
    yield "batch-major slice", bm.view(B, 3, C3, H, W)[:, 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 24, 5, 7)])
def test_cell_zero_state_matches_formulas_and_the_4_gate_cell(shape, dtype, nan_alloc):
    """``cell_zero_state_forward`` / ``_backward`` against the float64 formulas and against
    ``cell_forward`` / ``cell_backward`` with ``c = 0`` and an arbitrary forget-gate row inserted
    (its dA row dropped), in every layout of ``A``, with ``dh`` / ``dc_new`` each None or given."""
    B, C, H, W = shape
    A, g = _zero_state_inputs(*shape, dtype, seed=21)
    ai, ao, ag = A.chunk(3, 1)
    A4 = torch.cat([ai, _randn(ai.shape, dtype, g) * 2, ao, ag], 1)
    c0 = torch.zeros(B, C, H, W, dtype=dtype)
    dh, dcn = _randn(c0.shape, dtype, g), _randn(c0.shape, dtype, g)
    h4, c4 = ck.cell_forward(A4, c0)
    for layout, a in _zero_state_layouts(A):
        assert torch.equal(a, A)
        nhwc = layout != "nchw"
        h, cn = ck.cell_zero_state_forward(a)
        h_ref, c_ref, _ = _zero_state_ref(A, None, None)
        for name, x, r, r4 in (("h", h, h_ref, h4), ("c'", cn, c_ref, c4)):
            assert x.dtype == dtype and x.shape == (B, C, H, W)
            assert (_is_cl(x) and not x.is_contiguous()) if nhwc else x.is_contiguous(), (layout, name, x.stride())
            assert_close(x, r, dtype, name=f"{name} ({layout})")
            assert_close(x, r4, dtype, name=f"{name} vs 4-gate ({layout})")
        for gh, gc in ((dh, dcn), (None, dcn), (dh, None), (None, None)):
            if nhwc and gh is not None:  # gradients in either layout are accepted
                gh = gh.contiguous(memory_format=torch.channels_last)
            out = ck.cell_zero_state_backward(a, gh, gc)
            assert isinstance(out, tuple) and len(out) == 1
            dA = out[0]
            assert dA.dtype == dtype and dA.shape == A.shape
            assert _is_cl(dA) if nhwc else dA.is_contiguous(), (layout, dA.stride())
            dA4 = ck.cell_backward(A4, c0, gh, gc)[0]
            which = f"({layout}, dh {'given' if gh is not None else 'None'}, dc_new {'given' if gc is not None else 'None'})"
            assert_close(dA, _zero_state_ref(A, gh, gc)[2], dtype, backward=True, name=f"dA {which}")
            assert_close(dA, torch.cat([dA4[:, :C], dA4[:, 2 * C:]], 1), dtype, backward=True,
                         name=f"dA vs 4-gate {which}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cell_zero_state_low_precision_computed_in_float32(dtype, channels_last, nan_alloc):
    A, g = _zero_state_inputs(2, 24, 5, 7, dtype, seed=22)
    if channels_last:
        A = A.contiguous(memory_format=torch.channels_last)
    dh, dcn = _randn((2, 24, 5, 7), dtype, g), _randn((2, 24, 5, 7), dtype, g)
    h_ref, c_ref, dA_ref = _zero_state_ref(A, dh, dcn)
    h, cn = ck.cell_zero_state_forward(A)
    (dA,) = ck.cell_zero_state_backward(A, dh, dcn)
    assert h.dtype == cn.dtype == dA.dtype == dtype
    assert_close(h, h_ref, dtype, name="h")
    assert_close(cn, c_ref, dtype, name="c'")
    assert_close(dA, dA_ref, dtype, backward=True, name="dA")


def test_cell_zero_state_empty_and_schema():
    """Empty batch / image give empty outputs; the outputs alias no input (opcheck's schema test)."""
    op = torch.ops.salstm_kernels_cpp
    for shape in ((0, 9, 5, 7), (2, 9, 0, 7), (2, 9, 5, 0)):
        A = torch.randn(shape)
        h, cn = op.cell_zero_state_forward(A)
        assert h.shape == cn.shape == (shape[0], 3, shape[2], shape[3])
        assert op.cell_zero_state_backward(A, None, torch.zeros_like(h)).shape == shape
    A, g = _zero_state_inputs(2, 3, 5, 7, torch.float32, seed=23)
    d = _randn((2, 3, 5, 7), torch.float32, g)
    for a in (A, A.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(op.cell_zero_state_forward.default, (a,), test_utils="test_schema")
        torch.library.opcheck(op.cell_zero_state_backward.default, (a, d, None), test_utils="test_schema")


def test_cell_zero_state_invalid_inputs_raise_clear_errors():
    op = torch.ops.salstm_kernels_cpp
    A, g = _zero_state_inputs(2, 3, 5, 7, torch.float32)
    d = _randn((2, 3, 5, 7), torch.float32, g)
    fwd, bwd = "salstm_kernels_cpp::cell_zero_state_forward", "salstm_kernels_cpp::cell_zero_state_backward"
    with pytest.raises(RuntimeError, match=fwd + r": A must be \(B, 3C, H, W\) with 3C a positive multiple of 3"):
        op.cell_zero_state_forward(A[:, :8])
    with pytest.raises(RuntimeError, match=bwd + r": A must be \(B, 3C, H, W\)"):
        op.cell_zero_state_backward(A[:, :0], None, None)
    with pytest.raises(RuntimeError, match=fwd + ": A must be 4-D"):
        op.cell_zero_state_forward(A[0])
    with pytest.raises(RuntimeError, match=bwd + ": A must be 4-D"):
        op.cell_zero_state_backward(A[None], d, d)
    with pytest.raises(RuntimeError, match=bwd + r": dh must be \(B, C, H, W\) = \(2, 3, 5, 7\)"):
        op.cell_zero_state_backward(A, d[:, :2], None)
    with pytest.raises(RuntimeError, match=bwd + r": dc_new must be \(B, C, H, W\) = \(2, 3, 5, 7\)"):
        op.cell_zero_state_backward(A, d, d[:1])
    with pytest.raises(RuntimeError, match=bwd + r": dc_new must be \(B, C, H, W\)"):
        op.cell_zero_state_backward(A, None, d[0])
    with pytest.raises(RuntimeError, match=fwd + ": A must be a floating-point tensor"):
        op.cell_zero_state_forward(A.long())
    with pytest.raises(RuntimeError, match=bwd + ": dh must be a floating-point tensor"):
        op.cell_zero_state_backward(A, d.long(), None)
    with pytest.raises(RuntimeError, match=r"A must be \(B, 4C, H, W\)"):  # the 4-gate op still wants 4C
        op.cell_forward(A[:, :6], d)


# ------------------------------------------------------------------------------------------------
# Op level (torch.library custom ops with backend="cpp") vs autograd of reference.py
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 7, 9), (2, 24, 17, 19)])
def test_cell_op_matches_autograd_of_reference(shape, dtype):
    A, c, g = _inputs(*shape, dtype, seed=5)
    A.requires_grad_(), c.requires_grad_()
    h, c1 = ops.lstm_cell(A, c, "cpp")
    h_ref, c_ref = reference.lstm_cell_ref(A, c)
    assert_close(h, h_ref, dtype, name="h")
    assert_close(c1, c_ref, dtype, name="c'")
    gys = [_randn(c.shape, dtype, g) for _ in range(2)]
    for name, a, b in zip(("dA", "dc"), grads_of([h, c1], [A, c], gys), grads_of([h_ref, c_ref], [A, c], gys)):
        assert_close(a, b, dtype, backward=True, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 7, 9), (2, 24, 17, 19)])
@pytest.mark.parametrize("combination,gated", VARIANTS)
def test_attention_op_matches_autograd_of_reference(shape, dtype, combination, gated):
    A, c, g = _inputs(*shape, dtype, seed=6)
    A.requires_grad_(), c.requires_grad_()
    proj = random_projections(shape[1], dtype, generator=g) if gated else None
    args = proj if gated else (None,) * 6
    out, h, c1, P = ops.lstm_attention(A, c, *args, 0.2, combination, "cpp")
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
    r = reference.lstm_attention_ref(A, c, 0.2, combination, proj)
    for name, a, b in zip(("out", "h", "c'"), (out, h, c1), r):
        assert_close(a, b, dtype, name=name)
    gys = [_randn(c.shape, dtype, g) for _ in range(3)]
    inputs = [A, c, *(proj or ())]
    names = ["dA", "dc", *PROJ_NAMES]
    for name, a, b in zip(names, grads_of([out, h, c1], inputs, gys), grads_of(list(r), inputs, gys)):
        assert_close(a, b, dtype, backward=True, name=name)


def test_attention_op_gradients_only_on_out():
    """Upstream gradient only on ``out`` (``dh``, ``dc'`` arrive as None and become zeros)."""
    A, c, g = _inputs(2, 8, 7, 9, torch.float64, seed=7)
    A.requires_grad_(), c.requires_grad_()
    out, *_ = ops.lstm_attention(A, c, *(None,) * 6, 0.2, "linear", "cpp")
    r = reference.lstm_attention_ref(A, c, 0.2, "linear")[0]
    gy = [_randn(c.shape, torch.float64, g)]
    for a, b in zip(grads_of([out], [A, c], gy), grads_of([r], [A, c], gy)):
        assert_close(a, b, torch.float64, backward=True)


# ------------------------------------------------------------------------------------------------
# Modules: backend="cpp" vs backend="reference"
# ------------------------------------------------------------------------------------------------
def _module_pair(cls, kwargs, dtype):
    torch.manual_seed(0)
    ref = cls(backend="reference", **kwargs).to(dtype)
    cpp = cls(backend="cpp", **kwargs).to(dtype)
    cpp.load_state_dict(ref.state_dict())
    return ref, cpp


MODULES = [
    (sk.SALSTM2d, {}),
    (sk.SALSTM2d, {"combination": "nonlinear"}),
    (sk.LSTMSA2d, {}),
    (sk.LSTMSA2d, {"combination": "nonlinear"}),
    (sk.LSTMThenSA2d, {}),
    (sk.ConvLSTM2d, {}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,hidden,with_state", [(1, [8], False), (3, [6, 8], True), (3, [8, 8], False)])
@pytest.mark.parametrize("cls,extra", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_cpp_matches_reference(cls, extra, T, hidden, with_state, dtype):
    _check_module_cpp(cls, extra, T, hidden, with_state, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,extra", MODULES[:3], ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_cpp_cat_conv_matches_reference(cls, extra, dtype, monkeypatch):
    """The one-conv-over-cat(x, h) formulation at t > 0, on the cpp path's channels_last convs."""
    monkeypatch.setattr(recurrence, "CAT_CONV_DEVICES", {"cpu"})
    _check_module_cpp(cls, extra, 3, [6, 8], True, dtype)
    _check_module_cpp(cls, extra, 2, [8], False, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,hidden,with_state", [(1, [8], False), (3, [6, 8], True), (2, [8], False)])
@pytest.mark.parametrize("cls,extra", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_cpp_small_images_match_reference(cls, extra, T, hidden, with_state, dtype, small_images):
    """Small images (``recurrence.CHANNELS_LAST_MIN_PIXELS``): the cpp path's convs and ops run NCHW."""
    out = _check_module_cpp(cls, extra, T, hidden, with_state, dtype)
    assert out.is_contiguous()  # the large-image form returns channels_last


def _check_module_cpp(cls, extra, T, hidden, with_state, dtype):
    B, Cin, H, W = 2, 5, 7, 9
    ref, cpp = _module_pair(cls, dict(in_channels=Cin, hidden_channels=hidden, kernel_size=3, **extra), dtype)
    g = torch.Generator().manual_seed(11)
    x = _randn((B, T, Cin, H, W), dtype, g).requires_grad_()
    state = [(_randn((B, C, H, W), dtype, g).requires_grad_(), _randn((B, C, H, W), dtype, g).requires_grad_()) for C in hidden] if with_state else None
    out_r, st_r = ref(x, state, return_state=True)
    out_c, st_c = cpp(x, state, return_state=True)
    assert_close(out_c, out_r, dtype, name="out")
    outs_r = [out_r] + [t for hc in st_r for t in hc]
    outs_c = [out_c] + [t for hc in st_c for t in hc]
    for i, (a, b) in enumerate(zip(outs_c[1:], outs_r[1:])):
        assert_close(a, b, dtype, name=f"state[{i}]")
    gys = [_randn(t.shape, dtype, g) for t in outs_r]
    leaves = [x, *(t for hc in (state or ()) for t in hc)]
    pr, pc = list(ref.parameters()), list(cpp.parameters())
    names = [n for n, _ in ref.named_parameters()]
    gr = grads_of(outs_r, leaves + pr, gys)
    gc = grads_of(outs_c, leaves + pc, gys)
    for name, a, b in zip(["dx"] + [f"dstate{i}" for i in range(len(leaves) - 1)] + names, gc, gr):
        assert_close(a, b, dtype, backward=True, name=name)
    return out_c


# ------------------------------------------------------------------------------------------------
# Determinism, opcheck, validation
# ------------------------------------------------------------------------------------------------
def _run_all(A, c, proj, dout, dh, dcn):
    f = ck.attention_forward(A, c, proj, 0.1, "linear")
    b = ck.attention_backward(A, c, proj, f[3], dout, dh, dcn, 0.1, "linear")
    cf = ck.cell_forward(A, c)
    cb = ck.cell_backward(A, c, dh, dcn)
    return list(f) + list(b[:2]) + list(b[2] or ()) + list(cf) + list(cb)


@pytest.mark.parametrize("B,channels_last", [(2, False), (3, False), (1, True), (2, True)])
@pytest.mark.parametrize("gated", [False, True])
def test_bitwise_identical_with_1_and_2_threads(gated, B, channels_last):
    """Also across the two schedules: B = 1 or 3 on two threads runs phase by phase over all
    tiles, one thread (and B = 2 on two) runs whole images per thread."""
    A, c, g = _inputs(B, 24, 37, 41, torch.float32, seed=8)  # 6 pixel tiles per image
    if channels_last:
        A, c = A.contiguous(memory_format=torch.channels_last), c.contiguous(memory_format=torch.channels_last)
    proj = _proj(24, torch.float32, g) if gated else None
    grads = [_randn(c.shape, torch.float32, g) for _ in range(3)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all(A, c, proj, *grads)
        torch.set_num_threads(2)
        two = _run_all(A, c, proj, *grads)
        again = _run_all(A, c, proj, *grads)
    finally:
        torch.set_num_threads(old)
    for a, b, r in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, r)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck_with_cpp_backend(gated, channels_last):
    """Also with channels_last ``A``: the fake kernels promise the real outputs' strides."""
    A, c, g = _inputs(2, 8, 5, 7, torch.float32, seed=9)
    if channels_last:
        A = A.contiguous(memory_format=torch.channels_last)
    A.requires_grad_(), c.requires_grad_()
    proj = random_projections(8, generator=g) if gated else (None,) * 6
    torch.library.opcheck(torch.ops.salstm_kernels.lstm_cell.default, (A, c, "cpp"))
    torch.library.opcheck(torch.ops.salstm_kernels.lstm_attention.default, (A, c, *proj, 0.3, "linear", "cpp"))
    d = [_randn(c.shape, torch.float32, g) for _ in range(3)]
    Ad, cd = A.detach(), c.detach()
    torch.library.opcheck(torch.ops.salstm_kernels.lstm_cell_backward.default, (Ad, cd, d[0], d[1], "cpp"))
    P = ops.lstm_attention(Ad, cd, *[p if p is None else p.detach() for p in proj], 0.3, "linear", "cpp")[3]
    pd = [p if p is None else p.detach() for p in proj]
    torch.library.opcheck(torch.ops.salstm_kernels.lstm_attention_backward.default,
                          (Ad, cd, *pd, P, *d, 0.3, "linear", "cpp"))


def test_invalid_inputs_raise_clear_errors():
    op = torch.ops.salstm_kernels_cpp
    A, c, g = _inputs(2, 8, 5, 7, torch.float32)
    with pytest.raises(RuntimeError, match=r"A must be \(B, 4C, H, W\)"):
        op.cell_forward(A[:, :30], c)
    with pytest.raises(RuntimeError, match=r"c must be \(B, C, H, W\) = \(2, 8, 5, 7\)"):
        op.cell_forward(A, c[:, :4])
    with pytest.raises(RuntimeError, match="A must be 4-D"):
        op.cell_forward(A[0], c)
    with pytest.raises(RuntimeError, match="dc_new must be"):
        op.cell_backward(A, c, c, c[:1])
    with pytest.raises(RuntimeError, match="floating-point"):
        op.cell_forward(A.long(), c)
    wq, bq, wk, bk, wv, bv = _proj(8, torch.float32, g)
    with pytest.raises(RuntimeError, match="all given or all None"):
        op.attention_forward(A, c, wq, bq, None, None, None, None, 0.1, "linear")
    with pytest.raises(RuntimeError, match=r"wk must be \(C, C\) = \(8, 8\)"):
        op.attention_forward(A, c, wq, bq, wk[:4], bk, wv, bv, 0.1, "linear")
    with pytest.raises(RuntimeError, match=r"bv must be \(C,\)"):
        op.attention_forward(A, c, wq, bq, wk, bk, wv, bv[:3], 0.1, "linear")
    with pytest.raises(RuntimeError, match="combination must be one of"):
        op.attention_forward(A, c, None, None, None, None, None, None, 0.1, "quadratic")
    with pytest.raises(RuntimeError, match="needs the learned projections"):
        op.attention_forward(A, c, None, None, None, None, None, None, 0.1, "none")
    P = torch.softmax(torch.randn(2, 8, 8), -1)
    with pytest.raises(RuntimeError, match=r"P must be \(B, C, C\)"):
        op.attention_backward(A, c, None, None, None, None, None, None, P[:, :4], c, c, c, 0.1, "linear")
    with pytest.raises(RuntimeError, match="dout must be"):
        op.attention_backward(A, c, None, None, None, None, None, None, P, c[:, :, :2], c, c, 0.1, "linear")


def test_auto_picks_cpp_for_cpu_tensors(monkeypatch):
    from salstm_kernels.backends import ENV_VAR, resolve_backend

    monkeypatch.delenv(ENV_VAR, raising=False)
    assert "cpp" in sk.available_backends("cpu")
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_package_works_without_the_extension():
    code = textwrap.dedent(
        """
        import warnings, torch
        import salstm_kernels as sk
        assert "cpp" not in sk.available_backends("cpu"), sk.available_backends("cpu")
        m = sk.SALSTM2d(3, 4, kernel_size=3)
        x = torch.randn(1, 2, 3, 5, 5)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m(x); m(x)
        msgs = [str(i.message) for i in w if "unavailable" in str(i.message)]
        assert msgs == [], msgs  # switched off on purpose: no fallback note (tests/test_backends.py has the other case)
        try:
            sk.SALSTM2d(3, 4, kernel_size=3, backend="cpp")(x)
        except sk.BackendUnavailableError as e:
            assert "SALSTM_KERNELS_NO_CPP" in str(e), e
        else:
            raise AssertionError("backend='cpp' did not raise")
        print("OK")
        """
    )
    env = dict(os.environ, SALSTM_KERNELS_NO_CPP="1")
    env.pop("SALSTM_KERNELS_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_portable_row_kernel_builds_match_reference(capability):
    """The row kernels are compiled per CPU capability; check the non-default builds too."""
    code = textwrap.dedent(
        """
        import torch
        from salstm_kernels import cpp_kernels as ck
        from salstm_kernels.ops import reference_kernels as rk
        from salstm_kernels.testing import assert_close, random_projections
        from salstm_kernels import cpp_extension
        assert cpp_extension.is_available()
        cap = torch.ops.salstm_kernels_cpp.cpu_capability()
        g = torch.Generator().manual_seed(0)
        for dt in (torch.float32, torch.float64):
            A = torch.randn(2, 32, 7, 9, generator=g, dtype=torch.float64).to(dt) * 2
            c = torch.randn(2, 8, 7, 9, generator=g, dtype=torch.float64).to(dt)
            d = [torch.randn(2, 8, 7, 9, generator=g, dtype=torch.float64).to(dt) for _ in range(3)]
            proj = tuple(p.detach() for p in random_projections(8, dt, generator=g))
            for comb in ("linear", "nonlinear"):
                f, r = ck.attention_forward(A, c, proj, 0.3, comb), rk.attention_forward(A, c, proj, 0.3, comb)
                for a, b in zip(f, r):
                    assert_close(a, b, dt)
                gb = ck.attention_backward(A, c, proj, r[3], *d, 0.3, comb)
                rb = rk.attention_backward(A, c, proj, r[3], *d, 0.3, comb)
                for a, b in zip(gb[:2] + gb[2], rb[:2] + rb[2]):
                    assert_close(a, b, dt, backward=True)
                A_cl = A.contiguous(memory_format=torch.channels_last)
                for a, b in zip(ck.attention_forward(A_cl, c, proj, 0.3, comb), r):
                    assert_close(a, b, dt)
                gb_cl = ck.attention_backward(A_cl, c, proj, r[3], *d, 0.3, comb)
                for a, b in zip(gb_cl[:2] + gb_cl[2], rb[:2] + rb[2]):
                    assert_close(a, b, dt, backward=True)
                for a, b in zip(ck.cell_forward(A_cl, c), ck.cell_forward(A, c)):
                    assert torch.equal(a, b)
                for a, b in zip(ck.cell_backward(A_cl, c, d[0], d[1]), ck.cell_backward(A, c, d[0], d[1])):
                    assert torch.equal(a, b)
            # zero state: A's rows i, o, g against the 4-gate cell with c = 0
            A3, z = torch.cat([A[:, :8], A[:, 16:]], 1), torch.zeros_like(c)
            for a3 in (A3, A3.contiguous(memory_format=torch.channels_last)):
                for a, b in zip(ck.cell_zero_state_forward(a3), ck.cell_forward(A, z)):
                    assert_close(a, b, dt)
                dA4 = ck.cell_backward(A, z, d[0], d[1])[0]
                assert_close(ck.cell_zero_state_backward(a3, d[0], d[1])[0], torch.cat([dA4[:, :8], dA4[:, 16:]], 1), dt,
                             backward=True)
        # extreme gate pre-activations (the exp's range, NaN kept) and the sigmoid's relative error
        v = torch.tensor([float("inf"), 3e38, 1e30, 1e10, 104.5, 88.7, 20.0, 11.0])
        v = torch.cat([v, -v, torch.tensor([0.0, float("nan")])])
        A, ones = v.repeat(4).reshape(1, 4, 1, v.numel()), torch.ones(1, 1, 1, v.numel())
        for a, b in zip(ck.cell_forward(A, ones), rk.cell_forward(A, ones)):
            assert torch.equal(a.isnan(), b.isnan())
            assert_close(torch.where(b.isnan(), 0, a), torch.where(b.isnan(), 0, b), torch.float32)
        x = torch.linspace(-30, 0, 301)
        A = torch.stack([x, torch.full_like(x, 50.0), torch.full_like(x, 50.0)]).reshape(1, 3, 1, -1)
        s = torch.sigmoid(x.double())  # = c' (g = tanh(50) = 1)
        rel = ((ck.cell_zero_state_forward(A)[1].flatten().double() - s).abs() / s).max().item()
        assert rel < 1e-6, f"sigmoid relative error {rel}"
        print("CAP", cap)
        """
    )
    env = dict(os.environ, SALSTM_KERNELS_CPU_CAPABILITY=capability)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    cap = r.stdout.split("CAP")[-1].strip()
    assert cap == "default" if capability == "default" else cap in ("avx2", "default"), cap


@pytest.mark.parametrize("T", [2, 3])
@pytest.mark.parametrize("cls", [sk.ConvLSTM2d, sk.SALSTM2d, sk.LSTMSA2d])
def test_no_grad_forward_batched_input_conv_matches(cls, T, monkeypatch):
    """Without an autograd graph the recurrence runs one time-batched input conv per layer over
    its 4-gate steps (with a graph, one per step); both match the reference, for stacked layers.
    At T = 2 from the zero state one 4-gate step is left: it is not "batched" through a copy
    (a torch.cat of one tensor)."""
    torch.manual_seed(0)
    m = cls(5, [6, 8], 3, backend="cpp")
    x = torch.randn(2, T, 5, 9, 11)
    ref = cls(5, [6, 8], 3, backend="reference")
    ref.load_state_dict(m.state_dict())
    cat = torch.cat
    singles = []

    def spy(tensors, *args, **kwargs):
        singles.append(len(tensors) == 1)
        return cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", spy)
    with torch.no_grad():
        got, states = m(x, return_state=True)
    monkeypatch.setattr(torch, "cat", cat)
    assert singles and not any(singles)  # (the zero-state step's weight rows are one cat of two)
    with torch.no_grad():
        want, want_states = ref(x, return_state=True)
    graph = m(x)
    assert_close(got, want, torch.float32, name="out")
    assert_close(graph.detach(), want, torch.float32, name="out (graph)")
    for (h, c), (hr, cr) in zip(states, want_states):
        assert_close(h, hr, torch.float32, name="h")
        assert_close(c, cr, torch.float32, name="c")


SHIPPED_CHANNELS_LAST_MIN_PIXELS = dict(recurrence.CHANNELS_LAST_MIN_PIXELS)  # before conftest patches it


def test_cpp_convs_run_nchw_at_small_images(monkeypatch):
    """The shipped size rule on the cpp path: channels_last convs (and so channels_last outputs)
    from ``pixels = B * H * W`` up in inference, and from ``per_channel * (Cin + C)`` up in
    training; NCHW below, each layer deciding for itself."""
    monkeypatch.setattr(recurrence, "CHANNELS_LAST_MIN_PIXELS", SHIPPED_CHANNELS_LAST_MIN_PIXELS)
    least, per_channel = SHIPPED_CHANNELS_LAST_MIN_PIXELS["cpu"]
    m = sk.SALSTM2d(3, [4, 64], 1, backend="cpp")

    def layouts(pixels, grad):  # B = 2: the rule counts B * H * W
        assert pixels % 2 == 0
        x = torch.randn(2, 2, 3, 1, pixels // 2, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out, states = m(x, return_state=True)
        return [h.is_contiguous() for h, _ in states] + [out.is_contiguous()]

    assert layouts(least - 2, False) == [True, True, True]
    assert layouts(least, False) == [False, False, False]
    # training: layer 0's convs have Cin + C = 7 input channels, layer 1's 68
    assert per_channel * 7 <= least < per_channel * 68
    assert layouts(least, True) == [False, True, True]
    assert layouts(per_channel * 68 - 2, True) == [False, True, True]
    assert layouts(per_channel * 68, True) == [False, False, False]
