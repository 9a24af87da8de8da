"""Robustness of the public boundary: validation, memory layouts, special values, autocast,
determinism and checkpoints -- on every backend available for CPU tensors plus the fused path with
the pure-PyTorch kernel provider, each against the reference backend.

A *path* is a backend name from ``available_backends("cpu")`` (run through the public ``forward``),
or ``"fused:reference"``: the fused recurrence + custom ops with the pure-PyTorch provider, run
through ``module._forward_fused``.  New backends join the parametrisation as they land.
"""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

import salstm_kernels as sk
from salstm_kernels import ops, reference
from salstm_kernels.testing import assert_close, grads_of, nan_like, random_projections
from salstm_kernels.validation import (
    check_input,
    check_lstm_attention_args,
    check_lstm_cell_args,
    check_state,
)

FUSED_REFERENCE = "fused:reference"
PATHS = sk.available_backends("cpu") + [FUSED_REFERENCE]
CLASSES = [sk.SALSTM2d, sk.LSTMSA2d, sk.LSTMThenSA2d, sk.ConvLSTM2d]
CIN, HIDDEN, K = 3, [4, 5], 3


def make(cls, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return cls(CIN, HIDDEN, K, **kw).to(dtype)


def run(m, x, path, state=None):
    """``(out, states)`` of module ``m`` on ``path``."""
    if path.startswith("fused:"):
        x5 = check_input(x, m.in_channels, "test")
        if state is not None:
            state = check_state(state, x5, m.hidden_list)
        return m._forward_fused(x5, state, path.split(":", 1)[1])
    m.backend = path
    try:
        return m(x, state=state, return_state=True)
    finally:
        m.backend = "auto"


def flat(out, states):
    return [out] + [t for pair in states for t in pair]


def forward_backward(m, x, path, state=None, seed=123):
    """Outputs, final states and gradients (params, x, state) for a fixed random upstream grad."""
    leaves = [p for p in m.parameters()]
    if x.requires_grad:
        leaves.append(x)
    if state is not None:
        leaves += [t for pair in state for t in pair if t.requires_grad]
    out, states = run(m, x, path, state)
    outs = flat(out, states)
    g = torch.Generator().manual_seed(seed)
    gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    grads = grads_of(outs, leaves, gouts)
    return [o.detach() for o in outs], grads


def _close(a, b, dtype, backward, name):
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != reference {b.dtype}"
    # NaN must sit exactly where the reference has it; testing.scaled_error cannot say so yet
    # (it compares NaN != NaN and reports inf), so the NaNs are checked here and then masked.
    nan = b.isnan()
    assert torch.equal(a.isnan(), nan), f"{name}: NaN at {int(a.isnan().sum())} places, reference {int(nan.sum())}"
    assert_close(torch.where(nan, 0, a), torch.where(nan, 0, b), dtype, backward=backward, name=name)


def check_against(got, ref, dtype, what):
    (o, g), (ro, rg) = got, ref
    assert len(o) == len(ro) and len(g) == len(rg)
    for i, (a, b) in enumerate(zip(o, ro)):
        _close(a, b, dtype, False, f"{what} output {i}")
    for i, (a, b) in enumerate(zip(g, rg)):
        _close(a, b, dtype, True, f"{what} grad {i}")


def test_paths_include_every_available_backend():
    assert set(sk.available_backends("cpu")) <= set(PATHS) and FUSED_REFERENCE in PATHS


# ============================================================================================
# 1. Validation at the public boundary
# ============================================================================================
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("k", [0, 2, 4, -1, 3.0, True])
def test_bad_kernel_size_rejected_at_construction(cls, k):
    with pytest.raises(ValueError, match=r"kernel_size must be a positive odd int.*got " + re.escape(repr(k))):
        cls(CIN, HIDDEN, k)


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 5, 6, 1, 1), (3,)])
@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_wrong_rank(shape, path):
    m = make(sk.SALSTM2d, backend=path)
    with pytest.raises(ValueError, match=rf"SALSTM2d: x must be \(B, T, 3, H, W\) or \(B, 3, H, W\), got {len(shape)}-D shape"):
        m(torch.randn(shape))


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_wrong_channel_count(path):
    m = make(sk.LSTMSA2d, backend=path)
    with pytest.raises(ValueError, match=r"LSTMSA2d: x has 4 channels, expected in_channels=3 \(x shape \(2, 2, 4, 5, 6\)\)"):
        m(torch.randn(2, 2, 4, 5, 6))
    with pytest.raises(ValueError, match=r"x has 4 channels, expected in_channels=3 \(x shape \(2, 4, 5, 6\)\)"):
        m(torch.randn(2, 4, 5, 6))  # 4-D: the message names the shape passed, not its 5-D view
    with pytest.raises(ValueError, match=r"x has an empty H x W = 0 x 6 \(shape \(2, 3, 0, 6\)\)"):
        m(torch.randn(2, 3, 0, 6))


def _conv_changes():
    """Changes to a layer's conv (layer 1: Cin = 4, C = 5) or a projection that no backend computes."""
    def conv(**kw):
        args = dict(in_channels=9, out_channels=20, kernel_size=3, padding=1) | kw
        return lambda m: setattr(m.cell1, "conv", nn.Conv2d(**args))

    def setattr_(path, attr, value):
        return lambda m: setattr(m.get_submodule(path), attr, value)

    def param(path, name, shape):
        return lambda m: setattr(m.get_submodule(path), name, nn.Parameter(torch.randn(shape)))

    return {
        "padding 0": (setattr_("cell1.conv", "padding", (0, 0)), r"cell1\.conv\.padding=\(0, 0\) .* 'same' padding \(1, 1\)"),
        "stride 2": (setattr_("cell1.conv", "stride", (2, 2)), r"cell1\.conv\.stride=\(2, 2\) is not supported"),
        "dilation 2": (setattr_("cell1.conv", "dilation", (2, 2)), r"cell1\.conv\.dilation=\(2, 2\) is not supported"),
        "groups 2": (setattr_("cell1.conv", "groups", 2), r"cell1\.conv\.groups=2 is not supported"),
        "rectangular kernel": (conv(kernel_size=(3, 5), padding=(1, 2)), r"cell1\.conv\.kernel_size=\(3, 5\)"),
        "even kernel": (conv(kernel_size=4, padding=2), r"cell1\.conv\.kernel_size=\(4, 4\)"),
        "in channels": (conv(in_channels=8), r"cell1\.conv\.weight must have shape \(20, 9, 3, 3\) .* got \(20, 8, 3, 3\)"),
        "weight": (param("cell0.conv", "weight", (16, 7, 3, 3 + 2)), r"cell0\.conv\.weight must have shape \(16, 7, 3, 3\)"),
        "bias": (param("cell1.conv", "bias", (21,)), r"cell1\.conv\.bias must have shape \(20,\) .* got \(21,\)"),
        "projection": (param("attention.k_matrix", "weight", (5, 4)), r"attention\.k_matrix\.weight must have shape \(5, 5\)"),
    }


@pytest.mark.parametrize("change", list(_conv_changes()))
@pytest.mark.parametrize("path", PATHS[:-1])
def test_submodule_geometry_no_backend_computes_is_refused(change, path):
    """A layer's conv must be what the math has -- square odd kernel, 'same' zero padding, stride 1,
    dilation 1, groups 1, weight (4C, Cin + C, k, k) -- and a projection (C, C).  Otherwise every
    backend refuses alike, naming the submodule: they used to misread it each its own way (stride
    and dilation ignored everywhere; a padding of 0 ran on the reference and crashed cpp)."""
    m = make(sk.LSTMSA2d)
    mutate, message = _conv_changes()[change]
    mutate(m)
    with pytest.raises(ValueError, match="LSTMSA2d: " + message):
        run(m, torch.randn(2, 2, 3, 5, 6), path)


@pytest.mark.parametrize("variant", ["same", "ints", "list", "1x1 valid"])
@pytest.mark.parametrize("path", PATHS)
def test_submodule_geometry_the_math_allows_runs(path, variant):
    """The same math spelled otherwise runs: padding 'same', attributes set by hand as ints or lists,
    a 1x1 kernel with padding 'valid', another odd kernel size with its padding."""
    m = make(sk.SALSTM2d)
    conv = m.cell0.conv
    if variant == "same":
        conv.padding = "same"
    elif variant == "ints":
        conv.padding, conv.stride, conv.dilation, conv.kernel_size = 1, 1, 1, 3
    elif variant == "list":
        conv.padding, conv.kernel_size = [1, 1], [3, 3]
    else:
        m.cell0.conv = nn.Conv2d(7, 16, 1, padding="valid")
    m.cell1.conv = nn.Conv2d(9, 20, 5, padding=2)
    x = torch.randn(2, 2, 3, 5, 6)
    check_against(forward_backward(m, x, path), forward_backward(m, x, "reference"), torch.float32, path)


@pytest.mark.parametrize("hook", ["weight_norm", "spectral_norm", "prune"])
def test_submodule_geometry_checked_under_weight_hooks(hook):
    """A conv whose weight a pre-hook makes (weight norm, spectral norm, pruning) is checked too,
    after its hooks have run."""
    m = make(sk.SALSTM2d)
    conv = m.cell1.conv
    if hook == "prune":
        torch.nn.utils.prune.l1_unstructured(conv, "weight", 0.3)
    else:
        getattr(torch.nn.utils, hook)(conv)
    conv.padding = (0, 0)
    with pytest.raises(ValueError, match=r"SALSTM2d: cell1\.conv\.padding=\(0, 0\) is not supported"):
        m(torch.randn(2, 2, 3, 5, 6))


def test_parametrized_weights_are_computed_once_per_read():
    """The geometry check reads plain parameters only: a parametrized projection's weight is computed
    as often as the forward itself reads it -- the same count with the check as without."""
    from torch.nn.utils import parametrize

    from salstm_kernels import submodules

    class Counting(nn.Module):
        calls = 0

        def forward(self, w):
            Counting.calls += 1
            return w

    m = make(sk.LSTMSA2d)
    parametrize.register_parametrization(m.attention.q_matrix, "weight", Counting())
    x = torch.randn(2, 1, 3, 5, 6)

    def reads(check):
        kept = submodules._check_geometry
        submodules._check_geometry = check
        try:
            Counting.calls = 0
            m(x)
            return Counting.calls
        finally:
            submodules._check_geometry = kept

    assert reads(submodules._check_geometry) == reads(lambda *a: None) >= 1


def _state(B=2, H=5, W=6, dtype=torch.float32, hidden=HIDDEN):
    return [(torch.zeros(B, C, H, W, dtype=dtype), torch.zeros(B, C, H, W, dtype=dtype)) for C in hidden]


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
@pytest.mark.parametrize("which,bad_shape", [("B", (3, 5, 5, 6)), ("C", (2, 4, 5, 6)), ("H", (2, 5, 4, 6)),
                                              ("W", (2, 5, 5, 7)), ("rank", (2, 5, 30))])
def test_state_shape_mismatch(path, which, bad_shape):
    m = make(sk.SALSTM2d, backend=path)
    x = torch.randn(2, 2, 3, 5, 6)
    state = _state()
    state[1] = (state[1][0], torch.zeros(bad_shape))
    msg = re.escape(f"state[1] c must have shape (B, C, H, W) = (2, 5, 5, 6) to match x (2, 2, 3, 5, 6) "
                    f"and hidden_channels[1]=5, got {bad_shape}")
    with pytest.raises(ValueError, match=msg):
        m(x, state=state)


def test_state_structure_errors():
    m = make(sk.ConvLSTM2d)
    x = torch.randn(2, 2, 3, 5, 6)
    with pytest.raises(ValueError, match="expected 2, got 1"):
        m(x, state=_state()[:1])
    with pytest.raises(TypeError, match="list of \\(h, c\\) pairs"):
        m(x, state=torch.zeros(2, 4, 5, 6))
    with pytest.raises(ValueError, match=r"state\[0\] must be a \(h, c\) pair"):
        m(x, state=[(torch.zeros(2, 4, 5, 6),), _state()[1]])


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_dtype_mismatches(path):
    m = make(sk.SALSTM2d, backend=path)
    x = torch.randn(2, 2, 3, 5, 6)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameter cell0.conv.weight is torch.float32"):
        m(x.double())
    with pytest.raises(TypeError, match=r"state\[0\] h has dtype torch.float64, expected x's dtype torch.float32"):
        m(x, state=[(torch.zeros(2, 4, 5, 6, dtype=torch.float64), torch.zeros(2, 4, 5, 6))] + _state()[1:])
    with pytest.raises(TypeError, match=r"x must be a floating tensor.*got dtype torch.int64"):
        m(torch.ones(2, 2, 3, 5, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        m([1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            TypeError, match=r"x has dtype torch.float64 but the module's parameter cell0.conv.weight is torch.float32"):
        m(x.double())  # (autocast excuses 16/32-bit mixes only: it leaves float64 alone)


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_device_mismatches(path):
    """``meta`` stands in for a second device: the checks run before any kernel is chosen."""
    m = make(sk.LSTMSA2d, backend=path)
    with pytest.raises(ValueError, match=r"x is on meta but the module's parameter cell0.conv.weight is on cpu"):
        m(torch.empty(2, 2, 3, 5, 6, device="meta"))
    x = torch.randn(2, 2, 3, 5, 6)
    state = _state()
    state[0] = (state[0][0], state[0][1].to("meta"))
    with pytest.raises(ValueError, match=r"state\[0\] c is on meta, expected x's device cpu"):
        m(x, state=state)


def test_time_and_space_must_not_be_empty():
    m = make(sk.SALSTM2d)
    with pytest.raises(ValueError, match="T=0 time steps"):
        m(torch.randn(2, 0, 3, 5, 6))
    with pytest.raises(ValueError, match=r"empty H x W = 0 x 6"):
        m(torch.randn(2, 1, 3, 0, 6))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_empty_batch_is_valid_on_every_path(cls, path):
    """Policy: B = 0 gives an empty (0, C, H, W) output and empty states, and backward runs."""
    m = make(cls)
    x = torch.randn(0, 2, 3, 5, 6, requires_grad=True)
    out, states = run(m, x, path)
    assert out.shape == (0, 5, 5, 6) and out.dtype == torch.float32
    assert [tuple(t.shape) for pair in states for t in pair] == [(0, 4, 5, 6)] * 2 + [(0, 5, 5, 6)] * 2
    out.sum().backward()
    for p in m.parameters():
        assert p.grad is None or not p.grad.any()
    # and with an explicit (empty) initial state
    out2, _ = run(m, x, path, state=_state(B=0))
    assert out2.shape == (0, 5, 5, 6)


def test_slice_fusion_checks_its_three_slices():
    m = sk.SliceFusion2d(sk.SALSTM2d, 3, [4], 2, kernel_size=3)
    a = torch.randn(1, 3, 5, 6)
    with pytest.raises(ValueError, match=r"x3 is \(1, 3, 5, 5\) torch.float32 on cpu, x2 is \(1, 3, 5, 6\)"):
        m(a, a, torch.randn(1, 3, 5, 5))


def test_slice_fusion_rejects_unbatched_slices():
    """``(Cin, H, W)`` slices would stack into a 4-D ``x`` read as ``(B, Cin, H, W)``: with ``Cin = 2``
    that ran and returned wrong numbers; each slice must be ``(B, Cin, H, W)``."""
    m = sk.SliceFusion2d(sk.SALSTM2d, 2, [4], 3, kernel_size=3)
    a = torch.randn(2, 6, 6)
    with pytest.raises(ValueError, match=r"x1 must be \(B, 2, H, W\) \(one slice's features\), got shape \(2, 6, 6\)"):
        m(a, a, a)
    assert m(a[None], a[None], a[None]).shape == (1, 3, 6, 6)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_tensor_subclass_input_runs_forward_and_backward(cls, path):
    """MONAI's ``MetaTensor`` (what MONAI pipelines hand a network) through every path, forward and
    backward, with the plain tensor's numbers (its ``new_empty`` rejects a bare int size, which the
    fused backward once passed)."""
    MetaTensor = pytest.importorskip("monai.data").MetaTensor
    m = make(cls)
    x = torch.randn(2, 2, CIN, 5, 6)
    plain = forward_backward(m, x.clone().requires_grad_(), path)
    meta = forward_backward(m, MetaTensor(x.clone()).requires_grad_(), path)
    check_against([[t.as_tensor() if isinstance(t, MetaTensor) else t for t in part] for part in meta], plain,
                  torch.float32, "MetaTensor")


def test_sa_only_checks():
    m = sk.SAOnly2d(3)
    with pytest.raises(ValueError, match=r"SAOnly2d: x must be \(B, 3, H, W\), got shape \(1, 4, 5, 5\)"):
        m(torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="x has dtype torch.float64 but the module's parameter attention.q_matrix.weight is torch.float32"):
        m(torch.randn(1, 3, 5, 5, dtype=torch.float64))


# -- the op boundary (validation.check_lstm_*_args, for the lead to call in ops/) -------------
def _op_args(B=2, C=3, H=4, W=5, dtype=torch.float32, proj=True):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, 4 * C, H, W, generator=g).to(dtype)
    c = torch.randn(B, C, H, W, generator=g).to(dtype)
    P = tuple(t.detach() for t in random_projections(C, dtype=dtype, generator=g)) if proj else (None,) * 6
    return A, c, P


def test_op_checks_accept_what_the_ops_compute():
    for proj, comb in ((True, "linear"), (True, "none"), (False, "nonlinear")):
        A, c, P = _op_args(proj=proj)
        check_lstm_cell_args(A, c)
        check_lstm_attention_args(A, c, *P, scale=0.5, combination=comb)
        out, h, c_new, _ = ops.lstm_attention(A, c, *P, 0.5, comb, "reference")
        expected = reference.lstm_attention_ref(A, c, 0.5, comb, P if proj else None)
        for a, b in zip((out, h, c_new), expected):
            assert_close(a, b, torch.float32)


@pytest.mark.parametrize("case,exc,msg", [
    ("A rank", ValueError, r"lstm_cell: A must be 4-D \(B, 4C, H, W\), got 3-D shape \(2, 12, 20\)"),
    ("c rank", ValueError, r"lstm_cell: c must be 4-D \(B, C, H, W\), got 5-D shape"),
    ("A channels", ValueError, r"lstm_cell: A must have shape \(B, 4C, H, W\) = \(2, 12, 4, 5\) to match c of shape \(B, C, H, W\) = \(2, 3, 4, 5\), got \(2, 9, 4, 5\)"),
    ("B", ValueError, r"lstm_cell: A must have shape \(B, 4C, H, W\) = \(2, 12, 4, 5\) to match c of shape \(B, C, H, W\) = \(2, 3, 4, 5\), got \(3, 12, 4, 5\)"),
    ("HW", ValueError, r"lstm_cell: A must have shape \(B, 4C, H, W\) = \(2, 12, 4, 5\) to match c of shape \(B, C, H, W\) = \(2, 3, 4, 5\), got \(2, 12, 5, 4\)"),
    ("c channels", ValueError, r"lstm_cell: A must have shape \(B, 4C, H, W\) = \(2, 8, 4, 5\) to match c of shape \(B, C, H, W\) = \(2, 2, 4, 5\), got \(2, 12, 4, 5\)"),
    ("dtype", TypeError, r"lstm_cell: c has dtype torch.float64, expected A's dtype torch.float32"),
    ("int", TypeError, r"lstm_cell: A must be floating, got dtype torch.int64"),
    ("device", ValueError, r"lstm_cell: c is on meta, expected A's device cpu"),
    ("empty", ValueError, r"lstm_cell: empty tensors are not supported by the fused ops \(c shape \(0, 3, 4, 5\)\)"),
    ("not tensor", TypeError, r"lstm_cell: A must be a torch.Tensor, got float"),
])
def test_lstm_cell_op_checks(case, exc, msg):
    A, c, _ = _op_args()
    A, c = {
        "A rank": lambda: (A.flatten(2), c),
        "c rank": lambda: (A, c[None]),
        "A channels": lambda: (A[:, :9], c),
        "B": lambda: (torch.cat([A, A[:1]]), c),
        "HW": lambda: (A.transpose(2, 3), c),
        "c channels": lambda: (A, c[:, :2]),
        "dtype": lambda: (A, c.double()),
        "int": lambda: (A.long(), c),
        "device": lambda: (A, c.to("meta")),
        "empty": lambda: (A[:0], c[:0]),
        "not tensor": lambda: (1.0, c),
    }[case]()
    with pytest.raises(exc, match=msg):
        check_lstm_cell_args(A, c)


@pytest.mark.parametrize("case,exc,msg", [
    ("cell", ValueError, r"lstm_attention: A must have shape \(B, 4C, H, W\) = \(2, 12, 4, 5\) to match c of shape \(B, C, H, W\) = \(2, 3, 4, 5\), got \(2, 9, 4, 5\)"),
    ("missing", ValueError, r"projections must be all given or all None; missing \['bk'\]"),
    ("w shape", ValueError, r"lstm_attention: wv must have shape \(3, 3\) \(C=3 from c\), got \(3, 4\)"),
    ("b shape", ValueError, r"lstm_attention: bq must have shape \(3,\) \(C=3 from c\), got \(1, 3\)"),
    ("p dtype", TypeError, r"lstm_attention: wk has dtype torch.float64, expected A's dtype torch.float32"),
    ("p device", ValueError, r"lstm_attention: bv is on meta, expected A's device cpu"),
    ("combination", ValueError, r"combination must be one of \('linear', 'nonlinear', 'none'\), got 'gated'"),
    ("none needs proj", ValueError, r"combination='none' needs the projections"),
    ("scale", ValueError, r"scale must be a finite float or None \(1/sqrt\(H\*W\)\), got nan"),
    ("scale inf", ValueError, r"scale must be a finite float or None \(1/sqrt\(H\*W\)\), got inf"),
    ("scale -inf", ValueError, r"scale must be a finite float or None \(1/sqrt\(H\*W\)\), got -inf"),
])
def test_lstm_attention_op_checks(case, exc, msg):
    A, c, P = _op_args()
    P = list(P)
    comb, scale = "linear", 0.5
    if case == "cell":
        A = A[:, :9]
    elif case == "missing":
        P[3] = None
    elif case == "w shape":
        P[4] = torch.zeros(3, 4)
    elif case == "b shape":
        P[1] = P[1][None]
    elif case == "p dtype":
        P[2] = P[2].double()
    elif case == "p device":
        P[5] = P[5].to("meta")
    elif case == "combination":
        comb = "gated"
    elif case == "none needs proj":
        P, comb = [None] * 6, "none"
    elif case.startswith("scale"):
        scale = {"scale": float("nan"), "scale inf": float("inf"), "scale -inf": -float("inf")}[case]
    with pytest.raises(exc, match=msg):
        check_lstm_attention_args(A, c, *P, scale=scale, combination=comb)


# ============================================================================================
# 2. Memory layouts
# ============================================================================================
def _layouts(x):
    """Same values as ``x (B, T, C, H, W)`` in other memory layouts."""
    B, T, C, H, W = x.shape
    big = nan_like(x.new_empty(B, T, C, 2 * H + 1, W + 3))
    big[:, :, :, 1::2, 2:-1] = x
    sliced = big[:, :, :, 1::2, 2:-1]
    permuted = x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)  # channels-last-like 5-D
    expanded = x[:1].expand(B, T, C, H, W) if B > 1 else x.expand(B, T, C, H, W)
    return {"sliced": sliced, "channels_last_5d": permuted, "expanded": expanded}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_memory_layouts_match_contiguous(cls, path):
    torch.manual_seed(3)
    x0 = torch.randn(2, 2, 3, 5, 6)
    x0[1] = x0[0]  # so that the expanded variant holds the same values
    m = make(cls)
    ref = forward_backward(m, x0, "reference")
    base = forward_backward(m, x0, path)
    check_against(base, ref, torch.float32, f"{path} contiguous")
    for name, x in _layouts(x0).items():
        assert not x.is_contiguous() and torch.equal(x, x0), name
        check_against(forward_backward(m, x, path), base, torch.float32, f"{path} {name}")
    # 4-D channels_last input (T = 1), non-contiguous states, channels_last parameters
    x4 = x0[:, 0]
    base4 = forward_backward(m, x4, path)
    check_against(forward_backward(m, x4.to(memory_format=torch.channels_last), path), base4, torch.float32,
                  f"{path} channels_last input")
    state = [(torch.randn(2, C, 5, 6), torch.randn(2, C, 5, 6)) for C in HIDDEN]
    base_s = forward_backward(m, x0, path, state)
    cl_state = [tuple(t.to(memory_format=torch.channels_last) for t in pair) for pair in state]
    sl_state = [tuple(nan_like(torch.cat([t, t], dim=3))[..., ::2].copy_(t) for t in pair) for pair in state]
    assert not sl_state[0][0].is_contiguous()
    check_against(forward_backward(m, x0, path, cl_state), base_s, torch.float32, f"{path} channels_last state")
    check_against(forward_backward(m, x0, path, sl_state), base_s, torch.float32, f"{path} sliced state")
    m_cl = make(cls).to(memory_format=torch.channels_last)
    assert not m_cl.cell0.conv.weight.is_contiguous()
    check_against(forward_backward(m_cl, x0, path), base, torch.float32, f"{path} channels_last weights")


# ============================================================================================
# 3. Special values
# ============================================================================================
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_in_input_propagate_as_reference(cls, path, value):
    torch.manual_seed(4)
    x = torch.randn(2, 2, 3, 5, 6)
    x[0, 0, 1, 2, 3] = value
    m = make(cls)
    ref = forward_backward(m, x, "reference")
    got = forward_backward(m, x, path)
    if value != value or path == "reference":
        # assert_close fails when NaN / inf sit in different places than in the reference
        check_against(got, ref, torch.float32, f"{path} {value}")
    else:
        # +-inf: the fused paths' t=0 from the zero state has no forget gate (it multiplies c = 0).
        # The reference's forget rows of the first conv's weight gradient take 0 * inf = NaN
        # there (a zero dA_f times the inf input); the fused ones are the finite exact gradient.
        # Everything else must match, NaN for NaN.
        C, w_grad = HIDDEN[0], got[1][0]
        forget = torch.zeros_like(w_grad, dtype=torch.bool)
        forget[C:2 * C, :CIN] = True
        ref_nan = ref[1][0].isnan()
        assert (ref_nan & forget).any(), "the test must show the reference's 0 * inf"
        assert torch.isfinite(w_grad[ref_nan & forget]).all()
        masked = torch.where(ref_nan & forget, w_grad, ref[1][0])  # those entries compared as equal
        check_against((got[0], got[1]), (ref[0], [masked, *ref[1][1:]]), torch.float32, f"{path} {value}")
        assert not torch.isfinite(w_grad).all(), "the inf still reaches the other gates' weight gradient"
    out_ref = ref[0][0]
    if value != value:
        assert out_ref[0].isnan().any(), "the test must actually feed a NaN through"
        assert torch.isfinite(out_ref[1]).all(), "batch elements must stay independent"
        assert got[0][0][0].isnan().sum() == out_ref[0].isnan().sum()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_nan_in_state_propagates(cls, path):
    torch.manual_seed(5)
    x = torch.randn(2, 1, 3, 5, 6)
    state = [(torch.randn(2, C, 5, 6), torch.randn(2, C, 5, 6)) for C in HIDDEN]
    state[-1][1][1, 0, 0, 0] = float("nan")  # last layer's c, batch 1
    m = make(cls)
    ref = forward_backward(m, x, "reference", state)
    assert ref[0][0][1].isnan().any() and torch.isfinite(ref[0][0][0]).all()
    check_against(forward_backward(m, x, path, state), ref, torch.float32, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d])
@pytest.mark.parametrize("value", [float("nan"), -float("inf")])
def test_nonfinite_state_through_nonlinear_attention(cls, path, value):
    """The nonlinear combination's relu(f c'), relu(g h') must keep a NaN (the Triton kernels' first
    ``tl.maximum`` dropped it: one image column NaN where the reference's whole image is), and its
    backward must take autograd's order, relu's mask then the product, so ``0 * inf`` is NaN where
    ``c' = -inf`` (Triton's gradients were finite there).  Every gradient, state and input alike."""
    torch.manual_seed(5)
    x = torch.randn(2, 1, 3, 5, 6, requires_grad=True)
    state = [(torch.randn(2, C, 5, 6), torch.randn(2, C, 5, 6)) for C in HIDDEN]
    state[-1][1][1, 0, 2, 3] = value  # last layer's c, batch 1
    state = [(h.requires_grad_(), c.requires_grad_()) for h, c in state]
    m = make(cls, combination="nonlinear")
    ref = forward_backward(m, x, "reference", state)
    assert torch.isfinite(ref[0][0][0]).all() and ref[0][0][1].isnan().any() == (value != value)
    assert any(g.isnan().any() for g in ref[1])  # -inf too: the 0 * inf above
    check_against(forward_backward(m, x, path, state), ref, torch.float32, path)


@pytest.mark.parametrize("backend", sk.available_backends("cpu"))
@pytest.mark.parametrize("C,gated", [(5, False), (5, True), (70, False)])  # Triton: single-pass, blocked
def test_nonlinear_gradient_at_exact_zeros(backend, C, gated):
    """relu(f c') and relu(g h') at exactly +-0 (zero conv output for the g gate, a zero state: an
    image's zero padding or a zero input with zero bias): relu's gradient there is 0, as autograd
    of the reference takes it.  A mask ``x < 0`` instead of ``x <= 0`` passes the gradient: dA 4e-2
    off (the review's mutation, which no other test caught)."""
    g = torch.Generator().manual_seed(C)
    A = torch.randn(2, 4 * C, 4, 5, generator=g) * 2
    c = torch.randn(2, C, 4, 5, generator=g)
    # One channel at a time, so that the other channels' K and Q keep dQ, dK there non-zero.
    # Channel 0: g = +-0 and c = +-0, so c' = +-0 and f c' = +-0 with f and dQ non-zero.
    # Channel 1: g = +-0 and c non-zero, so g h' = +-0 with h' and dK non-zero.
    for ch in (0, 1):
        A[:, 3 * C + ch, 0] = 0.0
        A[:, 3 * C + ch, 1] = -0.0
    c[:, 0, 0] = 0.0
    c[:, 0, 1] = -0.0
    proj = tuple(p.detach() for p in random_projections(C, torch.float32, generator=g)) if gated else None
    grads = [torch.randn(c.shape, generator=g) for _ in range(3)]

    def run(fn):
        A_, c_ = A.clone().requires_grad_(), c.clone().requires_grad_()
        out, h, c_new = fn(A_, c_)[:3]
        return [out, h, c_new, *torch.autograd.grad([out, h, c_new], [A_, c_], grads)]

    want = run(lambda A_, c_: reference.lstm_attention_ref(A_, c_, 0.3, "nonlinear", proj))
    got = run(lambda A_, c_: ops.lstm_attention(A_, c_, *(proj or (None,) * 6), 0.3, "nonlinear", backend))
    for name, a, b in zip(["out", "h'", "c'", "dA", "dc"], got, want):
        assert_close(a, b, torch.float32, backward=name.startswith("d"), name=f"{backend} {name}")


@pytest.mark.parametrize("path,dtype", [(p, d) for p in PATHS for d in (torch.float32, torch.float64)
                                         if not (p == "triton" and d == torch.float64)])  # (Triton: 32 bits at most)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("gate", ["i", "o"])
def test_saturated_gates_keep_their_relative_precision(cls, path, gate, dtype):
    """A gate whose conv bias holds it deep in saturation (sigmoid(-11) = 1.7e-5 in float32,
    sigmoid(-30) = 9e-14 in float64) scales the states and the output down: they and every gradient
    must keep the dtype's relative precision.  The cpp kernels' sigmoid, 0.5 tanh(x/2) + 0.5, had
    a fixed absolute error, which left the float32 output 1.4e-3 off at -11 and gave an exactly
    zero gate (a dead gradient) below -18."""
    m = make(cls, dtype=dtype)
    row = {"i": 0, "o": 2}[gate]
    with torch.no_grad():
        for conv in m.convs():
            C = conv.out_channels // 4
            conv.bias[row * C:(row + 1) * C] = -11.0 if dtype == torch.float32 else -30.0
    torch.manual_seed(7)
    x = torch.randn(2, 2, 3, 5, 6, dtype=dtype)
    ref = forward_backward(m, x, "reference")
    h_last = ref[0][-2]
    assert 0 < h_last.abs().max() < 1e-4, "the gate must scale the last layer's h' down"
    check_against(forward_backward(m, x, path), ref, dtype, f"{path} {gate} gate saturated")


@pytest.mark.parametrize("backend", sk.available_backends("cpu"))
def test_gate_activations_at_extreme_pre_activations(backend):
    """Every gate row of ``A`` runs through +-inf, +-3e38, +-1e30, +-1e10, +-104.5, +-88.7, +-20,
    0 and NaN: ``h', c'`` as the reference's, NaN for NaN.  (A first cpp exp reduced ``x - n ln2``
    in float: ~1e23 for ``x = 1e30``, which made sigmoid(1e30) 0.)"""
    v = [float("inf"), 3e38, 1e30, 1e10, 104.5, 88.7, 20.0]
    v = torch.tensor(v + [-x for x in v] + [0.0, float("nan")])
    A = v.repeat(4).reshape(1, 4, 1, v.numel())  # C = 1: the rows i, f, o, g
    c = torch.ones(1, 1, 1, v.numel())
    for got, want, name in zip(ops.lstm_cell(A, c, backend), reference.lstm_cell_ref(A, c), ("h'", "c'")):
        _close(got, want, torch.float32, False, f"{backend} {name}")
    got = ops.lstm_cell_zero_state(A[:, :3], backend)
    want = reference.lstm_cell_ref(torch.cat([A[:, :1], torch.zeros_like(A[:, :1]), A[:, 1:3]], 1), 0 * c)
    for g, w, name in zip(got, want, ("h'", "c'")):
        _close(g, w, torch.float32, False, f"{backend} zero-state {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d])
def test_softmax_stable_for_huge_scores(cls, path):
    """A large cell state with scale 1 drives the channel scores to ~1e4: exp would overflow."""
    torch.manual_seed(6)
    m = make(cls, attention_size=1)
    x = torch.randn(2, 1, 3, 4, 4)
    state = [(torch.zeros(2, C, 4, 4), torch.full((2, C, 4, 4), 2.0e4)) for C in HIDDEN]
    state[-1][1][:, 0] = -1.5e4
    convs = m.convs()
    (i, f, o, g), st = reference.convlstm_ref(x, [c.weight for c in convs], [c.bias for c in convs], state)
    h, c = st[-1]
    Q, K, _ = reference.qkv_factors(f, g, c, h, "linear")
    if cls is sk.LSTMSA2d:
        p = m._projection_tensors()
        Q, K = Q * reference.channel_projection(h, p[0], p[1]), K * reference.channel_projection(h, p[2], p[3])
    S = torch.einsum("bcn,bdn->bcd", Q.flatten(2), K.flatten(2))
    assert S.abs().max() > 1e4 and not torch.isfinite(S.exp()).all(), "scores must be large enough to overflow exp"
    ref = forward_backward(m, x, "reference", state)
    got = forward_backward(m, x, path, state)
    assert all(torch.isfinite(t).all() for t in ref[0] + ref[1])
    check_against(got, ref, torch.float32, path)


# ============================================================================================
# 4. Autocast
# ============================================================================================
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_matches_reference(cls, path, x_dtype):
    """Policy: convs/matmuls in bf16, recurrent states in x's dtype, grads in the parameters' dtype."""
    torch.manual_seed(7)
    m = make(cls)
    x = torch.randn(2, 2, 3, 5, 6).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = forward_backward(m, x, "reference")
        got = forward_backward(m, x, path)
    outs = ref[0]
    assert all(t.dtype == x_dtype for t in outs[1:]), "states keep x's dtype"
    expected_out = x_dtype if cls is sk.ConvLSTM2d else torch.bfloat16
    assert outs[0].dtype == expected_out
    assert all(g.dtype == torch.float32 for g in got[1]), "parameter grads stay in the parameters' dtype"
    check_against(got, ref, torch.bfloat16, f"{path} autocast")
    # and autocast is really on: the fp32 result differs
    fp32 = forward_backward(m, x.float(), "reference")[0][0]
    assert not torch.equal(fp32, outs[0].float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_autocast_forward_then_backward_outside_it(cls, path):
    """The usual AMP pattern: forward under ``torch.autocast``, backward after the block.  The ops
    compute in their own precision with autocast off inside (the reference provider's bmm under
    autocast once saved a bfloat16 ``P`` and then met float32 in a backward outside autocast)."""
    torch.manual_seed(7)
    m = make(cls)
    x = torch.randn(2, 2, 3, 5, 6)
    results = []
    for p in ("reference", path):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, states = run(m, x, p)
        outs = flat(out, states)
        g = torch.Generator().manual_seed(3)
        gouts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        results.append(([o.detach() for o in outs], grads_of(outs, list(m.parameters()), gouts)))
    check_against(results[1], results[0], torch.bfloat16, f"{path} autocast, backward outside")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [sk.LSTMSA2d, sk.LSTMThenSA2d])
def test_states_need_no_grad_when_only_the_projections_train(cls, path):
    """Frozen convs, trainable attention projections, an input without grad: the final states do not
    depend on anything trainable, so (as in the reference) they do not require grad -- a loss on
    them raises instead of backpropagating a silent zero; the output still trains the projections."""
    m = make(cls)
    for conv in m.convs():
        conv.requires_grad_(False)
    out, states = run(m, torch.randn(2, 2, 3, 5, 6), path)
    assert out.requires_grad and not any(t.requires_grad for pair in states for t in pair)
    out.sum().backward()
    assert m.attention.q_matrix.weight.grad is not None


def test_autocast_with_bf16_state_on_bf16_input():
    m = make(sk.SALSTM2d)
    x = torch.randn(1, 2, 3, 5, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for path in PATHS:
            _, states = run(m, x, path, state=_state(B=1, dtype=torch.bfloat16))
            assert all(t.dtype == torch.bfloat16 for pair in states for t in pair)
        with pytest.raises(TypeError, match="expected x's dtype torch.bfloat16"):
            m(x, state=_state(B=1))


# ============================================================================================
# 5. Determinism
# ============================================================================================
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", CLASSES)
def test_bitwise_deterministic(cls, path):
    torch.manual_seed(8)
    x = torch.randn(2, 2, 3, 6, 7, requires_grad=True)
    state = [(torch.randn(2, C, 6, 7, requires_grad=True), torch.randn(2, C, 6, 7, requires_grad=True)) for C in HIDDEN]
    m = make(cls)
    first = forward_backward(m, x, path, state)
    for _ in range(2):
        again = forward_backward(m, x, path, state)
        for a, b in zip(first[0] + first[1], again[0] + again[1]):
            assert torch.equal(a, b)


# ============================================================================================
# 9. Checkpoints
# ============================================================================================
@pytest.mark.parametrize("cls", CLASSES)
def test_strict_loading_reports_missing_and_unexpected_keys(cls):
    m = make(cls)
    sd = m.state_dict()
    assert "cell0.conv.weight" in sd and "cell1.conv.bias" in sd
    missing = dict(sd)
    del missing["cell1.conv.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "cell1.conv.bias"'):
        make(cls).load_state_dict(missing)
    extra = dict(sd, **{"cell2.conv.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "cell2.conv.weight"'):
        make(cls).load_state_dict(extra)
    bad = dict(sd, **{"cell0.conv.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"size mismatch for cell0.conv.weight"):
        make(cls).load_state_dict(bad)
    res = make(cls).load_state_dict(missing, strict=False)
    assert res.missing_keys == ["cell1.conv.bias"]


@pytest.mark.parametrize("save_path", PATHS)
@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d])
def test_state_dict_moves_between_backends(cls, save_path):
    torch.manual_seed(9)
    m = make(cls, seed=10)
    x = torch.randn(2, 2, 3, 5, 6)
    # one optimiser step under the saving backend, so the weights are not the constructor's
    out, _ = run(m, x, save_path)
    out.square().mean().backward()
    with torch.no_grad():
        for p in m.parameters():
            p -= 0.1 * p.grad
    expected = run(m, x, save_path)[0].detach()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    for load_path in PATHS:
        buf.seek(0)
        m2 = make(cls, seed=99)
        m2.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        assert_close(run(m2, x, load_path)[0], expected, torch.float32, name=f"{save_path} -> {load_path}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cls", [sk.LSTMSA2d, sk.LSTMThenSA2d])
def test_a_loss_on_the_states_only_leaves_projection_gradients_none(cls, path):
    """The attention output unused (a loss on the returned ``h, c``): the projections get no
    gradient -- None, as in the reference, not zeros (AdamW's weight decay moved a zero-gradient
    ``q_matrix`` on the fused backends and not on the reference) -- and everything else matches."""
    m = make(cls)
    x = torch.randn(2, 2, CIN, 5, 4, requires_grad=True)

    def grads(p):
        m.zero_grad(set_to_none=True)
        x.grad = None
        out, states = run(m, x, p)
        (states[-1][0].sum() + 2 * states[-1][1].sum() + states[0][1].pow(2).sum()).backward()
        return [x.grad] + [q.grad for q in m.parameters()]

    want, got = grads("reference"), grads(path)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, want):
        if name.startswith("attention."):
            assert a is None and b is None, name
        else:
            _close(a, b, torch.float32, True, f"{path} {name}")


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_inference_mode_inputs_train(path):
    """Features made under ``torch.inference_mode`` (a frozen encoder) feed a trainable module: the
    fused recurrence saved ``x``'s step slices as they were, and autograd cannot save an inference
    tensor ("Inference tensors cannot be saved for backward"); the reference copied them in its cat."""
    m = make(sk.LSTMSA2d, backend=path)
    with torch.inference_mode():
        x = torch.randn(2, 2, CIN, 5, 4)
        state = [(torch.randn(2, C, 5, 4), torch.randn(2, C, 5, 4)) for C in HIDDEN]
    want = forward_backward(make(sk.LSTMSA2d), x.clone(), "reference", [(h.clone(), c.clone()) for h, c in state])
    check_against(forward_backward(m, x, path, state), want, torch.float32, f"{path} inference-mode inputs")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("which", ["q_matrix", "v_matrix"])
def test_projection_without_bias(path, which):
    """A projection ``Linear`` whose bias a user removed: the reference ran, the fused paths raised
    AttributeError on ``None.to``; they now take a zero bias (exact)."""
    m = make(sk.LSTMSA2d)
    zero_bias = copy.deepcopy(m)
    getattr(m.attention, which).bias = None
    with torch.no_grad():
        getattr(zero_bias.attention, which).bias.zero_()
    x = torch.randn(2, 2, CIN, 5, 4, requires_grad=True)
    outs, grads = forward_backward(zero_bias, x, "reference")
    params = list(zero_bias.parameters())
    kept = [g for p, g in zip(params, grads) if p is not getattr(zero_bias.attention, which).bias]
    # the same as a zero bias, on every path (the reference's too: all take the module's tensors)
    check_against(forward_backward(m, x, path), (outs, kept + grads[len(params):]), torch.float32, path)


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
def test_what_the_modules_cannot_run_of_their_submodules_is_refused_or_warned(path):
    """The modules read their convs' and projections' parameters and compute them without calling
    them (every backend): a conv padding mode other than zeros or a subclass with its own forward
    would be skipped silently, so they raise; other forward hooks warn that they do not run."""

    class StandardizedConv(torch.nn.Conv2d):
        def forward(self, x):
            w = self.weight
            return self._conv_forward(x, (w - w.mean()) / w.std(), self.bias)

    x = torch.randn(1, 2, CIN, 5, 4)
    m = make(sk.LSTMSA2d, backend=path)
    m.cell1.conv.padding_mode = "reflect"
    with pytest.raises(ValueError, match=r"LSTMSA2d: cell1.conv.padding_mode='reflect' is not supported"):
        m(x)
    m = make(sk.LSTMSA2d, backend=path)
    conv = m.cell0.conv
    m.cell0.conv = StandardizedConv(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    with pytest.raises(TypeError, match=r"cell0.conv is a StandardizedConv with its own forward"):
        m(x)
    m = make(sk.LSTMSA2d, backend=path)
    m.attention.k_matrix = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"attention.k_matrix is a Identity not an nn.Linear"):
        m(x)
    m = make(sk.LSTMSA2d, backend=path)
    seen = []
    m.attention.v_matrix.register_forward_hook(lambda *a: seen.append(a))
    with pytest.warns(UserWarning, match=r"the forward hooks registered on attention.v_matrix do not run"):
        m(x)
    assert not seen


@pytest.mark.parametrize("path", sk.available_backends("cpu"))
@pytest.mark.parametrize("where", ["cell1.conv", "attention.v_matrix"])
def test_every_parameter_dtype_is_checked(path, where):
    """Only ``cell0``'s dtype was compared with ``x``: a projection or a later layer left in another
    dtype was cast silently by the fused backends (the reference raised PyTorch's own error)."""
    m = make(sk.LSTMSA2d, backend=path)
    m.get_submodule(where).double()
    with pytest.raises(TypeError, match=rf"LSTMSA2d: x has dtype torch.float32 but the module's parameter {where}.\w+ is torch.float64"):
        m(torch.randn(1, 2, CIN, 5, 4))
