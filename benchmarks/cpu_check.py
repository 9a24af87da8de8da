"""Issue-4 CPU check: backend "cpp" vs the eager reference, in one run.

    python benchmarks/cpu_check.py [--sizes 56 112] [--min-run-time 1.0] [--no-memory] [--threads N]

Module targets (B=2, Cin=C=64, T=2, k=5, fp32): SA-LSTM and LSTM-SA with backend="cpp" at least
1.35x faster forward and 1.3x forward+backward than backend="reference"; the fused non-conv ops
alone >= 2x faster than the reference provider (ops/reference_kernels.py) and than the eager
reference math with autograd (reference.py); fwd+bwd peak memory (high-water RSS growth, measured
in a fresh subprocess per case) no higher than eager.  Prints one table with the ratios.

Timings run with glibc told to keep freed memory (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
set high, as jemalloc or tcmalloc behave; the script re-executes itself with them).  Otherwise glibc
may return a freed multi-MB output to the OS and page-fault it in again on the next call, which
makes the op timings bimodal (e.g. 1.0 or 2.0 ms) depending on heap history -- and favours the
side that allocates less.  ``--system-malloc`` times with the process's own settings instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
from torch.utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import salstm_kernels as sk  # noqa: E402
from salstm_kernels import cpp_kernels, reference  # noqa: E402
from salstm_kernels.ops import reference_kernels  # noqa: E402
from salstm_kernels.testing import random_projections  # noqa: E402

B, CIN, C, T, K = 2, 64, 64, 2, 5
MODULES = {"SA-LSTM": sk.SALSTM2d, "LSTM-SA": sk.LSTMSA2d}


THREADS = [torch.get_num_threads()]  # set by --threads; torch.utils.benchmark.Timer defaults to 1


def _time(stmt, glob, min_run_time):
    timer = benchmark.Timer(stmt, globals=glob, num_threads=THREADS[0])
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _module(name, backend, size):
    torch.manual_seed(0)
    m = MODULES[name](CIN, C, K, backend=backend)
    x = torch.randn(B, T, CIN, size, size)
    return m, x


def _fwd_bwd(m, x):
    x.requires_grad_(True)
    out = m(x)
    out.backward(torch.ones_like(out))


def module_rows(size, mrt):
    rows = []
    for name in MODULES:
        t = {}
        for backend in ("reference", "cpp"):
            m, x = _module(name, backend, size)
            with torch.no_grad():
                t[backend, "fwd"] = _time("m(x)", dict(m=m, x=x), mrt)
            t[backend, "fwd+bwd"] = _time("f(m, x)", dict(m=m, x=x, f=_fwd_bwd), mrt)
        for kind, target in (("fwd", 1.35), ("fwd+bwd", 1.3)):
            ref, cpp = t["reference", kind], t["cpp", kind]
            rows.append((f"{name} module {kind}", size, ref, cpp, ref / cpp, target))
    return rows


def _eager_attention(A, c, proj, scale):
    A = A.detach().requires_grad_(True)
    c = c.detach().requires_grad_(True)
    p = None if proj is None else tuple(t.detach().requires_grad_(True) for t in proj)
    out, h, cn = reference.lstm_attention_ref(A, c, scale, "linear", p)
    return out, h, cn, (A, c, *(p or ()))


def op_rows(size, mrt):
    """The fused non-conv op of the last step, forward and forward+backward."""
    rows = []
    g = torch.Generator().manual_seed(0)
    N = size * size
    A = torch.randn(B, 4 * C, size, size, generator=g)
    c = torch.randn(B, C, size, size, generator=g)
    d = [torch.randn(B, C, size, size, generator=g) for _ in range(3)]
    scale = 1.0 / N**0.5
    for label, proj in (("SA-LSTM", None), ("LSTM-SA", tuple(p.detach() for p in random_projections(C, generator=g)))):
        def prov_fb(m):
            out, h, cn, P = m.attention_forward(A, c, proj, scale, "linear")
            return m.attention_backward(A, c, proj, P, d[0], d[1], d[2], scale, "linear")

        def eager_fb():
            out, h, cn, leaves = _eager_attention(A, c, proj, scale)
            torch.autograd.grad((out, h, cn), leaves, d)

        def eager_f():
            with torch.no_grad():
                return reference.lstm_attention_ref(A, c, scale, "linear", proj)

        t_cpp_f = _time("m.attention_forward(A, c, p, s, 'linear')", dict(m=cpp_kernels, A=A, c=c, p=proj, s=scale), mrt)
        t_rk_f = _time("m.attention_forward(A, c, p, s, 'linear')", dict(m=reference_kernels, A=A, c=c, p=proj, s=scale), mrt)
        t_eg_f = _time("f()", dict(f=eager_f), mrt)
        t_cpp_fb = _time("f(m)", dict(f=prov_fb, m=cpp_kernels), mrt)
        t_rk_fb = _time("f(m)", dict(f=prov_fb, m=reference_kernels), mrt)
        t_eg_fb = _time("f()", dict(f=eager_fb), mrt)
        rows += [
            (f"{label} op fwd vs reference_kernels", size, t_rk_f, t_cpp_f, t_rk_f / t_cpp_f, 2.0),
            (f"{label} op fwd vs eager reference.py", size, t_eg_f, t_cpp_f, t_eg_f / t_cpp_f, 2.0),
            (f"{label} op fwd+bwd vs reference_kernels", size, t_rk_fb, t_cpp_fb, t_rk_fb / t_cpp_fb, 2.0),
            (f"{label} op fwd+bwd vs eager autograd", size, t_eg_fb, t_cpp_fb, t_eg_fb / t_cpp_fb, 2.0),
        ]
    t_cpp = _time("m.cell_forward(A, c)", dict(m=cpp_kernels, A=A, c=c), mrt)
    t_ref = _time("m.cell_forward(A, c)", dict(m=reference_kernels, A=A, c=c), mrt)
    rows.append(("cell op fwd vs reference_kernels", size, t_ref, t_cpp, t_ref / t_cpp, 2.0))
    t_cpp = _time("m.cell_backward(A, c, d[0], d[1])", dict(m=cpp_kernels, A=A, c=c, d=d), mrt)
    t_ref = _time("m.cell_backward(A, c, d[0], d[1])", dict(m=reference_kernels, A=A, c=c, d=d), mrt)
    rows.append(("cell op bwd vs reference_kernels", size, t_ref, t_cpp, t_ref / t_cpp, 2.0))
    return rows


MEMORY_CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {root!r})
sys.argv = ["x"]
from benchmarks.cpu_check import _module, _fwd_bwd
name, backend, size = {name!r}, {backend!r}, {size}
m, x = _module(name, backend, size)
_fwd_bwd(m, x)  # warm-up: lazy init, allocator pools
m.zero_grad(set_to_none=True); x.grad = None
def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before = rss_kb()
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc_trim(0)
base = rss_kb()
# reset the high-water mark (Linux >= 4.0)
open("/proc/self/clear_refs", "w").write("5")
_fwd_bwd(m, x)
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
print(json.dumps({{"peak_mb": (hwm - base) / 1024}}))
"""


# Timing runs: glibc keeps freed memory in the heap (no mmap below 32 MiB, no trimming), so a
# freed tensor's pages are reused instead of being returned and page-faulted in again.
RETAIN_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}  # 32 MiB: glibc's maximum


# glibc serves every allocation >= 64 KiB by mmap and returns it to the OS on free (no dynamic
# threshold, no trim slack), so the RSS high-water mark follows the live tensors instead of what
# malloc happened to keep cached (without this, repeated runs of one case differ by up to 30%).
MEMORY_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def memory_rows(size):
    rows = []
    for name in MODULES:
        peak = {}
        for backend in ("reference", "cpp"):
            code = MEMORY_CHILD.format(root=ROOT, name=name, backend=backend, size=size)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=MEMORY_ENV)
            if r.returncode != 0:
                raise RuntimeError(r.stderr[-2000:])
            peak[backend] = json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]
        rows.append((f"{name} module fwd+bwd peak MB (RSS growth)", size, peak["reference"], peak["cpp"],
                     peak["reference"] / max(peak["cpp"], 1e-9), 1.0))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[56, 112])
    ap.add_argument("--min-run-time", type=float, default=1.0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--skip-modules", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads the timed statements run with (default: torch.get_num_threads(); "
                         "torch.utils.benchmark.Timer alone would use 1)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="time with glibc's default (memory-returning) settings instead of RETAIN_ENV")
    args = ap.parse_args()
    if not args.system_malloc and any(os.environ.get(k) != v for k, v in RETAIN_ENV.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **RETAIN_ENV))
    THREADS[0] = args.threads
    from salstm_kernels import cpp_extension

    ok, why = cpp_extension.status()
    if not ok:
        sys.exit(f"the C++ extension is not available: {why}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"timed with {THREADS[0]} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"cpp row kernels: {torch.ops.salstm_kernels_cpp.cpu_capability()}; load average {os.getloadavg()[0]:.1f} "
          "(other processes share these cores: ratios are measured back to back in one run)")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}")
    print("malloc: " + ("system defaults" if args.system_malloc else
                        "glibc keeps freed memory (" + " ".join(f"{k}={v}" for k, v in RETAIN_ENV.items()) + ")"))
    print(f"config: B={B} Cin={CIN} C={C} T={T} k={K} float32; times are medians (torch.utils.benchmark)")
    rows = []
    for size in args.sizes:
        if not args.skip_modules:
            rows += module_rows(size, args.min_run_time)
        rows += op_rows(size, args.min_run_time)
        if not args.no_memory and not args.skip_modules:
            rows += memory_rows(size)
    w = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{w}}  {'HxW':>7}  {'baseline':>10}  {'cpp':>10}  {'ratio':>6}  {'target':>6}  ok")
    for name, size, base, cpp, ratio, target in rows:
        unit = "" if "MB" in name else " ms"
        scale = 1.0 if "MB" in name else 1e3
        ok = "yes" if ratio >= target else "NO"
        print(f"{name:<{w}}  {size:>3}x{size:<3}  {base * scale:>8.2f}{unit:3}  {cpp * scale:>8.2f}{unit:3}  "
              f"{ratio:>5.2f}x  {target:>5.2f}x  {ok}")
    print("\nratio = baseline / cpp (time: speed-up; memory: eager peak / cpp peak, >= 1 means cpp is no higher)")


if __name__ == "__main__":
    main()
