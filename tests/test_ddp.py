"""Scaling out: 2-process DistributedDataParallel (gloo, CPU, loopback; file rendezvous, no fixed port) on a small model built from
the modules gives the gradients of single-process full-batch training, step after step, on every
available backend and the fused path with the pure-PyTorch provider."""
from __future__ import annotations

import datetime
import faulthandler
import os
import shutil
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import salstm_kernels as sk
from salstm_kernels.ops import providers
from salstm_kernels.testing import assert_close
from salstm_kernels.validation import check_input

FUSED_REFERENCE = "fused:reference"
PATHS = sk.available_backends("cpu") + [FUSED_REFERENCE]
WORLD, STEPS, TIMEOUT_S = 2, 2, 60


def _dtype(path):
    """float64 where the path's kernels compute it (tight comparison), else float32."""
    provider = path.split(":", 1)[1] if path.startswith("fused:") else path
    if provider != "reference" and torch.float64 not in providers.supported_dtypes(provider, "cpu"):
        return torch.float32
    return torch.float64

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


class Segmenter(nn.Module):
    """LSTM-SA over two slices, then a 1x1 conv head -- the shape of the paper's models."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.core = sk.LSTMSA2d(3, [4, 4], 3, backend="auto" if path.startswith("fused:") else path)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        if self.path.startswith("fused:"):
            y = self.core._forward_fused(check_input(x, 3, "Segmenter"), None, self.path.split(":", 1)[1])[0]
        else:
            y = self.core(x)
        return self.head(y)


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 2, 3, 5, 6, generator=g, dtype=dtype), torch.randn(4, 2, 5, 6, generator=g, dtype=dtype)


def _initial_model(path):
    torch.manual_seed(0)
    return Segmenter(path).to(_dtype(path))


def _train(model, x, y, step_fn):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append(step_fn())
        opt.step()
    return grads


def _worker(rank, path, rendezvous_file, state_dict, out_file):
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=True)  # a hang shows where, then ends
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        torch.set_num_threads(1)
        model = _initial_model(path)
        model.load_state_dict(state_dict)
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data(_dtype(path))
        per = x.shape[0] // WORLD
        sl = slice(rank * per, (rank + 1) * per)
        grads = _train(ddp, x[sl], y[sl], lambda: [p.grad.clone() for p in model.parameters()])
        if rank == 0:
            torch.save({"grads": grads, "params": [p.detach() for p in model.parameters()]}, out_file)
        del ddp  # release the reducer while the peer is still there ...
        dist.barrier()  # ... and let both ranks finish before tearing the group down
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("path", PATHS)
def test_ddp_two_processes_match_full_batch(path):
    model = _initial_model(path)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data(_dtype(path))
    full = _train(model, x, y, lambda: [p.grad.clone() for p in model.parameters()])
    assert all(g.abs().sum() > 0 for g in full[-1]), "every parameter must get a gradient"

    # a private directory: pytest's tmp_path can be pruned by a concurrent pytest session
    workdir = tempfile.mkdtemp(prefix="salstm_ddp_")
    out_file = os.path.join(workdir, "rank0.pt")
    ctx = mp.start_processes(_worker, args=(path, os.path.join(workdir, "rendezvous"), init, out_file), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    result = torch.load(out_file, weights_only=True)
    shutil.rmtree(workdir, ignore_errors=True)
    for step, (got, ref) in enumerate(zip(result["grads"], full)):
        for i, (a, b) in enumerate(zip(got, ref)):
            assert_close(a, b, _dtype(path), backward=True, name=f"{path} step {step} grad {i}")
    for i, (a, b) in enumerate(zip(result["params"], model.parameters())):
        assert_close(a, b, _dtype(path), name=f"{path} param {i} after {STEPS} steps")
