"""The cell step from a zero state (``ops.lstm_cell_zero_state``: ``A`` holds gate rows i, o, g only)
on every backend this machine runs, against the spec: ``reference.lstm_cell_ref`` on a 4-gate ``A``
with any forget row and ``c = 0``."""
import pytest
import torch

from salstm_kernels import ops, reference
from salstm_kernels.backends import available_backends
from salstm_kernels.testing import assert_close, nan_allocations

BACKENDS = available_backends("cpu")
# triton: float32 and float16 storage (the interpreter's float16 works; bfloat16 is for the GPU check);
# the others compute float64 natively too
BACKEND_DTYPES = [(b, d) for b in BACKENDS
                  for d in ((torch.float32, torch.float16) if b == "triton" else (torch.float32, torch.float64))]
IOG = lambda C: [*range(C), *range(2 * C, 4 * C)]  # noqa: E731  (rows i, o, g of a 4-gate tensor)


def _case(B, C, H, W, dtype, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa: E731
    A = rand(B, 3 * C, H, W, scale=2.0).contiguous(memory_format=fmt).requires_grad_()
    Af = rand(B, C, H, W, scale=2.0)  # any forget row: it multiplies c = 0
    bias = rand(3 * C).requires_grad_()
    bias_f = rand(C)
    return A, Af, bias, bias_f, g


def _spec(A, Af, bias, bias_f):
    """The 4-gate reference on ``[Ai, Af, Ao, Ag] + [bi, bf, bo, bg]`` with ``c = 0``."""
    C = Af.shape[1]
    A4 = torch.cat([A[:, :C], Af, A[:, C:]], dim=1)
    b4 = None if bias is None else torch.cat([bias[:C], bias_f, bias[C:]])
    if b4 is not None:
        A4 = A4 + b4.view(1, -1, 1, 1)
    return reference.lstm_cell_ref(A4, torch.zeros_like(Af))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("shape", [(2, 24, 5, 7), (1, 3, 37, 31)])  # C not a power of two; N over a block
def test_zero_state_cell_matches_the_4_gate_spec(backend, dtype, fmt, with_bias, shape):
    A, Af, bias, bias_f, _ = _case(*shape, dtype, fmt, seed=sum(shape))
    bias = bias if with_bias else None
    with nan_allocations():  # unwritten output elements show as NaN
        h, c = ops.lstm_cell_zero_state(A, backend, bias)
    assert h.is_contiguous(memory_format=fmt) and c.is_contiguous(memory_format=fmt)
    # the spec in float64 (float16's tolerance covers its rounding of the inputs, not the math)
    A64, b64 = A.detach().double().requires_grad_(), None if bias is None else bias.detach().double().requires_grad_()
    h_ref, c_ref = _spec(A64, Af.double(), b64, bias_f.double())
    assert_close(h, h_ref, dtype, name="h'")
    assert_close(c, c_ref, dtype, name="c'")
    inputs, inputs64 = [A] + ([bias] if with_bias else []), [A64] + ([b64] if with_bias else [])
    names = ["dA", "dbias"]
    for gh_given, gc_given in ((True, True), (True, False), (False, True)):  # a missing one arrives as None
        gh, gc = torch.randn_like(h_ref), torch.randn_like(c_ref)
        outs = [t for t, used in ((h, gh_given), (c, gc_given)) if used]
        outs_ref = [t for t, used in ((h_ref, gh_given), (c_ref, gc_given)) if used]
        gys = [t for t, used in ((gh, gh_given), (gc, gc_given)) if used]
        with nan_allocations():
            got = torch.autograd.grad(outs, inputs, [g.to(dtype) for g in gys], retain_graph=True)
        want = torch.autograd.grad(outs_ref, inputs64, gys, retain_graph=True)
        for name, x, r in zip(names, got, want):
            assert_close(x, r, dtype, backward=True, name=f"{name} (dh {gh_given}, dc' {gc_given})")
        assert got[0].is_contiguous(memory_format=fmt)


def test_the_spec_gives_the_forget_row_no_gradient_from_a_zero_state():
    """Why the zero-state step may drop the forget gate: with ``c = 0`` its rows' gradient (and so
    the conv's forget weights' and bias's, from this step) is exactly zero."""
    A, Af, bias, bias_f, _ = _case(2, 8, 5, 6, torch.float64, torch.contiguous_format, seed=1)
    Af.requires_grad_()
    bias_f.requires_grad_()
    h, c = _spec(A, Af, bias, bias_f)
    gAf, gbf = torch.autograd.grad([h, c], [Af, bias_f], [torch.randn_like(h), torch.randn_like(c)])
    assert torch.count_nonzero(gAf) == 0 and torch.count_nonzero(gbf) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_zero_state_ops(backend):
    A, _, bias, _, g = _case(2, 8, 3, 5, torch.float32, torch.contiguous_format, seed=2)
    opcheck = torch.library.opcheck
    for b in (None, bias):
        opcheck(torch.ops.salstm_kernels.lstm_cell_zero_state.default, (A, backend, b))
        d = torch.randn(2, 8, 3, 5, generator=g)
        bd = None if b is None else b.detach()
        for dh, dcn in ((d, d), (d, None), (None, d)):
            opcheck(torch.ops.salstm_kernels.lstm_cell_zero_state_backward.default, (A.detach(), dh, dcn, backend, bd))


@pytest.mark.parametrize("A,bias,exc,match", [
    (torch.zeros(2, 8, 3, 3), None, ValueError, r"A must be \(B, 3C, H, W\) \(gate rows i, o, g\): its 8 channels "
                                                r"are not a positive multiple of 3 \(shape \(2, 8, 3, 3\)\)"),
    (torch.zeros(2, 9, 3), None, ValueError, r"A must be 4-D \(B, 3C, H, W\) \(gate rows i, o, g\), got 3-D shape "
                                             r"\(2, 9, 3\)"),
    (torch.zeros(0, 9, 3, 3), None, ValueError, "empty tensors are not supported"),
    (torch.zeros(2, 9, 3, 3, dtype=torch.int64), None, TypeError, "A must be floating"),
    (torch.zeros(2, 9, 3, 3), torch.zeros(12), ValueError, r"bias must have shape \(9,\), got \(12,\)"),
    (torch.zeros(2, 9, 3, 3), torch.zeros(9, dtype=torch.float64), TypeError, "bias has dtype torch.float64"),
])
def test_zero_state_op_rejects_bad_input_by_name(A, bias, exc, match):
    with pytest.raises(exc, match=f"lstm_cell_zero_state: {match}"):
        ops.lstm_cell_zero_state(A, "reference", bias)


def test_zero_state_check_rejects_a_non_tensor():
    """(The op's schema already refuses one; the check names it for direct callers.)"""
    from salstm_kernels.validation import check_lstm_cell_zero_state_args

    with pytest.raises(TypeError, match="lstm_cell_zero_state: A must be a torch.Tensor, got float"):
        check_lstm_cell_zero_state_args(1.0)
