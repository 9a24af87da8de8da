"""Host (Python and dispatch) time of one module training step, where the kernels take no time.

At tiny shapes (default B=1, Cin=C=8, 4x4, T=2) a step's kernels are microseconds, so its time is
the host work: the eager reference's autograd of many small ops against our recurrence, op entries
and kernel launches.  This is what bounds a GPU step at moderate sizes (at 112x112 on an H200 the
wall time was 2-3x the CUDA-graph device time, ``RESULTS.md``).  Each fused backend is timed with
the ops' eager entries (``ops.dispatch.EAGER_FUNCTION``, the shipped default) and through the
registered custom ops.  On CUDA, ``torch.utils.benchmark`` synchronises per block of steps, so with
kernels this small the number is host time.

    PYTHONPATH=. python benchmarks/host_overhead.py            # CUDA if present, else CPU (cpp)
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.utils.benchmark as tb

import salstm_kernels as sk
from salstm_kernels import available_backends
from salstm_kernels.ops import dispatch


def step_us(m, x, min_run_time: float) -> float:
    """Median microseconds of one ``m(x).sum().backward()``."""
    def step():
        m(x).sum().backward()

    for _ in range(3):  # warm-up: caches, kernel compiles
        step()
    return tb.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time).median * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=4, help="H = W (default 4: kernels negligible)")
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    fused = [b for b in available_backends(dev) if b != "reference" and not (dev.type == "cpu" and b == "triton")]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {dev} ({name}), torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}")
    print("command: python " + " ".join(sys.argv))
    C, S = args.channels, args.size
    x = torch.randn(1, 2, C, S, S, device=dev)
    print(f"B=1 T=2 Cin=C={C} {S}x{S}, fwd+bwd, median us per step")
    print(f"{'module':<10} {'implementation':<30} {'us':>8} {'vs eager':>9}")
    for cls in (sk.SALSTM2d, sk.LSTMSA2d):
        m = cls(C, C, 5, backend="reference").to(dev)
        eager = step_us(m, x, args.min_run_time)
        print(f"{cls.__name__:<10} {'eager reference':<30} {eager:8.0f} {1.0:8.2f}x")
        for backend in fused:
            m.backend = backend
            for entries in (True, False):
                kept, dispatch.EAGER_FUNCTION = dispatch.EAGER_FUNCTION, entries
                try:
                    t = step_us(m, x, args.min_run_time)
                finally:
                    dispatch.EAGER_FUNCTION = kept
                how = "op entries" if entries else "custom-op dispatch"
                print(f"{cls.__name__:<10} {backend + ', ' + how:<30} {t:8.0f} {eager / t:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
