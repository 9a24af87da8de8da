"""The fused-op plumbing (torch.library registration, fake kernels, autograd) with the pure-PyTorch
provider, and the split-conv recurrence against the reference math."""
import math

import pytest
import torch

import salstm_kernels as sk
from salstm_kernels import ops, recurrence, reference
from salstm_kernels.ops import reference_kernels as rk
from salstm_kernels.testing import assert_close, grads_of, random_projections

SHAPES = [(1, 8, 7, 9), (2, 24, 5, 3)]  # (B, C, H, W): N odd, C not a power of two


def _inputs(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(B, 4 * C, H, W, generator=g, dtype=torch.float64) * 2).to(dtype).requires_grad_()
    c = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return A, c, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_cell_provider_matches_autograd_of_reference(shape, dtype):
    A, c, g = _inputs(*shape, dtype)
    h, c1 = ops.lstm_cell(A, c, "reference")
    h_ref, c_ref = reference.lstm_cell_ref(A, c)
    assert_close(h, h_ref, dtype, name="h")
    assert_close(c1, c_ref, dtype, name="c'")
    gh, gc = torch.randn_like(h), torch.randn_like(c1)
    for name, a, b in zip(("dA", "dc"), grads_of([h, c1], [A, c], [gh, gc]), grads_of([h_ref, c_ref], [A, c], [gh, gc])):
        assert_close(a, b, dtype, backward=True, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("combination,gated", [("linear", False), ("nonlinear", False), ("linear", True), ("nonlinear", True), ("none", True)])
def test_attention_provider_matches_autograd_of_reference(shape, dtype, combination, gated):
    A, c, g = _inputs(*shape, dtype, seed=3)
    C = shape[1]
    proj = random_projections(C, dtype, generator=g) if gated else None
    args = proj if gated else (None,) * 6
    out, h, c1, P = ops.lstm_attention(A, c, *args, 0.2, combination, "reference")
    assert P.shape == (shape[0], C, C) and P.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P.sum(-1)))
    r = reference.lstm_attention_ref(A, c, 0.2, combination, proj)
    for name, a, b in zip(("out", "h", "c'"), (out, h, c1), r):
        assert_close(a, b, dtype, name=name)
    gys = [torch.randn_like(t) for t in r]
    inputs = [A, c, *(proj or ())]
    names = ["dA", "dc", "dwq", "dbq", "dwk", "dbk", "dwv", "dbv"]
    for name, a, b in zip(names, grads_of([out, h, c1], inputs, gys), grads_of(list(r), inputs, gys)):
        assert_close(a, b, dtype, backward=True, name=name)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_bias_is_added_for_providers_that_do_not_fold_it(backend):
    """Providers without ``FOLDS_BIAS`` get ``A + bias`` from the op layer: outputs and every
    gradient (the bias's included) match the spec on ``A + bias``."""
    if backend == "cpp":
        pytest.importorskip("salstm_kernels._C")
    A, c, g = _inputs(2, 8, 5, 3, torch.float32, seed=5)
    bias = torch.randn(32, generator=g).requires_grad_()
    proj = random_projections(8, generator=g)
    Ab = A + bias.view(1, -1, 1, 1)
    for outs, outs_ref in ((ops.lstm_cell(A, c, backend, bias), reference.lstm_cell_ref(Ab, c)),
                           (ops.lstm_attention(A, c, *proj, 0.3, "linear", backend, bias)[:3],
                            reference.lstm_attention_ref(Ab, c, 0.3, "linear", proj))):
        for x, r in zip(outs, outs_ref):
            assert_close(x, r, torch.float32)
        gys = [torch.randn_like(t) for t in outs]
        for name, x, r in zip(("dA", "dc", "dbias"), grads_of(list(outs), [A, c, bias], gys),
                              grads_of(list(outs_ref), [A, c, bias], gys)):
            assert_close(x, r, torch.float32, backward=True, name=name)


def test_frozen_bias_costs_no_sum_over_dA():
    """A bias that takes no gradient (a frozen conv): autograd asks the backward ops for no bias
    gradient, and they then return an empty one without summing ``dA``; float64 sums in float64."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class BackwardCalls(TorchDispatchMode):
        wanted = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "salstm_kernels" and func.name().endswith("_backward"):
                names = [a.name for a in func._schema.arguments]
                i = names.index("bias_grad_wanted")
                BackwardCalls.wanted.append(args[i] if i < len(args) else (kwargs or {}).get("bias_grad_wanted", True))
            return func(*args, **(kwargs or {}))

    A, c, g = _inputs(2, 8, 5, 3, torch.float32, seed=5)
    bias = torch.randn(32, generator=g)
    for frozen in (True, False):
        bias.requires_grad_(not frozen)
        BackwardCalls.wanted = []
        outs = [ops.lstm_cell(A, c, "reference", bias)[0],
                ops.lstm_attention(A, c, *(None,) * 6, 0.3, "linear", "reference", bias)[0]]
        with BackwardCalls():
            torch.autograd.grad(sum(o.sum() for o in outs), [A, c])
        assert BackwardCalls.wanted == [not frozen] * 2
    A64, c64, b64 = A.detach().double(), c.detach().double(), bias.detach().double()
    no_sum = ops.lstm_cell_backward(A64, c64, torch.ones_like(c64), None, "reference", b64, False)[2]
    assert no_sum.numel() == 0
    summed = ops.lstm_cell_backward(A64, c64, torch.ones_like(c64), None, "reference", b64)
    assert summed[2].dtype == torch.float64 and torch.equal(summed[2], summed[0].sum(dim=(0, 2, 3)))


@pytest.mark.parametrize("bad,match", [(torch.zeros(31), r"bias must have shape \(32,\)"),
                                       (torch.zeros(32, dtype=torch.float64), "bias has dtype")])
def test_bad_bias_is_rejected_with_its_name(bad, match):
    A, c, g = _inputs(1, 8, 3, 3, torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.lstm_cell(A, c, "reference", bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.lstm_attention(A, c, *(None,) * 6, 0.5, "linear", "reference", bad)


def test_partial_projections_rejected():
    A, c, g = _inputs(1, 8, 3, 3, torch.float32)
    wq, bq, *_ = random_projections(8)
    with pytest.raises(ValueError, match="missing"):
        ops.lstm_attention(A, c, wq, bq, None, None, None, None, 0.5, "linear", "reference")


def test_unknown_provider_is_an_error():
    A, c, g = _inputs(1, 8, 3, 3, torch.float32)
    with pytest.raises(ValueError, match="no fused kernels for backend 'nope'"):
        ops.lstm_cell(A, c, "nope")


def test_opcheck_all_ops_reference_provider():
    A, c, g = _inputs(2, 8, 3, 5, torch.float32)
    opcheck = torch.library.opcheck
    opcheck(torch.ops.salstm_kernels.lstm_cell.default, (A, c, "reference"))
    proj = random_projections(8, generator=g)
    for args in (proj, (None,) * 6):
        opcheck(torch.ops.salstm_kernels.lstm_attention.default, (A, c, *args, 0.3, "linear", "reference"))
    d = torch.randn(2, 8, 3, 5)
    opcheck(torch.ops.salstm_kernels.lstm_cell_backward.default, (A.detach(), c.detach(), d, d, "reference"))
    P = torch.softmax(torch.randn(2, 8, 8), -1)
    opcheck(
        torch.ops.salstm_kernels.lstm_attention_backward.default,
        (A.detach(), c.detach(), *[p.detach() for p in proj], P, d, d, d, 0.3, "linear", "reference"),
    )


@pytest.mark.parametrize("backend", sk.available_backends("cpu"))
def test_attention_scale_none_is_one_over_sqrt_of_the_pixel_count(backend):
    """``scale=None`` (what the modules pass for ``attention_size=None``, so a traced graph is not
    tied to one ``H*W``) is ``1/sqrt(H*W)`` of ``A``, forward and backward, bit for bit; the ops
    with it pass ``opcheck``."""
    A, c, g = _inputs(2, 8, 3, 5, torch.float32)
    proj = random_projections(8, generator=g)
    want = ops.lstm_attention(A, c, *proj, 1 / math.sqrt(15), "linear", backend)
    got = ops.lstm_attention(A, c, *proj, None, "linear", backend)
    gout = torch.randn_like(want[0])
    params = [A, c, *proj]
    for a, b in zip([*got, *grads_of([got[0]], params, [gout])], [*want, *grads_of([want[0]], params, [gout])]):
        assert torch.equal(a, b)
    d = torch.randn(2, 8, 3, 5)
    opcheck = torch.library.opcheck
    opcheck(torch.ops.salstm_kernels.lstm_attention.default, (A, c, *proj, None, "linear", "reference"))
    opcheck(torch.ops.salstm_kernels.lstm_attention_backward.default,
            (A.detach(), c.detach(), *[p.detach() for p in proj], want[3], d, d, d, None, "linear", "reference"))


def test_default_scale_keeps_traced_sizes_traced_and_numbers_exact():
    """A number gives ``1/math.sqrt`` (the spec); a 0-dim size tensor (``torch.jit.trace``) a float64
    0-dim tensor holding the same value, which scales a tensor exactly as the float does."""
    assert reference.default_scale(35) == 1 / math.sqrt(35)
    s = reference.default_scale(torch.tensor(35))
    assert isinstance(s, torch.Tensor) and s.dtype == torch.float64 and s.item() == 1 / math.sqrt(35)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        S = (torch.randn(3, 8, 8) * 30).to(dtype)
        assert torch.equal(S * s, S * (1 / math.sqrt(35))), dtype


@pytest.mark.parametrize("backend", sk.available_backends("cpu"))
def test_fixed_attention_size_reaches_the_fused_op(backend):
    """With ``attention_size`` set, the fused path passes its ``1/sqrt(attention_size)`` (``None``,
    the runtime ``1/sqrt(H*W)``, is for ``attention_size=None`` only); inputs large enough that the
    two scales give clearly different outputs."""
    torch.manual_seed(3)
    x = torch.randn(2, 2, 3, 5, 6) * 4
    fixed = sk.SALSTM2d(3, 4, 3, attention_size=7, backend=backend)
    assert fixed._op_scale(x) == 1 / math.sqrt(7)
    runtime = sk.SALSTM2d(3, 4, 3, backend=backend)
    runtime.load_state_dict(fixed.state_dict())
    assert runtime._op_scale(x) is None
    want = sk.SALSTM2d(3, 4, 3, attention_size=7, backend="reference")
    want.load_state_dict(fixed.state_dict())
    got, other = fixed(x), runtime(x)
    assert_close(got, want(x), torch.float32)
    assert (got - other).abs().max() > 1e-3  # the scales differ visibly here


def test_opcheck_attention_backward_with_transposed_weights():
    """The weight gradients are contiguous whatever the weights' strides, in the op and its fake
    kernel alike (the fake once followed a transposed weight's strides: inductor then asserted)."""
    A, c, g = _inputs(2, 8, 3, 5, torch.float32)
    proj = [p.detach() for p in random_projections(8, generator=g)]
    proj = [p.t() if p.dim() == 2 else p for p in proj]
    d = torch.randn(2, 8, 3, 5)
    P = torch.softmax(torch.randn(2, 8, 8), -1)
    args = (A.detach(), c.detach(), *proj, P, d, d, d, 0.3, "linear", "reference")
    torch.library.opcheck(torch.ops.salstm_kernels.lstm_attention_backward.default, args)
    grads = ops.lstm_attention_backward(*args)
    assert all(grads[i].is_contiguous() for i in range(2, 8))


@pytest.mark.parametrize("entry", ["op", "apply"])
def test_attention_weights_output_is_not_differentiable(entry):
    """``P`` is returned to be saved for backward; the backward has no term for a gradient on it, so
    a loss on ``P`` must raise, not get a silent zero."""
    A, c, g = _inputs(2, 8, 3, 5, torch.float32)
    fn = ops.lstm_attention if entry == "op" else ops.apply_lstm_attention
    out, h, c_new, P = fn(A, c, *random_projections(8, generator=g), 0.3, "linear", "reference")
    assert out.requires_grad and h.requires_grad and c_new.requires_grad and not P.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(P.sum(), A)


def _backward_op_calls(B, C, H, W):
    """``(name, call(**overrides))`` for each backward op with good arguments (overridable by name)."""
    A, c, g = _inputs(B, C, H, W, torch.float32)
    A, c = A.detach(), c.detach()
    d = torch.randn(B, C, H, W)
    proj = [p.detach() for p in random_projections(C, generator=g)]
    P = torch.softmax(torch.randn(B, C, C), -1)

    def cell(A=A, c=c, dh=d, dc_new=d):
        return ops.lstm_cell_backward(A, c, dh, dc_new, "reference")

    def zero_state(A=A[:, : 3 * C], dh=d, dc_new=d):
        return ops.lstm_cell_zero_state_backward(A, dh, dc_new, "reference")

    def attention(A=A, c=c, P=P, dout=d, dh=d, dc_new=d, h=None):
        return ops.lstm_attention_backward(A, c, *proj, P, dout, dh, dc_new, 0.3, "linear", "reference", h)

    return {"lstm_cell_backward": cell, "lstm_cell_zero_state_backward": zero_state,
            "lstm_attention_backward": attention}


@pytest.mark.parametrize("op,arg,bad,match", [
    ("lstm_cell_backward", "dh", torch.zeros(1, 8, 3, 5), r"lstm_cell_backward: dh must have shape \(2, 8, 3, 5\)"),
    ("lstm_cell_backward", "dc_new", torch.zeros(2, 8, 3, 5, dtype=torch.float64), "dc_new has dtype"),
    ("lstm_cell_zero_state_backward", "dh", torch.zeros(2, 8, 3, 4), r"dh must have shape \(2, 8, 3, 5\)"),
    ("lstm_attention_backward", "P", torch.zeros(1, 8, 8), r"P must have shape \(2, 8, 8\)"),
    ("lstm_attention_backward", "P", torch.zeros(2, 8, 8, dtype=torch.float16), "P must be the forward's softmax"),
    ("lstm_attention_backward", "dout", torch.zeros(2, 8, 5, 3), r"dout must have shape \(2, 8, 3, 5\)"),
    ("lstm_attention_backward", "dc_new", torch.zeros(2, 8, 3), r"dc_new must have shape"),
    ("lstm_attention_backward", "h", torch.zeros(2, 9, 3, 5), r"h must have shape"),
])
def test_backward_ops_reject_bad_arguments_by_name(op, arg, bad, match):
    """Called by hand, a backward op checks its arguments as the forward does (the Triton kernels
    would read a wrong-shaped gradient or ``P`` out of bounds); the good call runs."""
    call = _backward_op_calls(2, 8, 3, 5)[op]
    call()
    with pytest.raises((ValueError, TypeError), match=match):
        call(**{arg: bad})
    fake = torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    with fake, pytest.raises((ValueError, TypeError), match=match):
        call(**{arg: bad})  # the fake kernel checks too (compile sees the same error)


MODULES = [
    (sk.SALSTM2d, {"combination": "linear"}),
    (sk.SALSTM2d, {"combination": "nonlinear"}),
    (sk.LSTMSA2d, {"combination": "linear"}),
    (sk.LSTMSA2d, {"combination": "nonlinear"}),
    (sk.LSTMThenSA2d, {}),
    (sk.ConvLSTM2d, {}),
]


@pytest.fixture(params=["split", "cat"])
def conv_form(request, monkeypatch):
    """Both conv formulations at t > 0: input and recurrent convs apart, or one conv over cat(x, h)."""
    monkeypatch.setattr(recurrence, "CAT_CONV_DEVICES", {"cpu"} if request.param == "cat" else set())
    return request.param


@pytest.mark.parametrize("cls,kw", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("T,hidden,with_state", [(1, [6], False), (3, [5, 6], True), (2, [6], True)])
def test_fused_path_matches_reference_module(cls, kw, T, hidden, with_state, conv_form):
    """The split-conv recurrence + fused ops (pure-PyTorch provider) against the reference path."""
    torch.manual_seed(T)
    m = cls(4, hidden, 3, backend="reference", **kw)
    x = torch.randn(2, T, 4, 7, 9, requires_grad=True)
    state = None
    if with_state:
        state = [(torch.randn(2, C, 7, 9, requires_grad=True), torch.randn(2, C, 7, 9, requires_grad=True)) for C in hidden]
    out_r, st_r = m._forward_reference(x, state)
    out_f, st_f = m._forward_fused(x, state, "reference")
    outs_r = [out_r] + [t for s in st_r for t in s]
    outs_f = [out_f] + [t for s in st_f for t in s]
    for a, b in zip(outs_f, outs_r):
        assert_close(a, b, torch.float32)
    gys = [torch.randn_like(t) for t in outs_r]
    inputs = [x, *m.parameters()] + ([t for s in state for t in s] if state else [])
    names = ["x"] + [n for n, _ in m.named_parameters()] + ["h0/c0"] * (2 * len(hidden) if state else 0)
    for name, a, b in zip(names, grads_of(outs_f, inputs, gys), grads_of(outs_r, inputs, gys)):
        assert_close(a, b, torch.float32, backward=True, name=name)


@pytest.mark.parametrize("cls", [sk.ConvLSTM2d, sk.SALSTM2d])
def test_fused_convs_skip_the_zero_state_work(cls, conv_form):
    """Counted with torch.utils.flop_counter at T=2, Cin=C, in units of one C -> 4C conv: eager runs
    two (Cin+C) -> 4C convs (4 units).  The fused recurrence skips the recurrent conv at t=0 (the
    state is zero) and, where t=0 is not the attention step, the forget gate's rows there too
    (C -> 3C: 0.75), then 2 units at t=1: 2.75 / 4.  Forward and forward+backward alike (each conv's
    backward is a weight and an input gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    m = cls(8, 8, 5, backend="reference")
    x = torch.randn(1, 2, 8, 12, 12, requires_grad=True)

    def conv_flops(fn, backward):
        with FlopCounterMode(display=False) as fc:
            out = fn()[0]
            if backward:
                out.sum().backward()
        return sum(v for k, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(k))

    for backward in (False, True):
        eager = conv_flops(lambda: m._forward_reference(x, None), backward)
        fused = conv_flops(lambda: m._forward_fused(x, None, "reference"), backward)
        assert fused == pytest.approx(2.75 / 4 * eager)
    # with a given initial state nothing is skipped
    state = [(torch.randn(1, 8, 12, 12), torch.randn(1, 8, 12, 12))]
    eager = conv_flops(lambda: m._forward_reference(x, state), False)
    assert conv_flops(lambda: m._forward_fused(x, state, "reference"), False) == pytest.approx(eager)


@pytest.mark.parametrize("cls", [sk.ConvLSTM2d, sk.SALSTM2d])
def test_four_gate_first_step_still_matches(cls, monkeypatch):
    """``SKIP_FORGET_AT_ZERO_STATE = False`` (the A/B the GPU tuning runs): the 4-gate conv and cell
    at t=0 give the reference's outputs and gradients too, at 3 of eager's 4 conv units."""
    from torch.utils.flop_counter import FlopCounterMode

    def not_called(*args):
        raise AssertionError("the zero-state cell ran with SKIP_FORGET_AT_ZERO_STATE off")

    monkeypatch.setattr(recurrence, "SKIP_FORGET_AT_ZERO_STATE", False)
    monkeypatch.setattr(ops, "apply_lstm_cell_zero_state", not_called)
    torch.manual_seed(1)
    m = cls(5, 5, 3, backend="reference")
    x = torch.randn(2, 2, 5, 7, 9, requires_grad=True)

    def conv_flops(fn):
        with FlopCounterMode(display=False) as fc:
            out = fn()[0]
        return out, sum(v for k, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(k))

    out_f, fused = conv_flops(lambda: m._forward_fused(x, None, "reference"))
    out_r, eager = conv_flops(lambda: m._forward_reference(x, None))
    assert fused == pytest.approx(0.75 * eager)
    assert_close(out_f, out_r, torch.float32)
    gy = torch.randn_like(out_r)
    inputs = [x, *m.parameters()]
    for a, b in zip(grads_of([out_f], inputs, [gy]), grads_of([out_r], inputs, [gy])):
        assert_close(a, b, torch.float32, backward=True)


@pytest.mark.parametrize("cls", [sk.ConvLSTM2d, sk.SALSTM2d])
def test_broadcast_initial_state_gets_per_element_gradients(cls):
    """A given ``c0`` that is one value broadcast (all strides zero) and takes a gradient: its
    gradient is per element, as on the reference path (a scalar view of it would sum it away)."""
    torch.manual_seed(0)
    m = cls(4, 4, 3, backend="reference")
    x = torch.randn(2, 2, 4, 5, 6)
    h0 = torch.randn(2, 4, 5, 6)
    grads = []
    for run in (m._forward_fused, m._forward_reference):
        c0 = torch.full((), 0.3).expand(2, 4, 5, 6).requires_grad_()
        out = run(x, [(h0, c0)], *(("reference",) if run == m._forward_fused else ()))[0]
        out.square().sum().backward()
        grads.append(c0.grad)
    assert grads[1].unique().numel() > 1  # the reference's gradient does vary per element
    assert_close(grads[0], grads[1], torch.float32, backward=True, name="c0 grad")


@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_training_saves_no_zero_state_and_no_copy_of_x(cls, T, conv_form, layout, monkeypatch):
    """What a training step keeps alive for backward, counted by storage: per step ``A`` (4 state
    units; 3 at t=0 when it is not the attention step: no forget gate from the zero state), and for
    ``t > 0`` the previous ``c`` and the recurrent conv's input (``h``; the cat form:
    ``cat(x_t, h)``).  Not the zero initial ``c`` (an expanded scalar) and not a copy of the step's
    slice of ``x`` (the input conv saves the view; channels_last convs too: their weight is
    channels_last instead, and the conv converts ``x_t`` as it runs)."""
    monkeypatch.setattr(recurrence, "CHANNELS_LAST_CONVS", {("reference", "cpu")} if layout == "nhwc" else set())
    torch.manual_seed(0)
    B, C, H, W = 2, 8, 12, 11
    m = cls(C, C, 3, backend="reference")
    x = torch.randn(B, T, C, H, W, requires_grad=True)
    exclude = {t.untyped_storage().data_ptr() for t in [x, *m.parameters()]}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m._forward_fused(x, None, "reference")
    unit = B * C * H * W * 4
    per_later_step = 1 + (2 if conv_form == "cat" else 1)  # c, and the recurrent conv's input
    expected = 4 * T - (1 if T > 1 else 0) + per_later_step * (T - 1)
    # and weight copies the convs save (small at real sizes; at this one about a unit each): the
    # t=0 conv's rows i, o, g; channels_last, the input conv's weight in that layout (one per layer)
    weights = 3 * C * C * 3 * 3 if T > 1 else 0
    if layout == "nhwc" and (T == 1 or conv_form == "split"):
        weights += 4 * C * C * 3 * 3
    expected += weights * 4 / unit
    # the rest is small: P (B, C, C) and the expanded zero's one element
    assert sum(saved.values()) / unit == pytest.approx(expected, abs=0.3)


@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d, sk.LSTMThenSA2d])
def test_fused_attention_ops_count_the_eager_matmul_flops(cls):
    """The FLOP formulas registered for the custom ops (ops/flops.py): forward, the fused module's
    non-conv FLOPs equal the eager reference's matmul FLOPs; backward, the attention backward op
    counts 4 products (+6 with projections) of 2 B C^2 N each."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    B, C, H, W = 2, 8, 9, 11
    m = cls(8, C, 3, backend="reference")
    x = torch.randn(B, 2, 8, H, W, requires_grad=True)

    def counts(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}

    def non_conv(d):
        return sum(v for k, v in d.items() if "convolution" not in k)

    eager = counts(lambda: m._forward_reference(x, None))
    fused = counts(lambda: m._forward_fused(x, None, "reference"))
    assert fused.get("salstm_kernels.lstm_attention", 0) > 0
    assert non_conv(fused) == non_conv(eager)
    product = 2 * B * C * C * H * W
    gated = m._projection_tensors() is not None
    out = m._forward_fused(x, None, "reference")[0]
    back = counts(lambda: out.backward(torch.randn_like(out)))
    assert back["salstm_kernels.lstm_attention_backward"] == (10 if gated else 4) * product
