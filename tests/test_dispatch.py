"""The ops' eager entries (``ops.apply_*``, :mod:`salstm_kernels.ops.dispatch`): the same numbers as
the registered custom ops, bit for bit, without going through them in eager mode; through them
under ``torch.compile``, dispatch modes (``FlopCounterMode``) and ``EAGER_FUNCTION = False``."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import salstm_kernels as sk
from salstm_kernels import ops
from salstm_kernels.backends import available_backends
from salstm_kernels.ops import dispatch
from salstm_kernels.testing import grads_of, random_projections

BACKENDS = available_backends("cpu")
OP_NAMES = ("lstm_cell", "lstm_cell_zero_state", "lstm_attention")


def _case(name, backend, bias, gated, combination, seed=0):
    """``(args, differentiable inputs)`` of op ``name``: B=2, C=12 (not a power of two), 5x7."""
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 2, 12, 5, 7
    rand = lambda *s: torch.randn(*s, generator=g).requires_grad_()  # noqa: E731
    rows = 3 * C if name == "lstm_cell_zero_state" else 4 * C
    A = rand(B, rows, H, W)
    b = rand(rows) if bias else None
    if name == "lstm_cell_zero_state":
        return (A, backend, b), [A] + ([b] if bias else [])
    c = rand(B, C, H, W)
    if name == "lstm_cell":
        return (A, c, backend, b), [A, c] + ([b] if bias else [])
    proj = random_projections(C, generator=g) if gated else (None,) * 6
    args = (A, c, *proj, 0.3, combination, backend, b)
    return args, [A, c] + (list(proj) if gated else []) + ([b] if bias else [])


def _run(fn, args, inputs, drop_last_state_grad, seed=1):
    """Outputs and every input gradient, under a random upstream gradient (none on the returned
    ``c'`` when ``drop_last_state_grad``: the ops then see a None gradient there)."""
    outs = fn(*args)
    outs = [o for o in outs if o.dim() == 4]  # not the attention's P
    if drop_last_state_grad:
        outs = outs[:-1]
    g = torch.Generator().manual_seed(seed)
    gys = [torch.randn(o.shape, generator=g) for o in outs]
    return [o.detach() for o in outs], grads_of(outs, inputs, gys)


CASES = [("lstm_cell", False, False, "linear"), ("lstm_cell", True, False, "linear"),
         ("lstm_cell_zero_state", True, False, "linear"),
         ("lstm_attention", False, False, "linear"), ("lstm_attention", True, False, "nonlinear"),
         ("lstm_attention", True, True, "linear"), ("lstm_attention", False, True, "none")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,bias,gated,combination", CASES, ids=str)
@pytest.mark.parametrize("drop", [False, True], ids=["all-grads", "no-dc"])
def test_apply_entry_is_the_custom_op_bit_for_bit(backend, name, bias, gated, combination, drop):
    args, inputs = _case(name, backend, bias, gated, combination)
    got = _run(getattr(ops, f"apply_{name}"), args, inputs, drop)
    want = _run(getattr(ops, name), args, inputs, drop)
    for kind, a_list, b_list in (("output", got[0], want[0]), ("grad", got[1], want[1])):
        assert len(a_list) == len(b_list)
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert torch.equal(a, b), f"{name} {backend}: {kind} {i} differs from the custom op's"


def _op_events(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("salstm_kernels::")}


def _module_step(m, x):
    def step():
        m(x).sum().backward()
    return step


@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d])
def test_modules_skip_the_custom_op_dispatch_in_eager_mode_unless_told(cls, monkeypatch):
    """The point of the entries: no ``salstm_kernels::`` op event in an eager training step; with
    ``EAGER_FUNCTION = False`` the forward and backward ops all show up, and the numbers agree."""
    torch.manual_seed(0)
    m = cls(4, [5, 6], 3, backend="reference")
    x = torch.randn(2, 3, 4, 6, 5)
    fused = lambda: m._forward_fused(x, None, "reference")[0]  # noqa: E731
    assert _op_events(lambda: fused().sum().backward()) == set()
    out_fast = fused()
    grads_fast = grads_of([out_fast], m.parameters(), [torch.ones_like(out_fast)])
    monkeypatch.setattr(dispatch, "EAGER_FUNCTION", False)
    seen = _op_events(lambda: fused().sum().backward())
    for op in ("lstm_cell", "lstm_cell_zero_state", "lstm_attention"):
        assert {f"salstm_kernels::{op}", f"salstm_kernels::{op}_backward"} <= seen, seen
    out_op = fused()
    assert torch.equal(out_fast, out_op)
    for a, b in zip(grads_fast, grads_of([out_op], m.parameters(), [torch.ones_like(out_op)])):
        assert torch.equal(a, b)


def test_dispatch_modes_see_the_custom_ops():
    """Under a TorchDispatchMode (here FlopCounterMode) the entries call the custom op, so its FLOP
    formula counts: the attention's FLOPs appear in a module forward."""
    m = sk.SALSTM2d(4, 4, 3, backend="reference")
    x = torch.randn(1, 2, 4, 6, 6)
    with FlopCounterMode(display=False) as fc:
        m._forward_fused(x, None, "reference")
    counted = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert any("lstm_attention" in k for k in counted), counted


def test_compile_records_the_custom_ops():
    """``torch.compile`` traces the entries as the registered ops (their fake kernels and autograd):
    the captured graph calls ``salstm_kernels.lstm_attention`` and ``lstm_cell_zero_state``."""
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = sk.SALSTM2d(3, 3, 3, backend="reference")
    x = torch.randn(1, 2, 3, 4, 5)
    compiled = torch.compile(lambda t: m._forward_fused(t, None, "reference")[0], fullgraph=True, backend=record)
    torch.testing.assert_close(compiled(x), m._forward_fused(x, None, "reference")[0], rtol=0, atol=0)
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"salstm_kernels.lstm_attention.default", "salstm_kernels.lstm_cell_zero_state.default"} <= targets, targets


def test_autocast_module_step_is_the_same_either_way(monkeypatch):
    """Under CPU autocast (bfloat16 convs, float32 state) both paths give identical outputs and
    parameter gradients."""
    torch.manual_seed(2)
    m = sk.LSTMSA2d(4, 6, 3, backend=BACKENDS[-1])
    x = torch.randn(2, 2, 4, 5, 7)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        return out.detach(), grads_of([out], m.parameters(), [torch.ones_like(out)])

    fast = step()
    monkeypatch.setattr(dispatch, "EAGER_FUNCTION", False)
    slow = step()
    assert fast[0].dtype == torch.bfloat16 and torch.equal(fast[0], slow[0])
    for a, b in zip(fast[1], slow[1]):
        assert torch.equal(a, b)


def test_entries_fill_defaults_take_keywords_and_reject_wrong_arguments():
    A = torch.randn(1, 8, 3, 3)
    c = torch.randn(1, 2, 3, 3)
    assert torch.equal(ops.apply_lstm_cell(A, c, "reference")[0], ops.lstm_cell(A, c, "reference")[0])
    with pytest.raises(TypeError, match="lstm_cell"):
        ops.apply_lstm_cell(A)
    with pytest.raises(TypeError, match="lstm_cell"):
        ops.apply_lstm_cell(A, c, "reference", None, None)
    with pytest.raises(TypeError, match="lstm_cell.*bogus"):
        ops.apply_lstm_cell(A, c, "reference", bogus=None)
    b = torch.randn(8)
    assert torch.equal(ops.apply_lstm_cell(A, c, backend="reference", bias=b)[1], ops.lstm_cell(A, c, "reference", b)[1])


def test_host_overhead_benchmark_runs():
    """``benchmarks/host_overhead.py`` (in the GPU session's check stage) prints a row per module and
    implementation, the entries and the custom-op dispatch of every fused backend it times."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_overhead.py"), "--min-run-time", "0.01"],
                         cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split()[:3] for line in res.stdout.splitlines() if line.startswith(("SALSTM2d", "LSTMSA2d"))]
    fused = [b for b in BACKENDS if b not in ("reference", "triton")]
    assert len(rows) == 2 * (1 + 2 * len(fused)), res.stdout
    assert "device cpu" in res.stdout and "command: python" in res.stdout


@pytest.mark.parametrize("entries", [True, False], ids=["entries", "custom-ops"])
def test_activation_checkpointing_and_inference_mode(entries, monkeypatch):
    """What training scripts wrap the modules in: ``torch.utils.checkpoint`` (non-reentrant; the
    forward runs again in backward) gives the plain step's gradients, and ``torch.inference_mode``
    the plain forward, through the entries and through the custom ops alike."""
    monkeypatch.setattr(dispatch, "EAGER_FUNCTION", entries)
    torch.manual_seed(3)
    m = sk.LSTMSA2d(3, [4, 5], 3, backend=BACKENDS[-1])
    x = torch.randn(2, 2, 3, 6, 5, requires_grad=True)
    params = [x, *m.parameters()]
    plain = m(x)
    gy = torch.randn_like(plain)
    want = grads_of([plain], params, [gy])
    ckpt = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=False)
    assert torch.equal(ckpt, plain)
    for a, b in zip(grads_of([ckpt], params, [gy]), want):
        assert torch.equal(a, b)
    with torch.inference_mode():
        assert torch.equal(m(x), plain.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entries", [True, False], ids=["entries", "custom-ops"])
@pytest.mark.parametrize("wrt", ["input", "weight"])
def test_double_backward_raises_on_the_fused_paths(backend, entries, wrt, monkeypatch):
    """A gradient penalty (``create_graph=True``, then a gradient of the gradient) cannot go through
    kernels autograd does not see: it raises a clear error on every fused path, through the entries
    as through the custom ops, instead of a silently wrong second derivative (before the entries
    recorded their backward, the input's second derivative came back None and a weight's partial).
    The reference backend differentiates twice."""
    monkeypatch.setattr(dispatch, "EAGER_FUNCTION", entries)
    torch.manual_seed(4)
    m = sk.SALSTM2d(3, 4, 3, backend="reference")
    x = torch.randn(1, 2, 3, 5, 4, requires_grad=True)
    target = x if wrt == "input" else m.cell0.conv.weight

    def penalty(out):
        g, = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        return g.pow(2).sum()

    gg, = torch.autograd.grad(penalty(m(x)), target)  # reference: supported
    assert torch.isfinite(gg).all() and gg.abs().sum() > 0
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(penalty(m._forward_fused(x, None, backend)[0]), target)


def test_jit_trace_records_the_custom_ops_and_saves():
    """``torch.jit.trace`` of a module records the registered ops (an autograd.Function would be a
    Python call the saved archive cannot hold); the saved and reloaded trace gives the same output."""
    import io
    import warnings

    torch.manual_seed(5)
    m = sk.SALSTM2d(3, 4, 3, backend=BACKENDS[-1]).eval()
    x = torch.randn(1, 2, 3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it freezes
        traced = torch.jit.trace(m, x, check_trace=False)
    assert "salstm_kernels::lstm_attention" in str(traced.inlined_graph)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    assert torch.equal(torch.jit.load(buf)(x), m(x))


def test_meta_tensors_and_vmap_go_through_the_custom_op():
    """Meta tensors get the fake kernel's shapes; ``torch.func.vmap`` runs the op and its vmap rule
    (the plain Function has none; ``tests/test_vmap.py``)."""
    A = torch.randn(2, 8, 3, 3)
    c = torch.randn(2, 2, 3, 3)
    h, c_new = ops.apply_lstm_cell(A.to("meta"), c.to("meta"), BACKENDS[-1])
    assert h.is_meta and h.shape == (2, 2, 3, 3) and c_new.shape == (2, 2, 3, 3)
    batched = torch.func.vmap(lambda a, s: ops.apply_lstm_cell(a, s, "reference")[0])(A[:, None], c[:, None])
    assert torch.equal(batched[:, 0], ops.lstm_cell(A, c, "reference")[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"] + ["fused:reference"])
@pytest.mark.parametrize("entries", [True, False], ids=["entries", "custom-ops"])
def test_forward_mode_ad_raises_on_the_fused_paths(backend, entries, monkeypatch):
    """``torch.func.jvp`` through a custom op without a forward-mode formula returned all-zero
    tangents, silently (the primal was right); eager ``forward_ad`` on the ops gave no tangent.
    Every fused path now raises a clear error, through the module or an op entry (``ops.apply_*``;
    the bare custom ops cannot see the transform); the reference backend computes the tangent
    (checked against a central difference)."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(dispatch, "EAGER_FUNCTION", entries)
    torch.manual_seed(6)
    m = sk.LSTMSA2d(3, [4], 3, backend="reference").double()
    x = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    t = torch.randn_like(x)
    _, tangent = torch.func.jvp(m, (x,), (t,))
    eps = 1e-6
    assert torch.allclose(tangent, (m(x + eps * t) - m(x - eps * t)) / (2 * eps), atol=1e-6)
    assert tangent.abs().max() > 1e-3
    if backend == "fused:reference":
        fused = lambda x: m._forward_fused(x, None, "reference")[0]  # noqa: E731
    else:
        m.backend = backend
        fused = m
    with pytest.raises(RuntimeError, match=r"salstm_kernels::lstm_\w+: forward-mode AD .* backend='reference'"):
        torch.func.jvp(fused, (x,), (t,))
    A, c = torch.randn(1, 8, 3, 3, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    op_backend = "reference" if backend == "fused:reference" else backend
    with pytest.raises(RuntimeError, match=r"salstm_kernels::lstm_cell: forward-mode AD"):
        torch.func.jvp(lambda a: ops.apply_lstm_cell(a, c, op_backend)[0], (A,), (torch.ones_like(A),))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=r"salstm_kernels::lstm_cell: forward-mode AD"):
        ops.apply_lstm_cell(fwAD.make_dual(A, torch.ones_like(A)), c, op_backend)
    # ... but only where a tangent reaches the op: a jvp the module does not depend on, and an open
    # dual level without dual inputs, run as before
    m.float()  # (float32: the Triton kernels take no float64)
    x32 = x.float()
    y = fused(x32)
    a = torch.ones(3)
    primal, tan = torch.func.jvp(lambda a: a * fused(x32).sum(), (a,), (2 * a,))
    assert torch.allclose(tan, 2 * y.sum().detach() * a)
    with fwAD.dual_level():
        m.zero_grad()
        fused(x32).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
    m.double()
    m.backend = "reference"
    assert torch.equal(torch.func.jvp(m, (x,), (t,))[1], tangent)  # nothing left switched on


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev"])
def test_functorch_reverse_mode_raises_a_clear_error(transform):
    """``torch.func.grad`` / ``vjp`` / ``jacrev`` through a fused module raised torch's internal
    "autograd.Function ... must override the setup_context staticmethod", naming neither the op nor
    what to do; now the op and the way out.  The reference backend differentiates."""
    torch.manual_seed(7)
    m = sk.SALSTM2d(3, 4, 3, backend="reference")
    x = torch.randn(1, 2, 3, 4, 4)
    run = {"grad": lambda f: torch.func.grad(lambda x: f(x).sum())(x),
           "vjp": lambda f: torch.func.vjp(f, x)[1](torch.ones(1, 4, 4, 4)),
           "jacrev": lambda f: torch.func.jacrev(lambda x: f(x).sum())(x)}[transform]
    run(m)
    head = torch.randn(4)

    def frozen_features(w):  # a transform around the module that does not differentiate it
        with torch.no_grad():
            f = m(x).mean((2, 3))[0]
        return (f * w).sum() ** 2

    want = torch.func.grad(frozen_features)(head)
    for backend in [b for b in BACKENDS if b != "reference"]:
        m.backend = backend
        with pytest.raises(RuntimeError, match=r"salstm_kernels::lstm_\w+: torch.func.grad / vjp / jacrev are not "
                                               r"supported by the fused backends; use torch.autograd.grad"):
            run(m)
        assert torch.allclose(torch.func.grad(frozen_features)(head), want, atol=1e-5)
        a = torch.ones(3)  # grad mode on, trainable parameters, but nothing of the module differentiated
        assert torch.allclose(torch.func.grad(lambda a: (a * m(x).detach().sum()).sum())(a),
                              m(x).detach().sum().expand(3), rtol=1e-5)
