"""Property-based parity: random small shapes, layer stacks, kernel sizes, combinations and initial
states -- every available backend and the fused path with the pure-PyTorch provider against the
reference backend, forward (output and every final state) and backward (parameters, x, state)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import salstm_kernels as sk
from test_robustness import PATHS, check_against, forward_backward

MODULES = [
    (sk.SALSTM2d, ("linear", "nonlinear")),
    (sk.LSTMSA2d, ("linear", "nonlinear")),
    (sk.LSTMThenSA2d, (None,)),
    (sk.ConvLSTM2d, (None,)),
]


@st.composite
def cases(draw):
    cls, combinations = draw(st.sampled_from(MODULES))
    kw = {}
    if combinations[0] is not None:
        kw["combination"] = draw(st.sampled_from(combinations))
    if cls is not sk.ConvLSTM2d:
        kw["attention_size"] = draw(st.one_of(st.none(), st.integers(1, 64)))
    return dict(
        cls=cls, kw=kw,
        B=draw(st.integers(1, 2)), T=draw(st.integers(1, 3)), Cin=draw(st.integers(1, 4)),
        hidden=draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)),
        H=draw(st.integers(1, 5)), W=draw(st.integers(1, 5)), k=draw(st.sampled_from([1, 3])),
        with_state=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_every_path_matches_reference(case):
    torch.manual_seed(case["seed"])
    m = case["cls"](case["Cin"], case["hidden"], case["k"], **case["kw"])
    B, T, H, W = case["B"], case["T"], case["H"], case["W"]
    x = torch.randn(B, T, case["Cin"], H, W, requires_grad=True)
    state = None
    if case["with_state"]:
        state = [(torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W, requires_grad=True))
                 for C in case["hidden"]]
    ref = forward_backward(m, x, "reference", state)
    assert ref[0][0].shape == (B, case["hidden"][-1], H, W)
    for path in PATHS:
        check_against(forward_backward(m, x, path, state), ref, torch.float32, f"{path} {case}")
