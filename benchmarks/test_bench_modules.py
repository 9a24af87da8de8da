"""pytest-benchmark suite for the modules, one group per design and pass, one entry per backend.

    python -m pytest benchmarks/ --benchmark-only

``reference`` is the eager PyTorch reference; every other entry is a fused backend that
:func:`salstm_kernels.available_backends` lists for the device (Triton under the CPU interpreter is
left out: it is for correctness only).  ``salstm-kernels bench`` adds torch.compile, FLOPs, memory
and a correctness gate; this suite is for tracking latency over commits with pytest-benchmark.
"""
import copy

import pytest
import torch

from bench_common import BACKENDS, DEVICE, synced
from salstm_kernels import ConvLSTM2d, LSTMSA2d, LSTMThenSA2d, SALSTM2d

if DEVICE == "cpu":
    B, T, CIN, C, H, W, K = 2, 2, 32, 32, 32, 32, 5
else:
    B, T, CIN, C, H, W, K = 2, 2, 64, 64, 112, 112, 5
SHAPE = f"B{B} T{T} Cin{CIN} C{C} {H}x{W} k{K}"
DESIGNS = {"LSTM-then-SA": LSTMThenSA2d, "SA-LSTM": SALSTM2d, "LSTM-SA": LSTMSA2d, "ConvLSTM": ConvLSTM2d}



def _setup(benchmark, design, backend, pass_name):
    benchmark.group = f"{design} {pass_name} {SHAPE} float32"
    benchmark.extra_info.update({"backend": backend, "device": DEVICE, "shape": SHAPE})
    torch.manual_seed(0)
    module = DESIGNS[design](CIN, [C], K, backend="reference").to(DEVICE)
    module = copy.deepcopy(module)
    module.backend = backend
    x = torch.randn(B, T, CIN, H, W, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return module, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("design", list(DESIGNS))
def test_module_forward(benchmark, design, backend):
    module, x = _setup(benchmark, design, backend, "forward (no_grad)")
    with torch.no_grad():
        out = benchmark(synced(lambda: module(x)))
    assert out.shape == (B, C, H, W)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("design", list(DESIGNS))
def test_module_forward_backward(benchmark, design, backend):
    module, x = _setup(benchmark, design, backend, "forward+backward")
    x.requires_grad_(True)
    gout = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    params = list(module.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        module(x).backward(gout)

    benchmark(synced(step))
    assert x.grad is not None and torch.isfinite(x.grad).all()
