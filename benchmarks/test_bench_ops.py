"""pytest-benchmark suite for the fused ops, one group per op and shape, one entry per backend.

    python -m pytest benchmarks/ --benchmark-only

Backends are every one :func:`salstm_kernels.available_backends` lists for the device (``reference``
here is the pure-PyTorch kernel provider behind the ops), except Triton under the CPU interpreter,
which is for correctness only.  Small shapes, so the suite runs in well under a minute on a CPU.
"""
import pytest
import torch

from bench_common import BACKENDS, DEVICE, synced
from salstm_kernels import ops
from salstm_kernels.testing import random_projections

B, C, H, W = (2, 32, 32, 32) if DEVICE == "cpu" else (2, 64, 112, 112)
SHAPE = f"B{B} C{C} {H}x{W}"
#: attention variants: SA-LSTM (no projections), LSTM-SA (gated projections), separated LSTM-then-SA
VARIANTS = {"sa-lstm": ("linear", False), "lstm-sa": ("linear", True), "lstm-then-sa": ("none", True)}



def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(B, 4 * C, H, W, generator=g).to(DEVICE).requires_grad_(requires_grad)
    c = torch.randn(B, C, H, W, generator=g).to(DEVICE).requires_grad_(requires_grad)
    return A, c


def _label(benchmark, op, backend):
    benchmark.group = f"{op} {SHAPE} float32"
    benchmark.extra_info.update({"backend": backend, "device": DEVICE, "shape": SHAPE})


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_cell_forward(benchmark, backend):
    _label(benchmark, "lstm_cell forward", backend)
    A, c = _inputs()
    with torch.no_grad():
        h, _ = benchmark(synced(lambda: ops.lstm_cell(A, c, backend)))
    assert h.shape == c.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_cell_forward_backward(benchmark, backend):
    _label(benchmark, "lstm_cell forward+backward", backend)
    A, c = _inputs(requires_grad=True)
    dh, dc = torch.randn_like(c), torch.randn_like(c)

    def step():
        A.grad = c.grad = None
        h, c_new = ops.lstm_cell(A, c, backend)
        torch.autograd.backward([h, c_new], [dh, dc])

    benchmark(synced(step))
    assert A.grad is not None and torch.isfinite(A.grad).all()


def _attention_args(variant, requires_grad):
    combination, gated = VARIANTS[variant]
    A, c = _inputs(requires_grad)
    proj = random_projections(C, device=DEVICE, generator=torch.Generator().manual_seed(1)) if gated else (None,) * 6
    if gated and not requires_grad:
        proj = tuple(p.detach() for p in proj)
    return A, c, proj, combination


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_attention_forward(benchmark, backend, variant):
    _label(benchmark, f"lstm_attention[{variant}] forward", backend)
    A, c, proj, combination = _attention_args(variant, requires_grad=False)
    scale = 1.0 / (H * W) ** 0.5
    with torch.no_grad():
        out = benchmark(synced(lambda: ops.lstm_attention(A, c, *proj, scale, combination, backend)))
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lstm_attention_forward_backward(benchmark, backend, variant):
    _label(benchmark, f"lstm_attention[{variant}] forward+backward", backend)
    A, c, proj, combination = _attention_args(variant, requires_grad=True)
    scale = 1.0 / (H * W) ** 0.5
    dout = torch.randn_like(c)
    leaves = [t for t in (A, c, *proj) if t is not None]

    def step():
        for t in leaves:
            t.grad = None
        out, _, _, _ = ops.lstm_attention(A, c, *proj, scale, combination, backend)
        out.backward(dout)

    benchmark(synced(step))
    assert A.grad is not None and torch.isfinite(A.grad).all()
