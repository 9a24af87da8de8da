"""The cpp path's conv layout at a size: channels_last against NCHW, and the shipped rule.

``recurrence.CHANNELS_LAST_MIN_PIXELS`` sends small images (a U-Net's bottleneck) to NCHW convs;
this measures where that pays.  Per shape ``B,T,C,H`` (SA-LSTM, Cin = C, k = 5, H x H, float32):
the eager reference, the cpp backend with every layer's convs channels_last, with every layer
NCHW (input and recurrent convs apart, and with one conv over ``cat(x_t, h)`` at ``t > 0``), and
as shipped -- inference (``torch.no_grad``) and a training step (forward with grad,
backward of ``out.sum()``).  Times are the minimum over ``--rounds`` rounds that run the rows in
turn, each sample about 0.1 s of calls: robust to other processes on a shared machine (a median
of one row after another was not: two helpers on this 2-core machine moved rows by 30%).  Peak
memory is the CPU allocator's peak during one call (``bench.peak_memory``), inference / training.

    python benchmarks/cpu_conv_layout.py 4,3,128,7 2,2,64,56 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import salstm_kernels as sk  # noqa: E402
from salstm_kernels import recurrence  # noqa: E402
from salstm_kernels.bench import environment, peak_memory  # noqa: E402

SHIPPED = dict(recurrence.CHANNELS_LAST_MIN_PIXELS)
SHIPPED_CAT = set(recurrence.CAT_CONV_DEVICES)
NCHW = {"cpu": (2**62, 0)}
ROWS = {  # row -> (CHANNELS_LAST_MIN_PIXELS, CAT_CONV_DEVICES) (None: eager)
    "eager": None,
    "shipped": (SHIPPED, SHIPPED_CAT),
    "channels_last": ({}, SHIPPED_CAT),
    "nchw": (NCHW, SHIPPED_CAT),
    "nchw, cat": (NCHW, SHIPPED_CAT | {"cpu"}),  # t > 0: one conv over cat(x_t, h)
}


def _calls(m, x):
    def infer():
        with torch.no_grad():
            m(x)

    def train():
        out = m(x.detach().requires_grad_())
        out.sum().backward()
        m.zero_grad(set_to_none=True)

    return infer, train


def _seconds(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(B, T, C, H, rounds):
    torch.manual_seed(0)
    x = torch.randn(B, T, C, H, H)
    cpp = sk.SALSTM2d(C, C, 5, backend="cpp")
    ref = sk.SALSTM2d(C, C, 5, backend="reference")
    ref.load_state_dict(cpp.state_dict())
    calls = {name: _calls(ref if rule is None else cpp, x) for name, rule in ROWS.items()}
    n = max(1, int(0.1 / _seconds(calls["eager"][1], 1)))
    best = {name: [float("inf")] * 2 for name in ROWS}
    mem = {}
    try:
        for r in range(rounds + 1):  # round 0 measures memory
            for name, rule in ROWS.items():
                recurrence.CHANNELS_LAST_MIN_PIXELS, recurrence.CAT_CONV_DEVICES = rule or (SHIPPED, SHIPPED_CAT)
                for i, fn in enumerate(calls[name]):
                    if r == 0:
                        fn()
                        mem.setdefault(name, []).append(peak_memory(fn, x.device) / 2**20)
                    else:
                        best[name][i] = min(best[name][i], _seconds(fn, n) * 1e3)
    finally:
        recurrence.CHANNELS_LAST_MIN_PIXELS, recurrence.CAT_CONV_DEVICES = SHIPPED, SHIPPED_CAT
    return best, mem


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shapes", nargs="+", help="B,T,C,H (SA-LSTM, Cin = C, H x H images)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    env = environment("cpu")
    print(f"command: python benchmarks/cpu_conv_layout.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device: {env.get('device_name', 'cpu')}, {a.threads} threads; torch {torch.__version__}; "
          f"shipped rule CHANNELS_LAST_MIN_PIXELS = {SHIPPED}")
    print("times: min over rounds, ms, inference / training step; x eager: eager's time over the row's")
    head = f"{'B,T,C,HxW':14s} {'pixels':>6s}  " + "  ".join(f"{n:>24s}" for n in ROWS) + "   peak MiB infer / train"
    print(head)
    for shape in a.shapes:
        B, T, C, H = (int(v) for v in shape.split(","))
        best, mem = measure(B, T, C, H, a.rounds)
        e = best["eager"]
        cells = []
        for name in ROWS:
            t = best[name]
            cells.append(f"{t[0]:6.1f}/{t[1]:6.1f} {e[0] / t[0]:4.2f}/{e[1] / t[1]:4.2f}x")
        mems = " ".join(f"{n.replace(', ', '+')[:8]} {m[0]:.1f}/{m[1]:.1f}" for n, m in mem.items())
        print(f"{B},{T},{C},{H}x{H}".ljust(14) + f" {B * H * H:6d}  " + "  ".join(f"{c:>24s}" for c in cells) + "   " + mems,
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
