"""Paper-Table-III-style benchmark: ``salstm-kernels bench``.

For the separated baseline (LSTM then SA, :class:`LSTMThenSA2d`), SA-LSTM (:class:`SALSTM2d`) and
LSTM-SA (:class:`LSTMSA2d`), each run as

* ``eager``    -- the ``reference`` backend, plain PyTorch (the baseline of every speed-up);
* ``compile``  -- ``torch.compile`` of the reference (compile time excluded, reported apart;
  a failure to compile is a row marked failed, with the reason);
* every fused backend :func:`salstm_kernels.available_backends` lists for the device,

measure parameters, forward FLOPs, forward and forward+backward latency (median and IQR, warm-up
excluded), peak memory and the speed-up over eager.  Every non-eager row is first checked against
the float64 reference at the benchmarked shape (:func:`salstm_kernels.verify.parity`, the tolerance
table of :mod:`salstm_kernels.testing`); a row that fails is reported FAIL and not timed.

Definitions (also written into the JSON/CSV):

* forward latency: one inference call under ``torch.no_grad()``;
* forward+backward latency: one training step -- forward with grad, ``out.backward(g)`` with a
  fixed random ``g``, parameter and input gradients reset to ``None`` each step;
* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over one forward of each row's module
  (matrix products only, as the counter counts; the fused ops count theirs through the formulas in
  :mod:`salstm_kernels.ops.flops`, so fused rows show the split conv's fewer conv FLOPs at
  T = 2 (no recurrent conv and no forget-gate rows at t = 0 from the zero state); ``compile`` rows show the eager count);
* peak memory: CUDA -- ``torch.cuda.max_memory_allocated`` minus the allocation before the call;
  CPU -- the running maximum of the CPU allocator's allocations minus frees during the call, from
  ``torch.profiler`` memory events (``profile_memory=True``), i.e. peak tensor memory the call adds
  on top of what already existed (parameters and inputs are not counted).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .backends import available_backends, triton_interpreter_on
from .modules import LSTMSA2d, LSTMThenSA2d, SALSTM2d
from .verify import module_runner, parity

#: ``(label, class)`` in the order of the paper's Table III: the baseline first.
DESIGNS: Tuple[Tuple[str, type], ...] = (
    ("LSTM-then-SA", LSTMThenSA2d),
    ("SA-LSTM", SALSTM2d),
    ("LSTM-SA", LSTMSA2d),
)

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during the call minus memory_allocated before it",
    "cpu": "peak of CPU allocator allocations-minus-frees during the call (torch.profiler profile_memory events); "
    "excludes tensors alive before the call (parameters, inputs) and buffers kept across calls (the cpp "
    "backend's per-thread scratch, up to 8 MiB a slot, held from the first call on; benchmarks/cpu_check.py's "
    "RSS rows include it)",
}
TIMING_METHOD = {
    "cuda": "triton.testing.do_bench (warm-up excluded), quantiles 25/50/75 %",
    "cpu": "torch.utils.benchmark.Timer, `repeats` blocks after warm-up; median and IQR of the per-call block means",
}


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    channels: int = 32
    in_channels: Optional[int] = None  # None: same as channels
    sizes: List[Tuple[int, int]] = field(default_factory=lambda: [(32, 32)])
    steps: int = 2
    layers: int = 1
    kernel_size: int = 5
    repeats: int = 10
    warmup: int = 3
    #: CPU: target seconds per timing block; CUDA: do_bench ``rep`` in ms is ``repeats * 10``
    block_s: float = 0.05
    compile: bool = True
    compile_backend: str = "inductor"
    backends: Optional[List[str]] = None  # fused backends to run; None: every available one
    #: intra-op CPU threads (``torch.set_num_threads``) for the run; None: leave torch's setting.
    #: On a shared, loaded machine 1 thread gives far steadier numbers than oversubscribed OpenMP.
    threads: Optional[int] = None
    seed: int = 0

    @classmethod
    def defaults(cls, device: str, quick: bool = False) -> "BenchConfig":
        if quick:
            # a smoke run: torch.compile traces with dynamo + AOTAutograd but skips inductor codegen
            return cls(device=device, batch=1, channels=8, sizes=[(8, 8), (12, 12)], steps=2, kernel_size=3,
                       repeats=3, warmup=1, block_s=0.005, compile_backend="aot_eager")
        if torch.device(device).type == "cuda":
            return cls(device=device, batch=2, channels=64, sizes=[(112, 112)], repeats=10)
        return cls(device=device)


def parse_size(text: str) -> Tuple[int, int]:
    """``"32"`` -> ``(32, 32)``; ``"7x9"`` -> ``(7, 9)``."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size must be N or HxW with positive ints, got {text!r}")
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The package checkout's commit (``+dirty`` when it has uncommitted changes), if it is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def environment(device: str) -> Dict[str, object]:
    from . import __version__

    return {
        "device": device,
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "salstm_kernels": __version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": _load_average(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int, block_s: float) -> Dict[str, float]:
    """``{"median_ms", "iqr_ms", "p25_ms", "p75_ms"}`` for one call of ``fn``, warm-up excluded."""
    if device.type == "cuda":
        import triton.testing  # only on CUDA, where the triton backend needs it anyway

        p25, p50, p75 = triton.testing.do_bench(fn, warmup=25, rep=max(20, repeats * 10), quantiles=[0.25, 0.5, 0.75])
        return {"median_ms": p50, "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25}
    from torch.utils.benchmark import Timer

    for _ in range(max(warmup, 1)):
        fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    number = max(1, int(block_s / max(once, 1e-7)))
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    samples = sorted(timer.timeit(number).mean * 1e3 for _ in range(max(repeats, 1)))
    if len(samples) >= 2:
        q = statistics.quantiles(samples, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = samples[0]
    return {"median_ms": statistics.median(samples), "p25_ms": p25, "p75_ms": p75, "iqr_ms": p75 - p25}


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak bytes ``fn`` allocates on top of what exists before it (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return float(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (Kineto prints profiler start/stop lines there from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:240]


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
def implementations(cfg: BenchConfig) -> List[Tuple[str, str]]:
    """``(impl label, backend)`` rows per design: eager, compile, then the fused backends."""
    impls = [("eager", "reference")]
    if cfg.compile:
        impls.append(("compile", "reference"))
    fused = cfg.backends if cfg.backends is not None else [b for b in available_backends(cfg.device) if b != "reference"]
    impls += [(b, b) for b in fused]
    return impls


@dataclass
class Row:
    design: str
    impl: str
    backend: str
    H: int
    W: int
    B: int
    Cin: int
    C: int
    T: int
    layers: int
    k: int
    dtype: str
    params: int = 0
    fwd_gflop: float = float("nan")
    status: str = "ok"  # ok | FAIL (wrong numbers) | failed (error) | skipped
    reason: str = ""
    fwd_err: float = float("nan")
    bwd_err: float = float("nan")
    fwd_ms: float = float("nan")
    fwd_iqr_ms: float = float("nan")
    train_ms: float = float("nan")
    train_iqr_ms: float = float("nan")
    fwd_peak_mib: float = float("nan")
    train_peak_mib: float = float("nan")
    compile_s: float = float("nan")
    speedup_fwd: float = float("nan")
    speedup_train: float = float("nan")

    @property
    def size(self) -> str:
        return f"{self.H}x{self.W}"


def _bench_impl(row: Row, module: nn.Module, impl: str, x: torch.Tensor, gout: torch.Tensor, cfg: BenchConfig,
                device: torch.device, ref_module: nn.Module) -> None:
    """Fill ``row``: compile (if asked), correctness gate, latency and memory."""
    if impl != "eager" and device.type == "cpu" and row.backend == "triton" and triton_interpreter_on():
        row.status, row.reason = "skipped", "Triton interpreter (TRITON_INTERPRET=1) is for correctness, not timing"
        return
    params = [p for p in module.parameters()]
    target = module
    if impl == "compile":
        target = torch.compile(module, backend=cfg.compile_backend)
    x_train = x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return target(x, None, return_state=True)

    def train():
        for p in params:
            p.grad = None
        x_train.grad = None
        out, _ = target(x_train, None, return_state=True)
        out.backward(gout)

    if impl == "compile":
        try:
            t0 = time.perf_counter()
            fwd()
            train()
            _sync(device)
            row.compile_s = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 -- report, don't crash
            row.status, row.reason = "failed", f"torch.compile failed: {_short(e)}"
            return
    if impl != "eager":
        res = parity(module_runner(target), module, x, None, seed=cfg.seed, ref_module=ref_module)
        row.fwd_err, row.bwd_err = res.fwd_err, res.bwd_err
        if res.error:
            row.status, row.reason = "failed", res.error
            return
        if not res.ok:
            row.status = "FAIL"
            row.reason = (f"fwd {res.fwd_err:.1e} (tol {res.fwd_tol:.0e}, {res.fwd_worst}), "
                          f"bwd {res.bwd_err:.1e} (tol {res.bwd_tol:.0e}, {res.bwd_worst})")
            return
    try:
        f = time_call(fwd, device, cfg.repeats, cfg.warmup, cfg.block_s)
        t = time_call(train, device, cfg.repeats, cfg.warmup, cfg.block_s)
        row.fwd_ms, row.fwd_iqr_ms = f["median_ms"], f["iqr_ms"]
        row.train_ms, row.train_iqr_ms = t["median_ms"], t["iqr_ms"]
        row.fwd_peak_mib = peak_memory(fwd, device) / 2**20
        # from no gradients, as every timed step starts (else the step frees the last one's inside
        # the measurement, and the CUDA peak comes out low by their size)
        for p in params:
            p.grad = None
        x_train.grad = None
        row.train_peak_mib = peak_memory(train, device) / 2**20
    except Exception as e:  # noqa: BLE001
        row.status, row.reason = "failed", _short(e)


def run_bench(cfg: BenchConfig, progress: bool = True) -> Dict[str, object]:
    """Run every (size, design, implementation) and return ``{"meta": ..., "rows": [...]}``."""
    device = torch.device(cfg.device)
    saved_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        # CUDA timings (do_bench's events and syncs) and peaks are per current device: make it ours
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            rows = _run_rows(cfg, device, progress)
        meta = environment(cfg.device)  # records the thread count the rows ran with
    finally:
        torch.set_num_threads(saved_threads)
    meta.update({
        "config": {**asdict(cfg), "sizes": [f"{h}x{w}" for h, w in cfg.sizes]},
        "timing": TIMING_METHOD[device.type],
        "memory": MEMORY_METHOD[device.type],
        "forward": "inference call under torch.no_grad()",
        "forward_backward": "training step: forward with grad + out.backward(g); grads reset to None each step",
        "flops": "FlopCounterMode over one forward of the row's module (matmuls and convs; fused ops via their "
                 "registered formulas; compile rows = eager)",
        "correctness": "non-eager rows compared with the float64 reference (forward + all gradients) before timing",
    })
    return {"meta": meta, "rows": [_row_dict(r) for r in rows]}


def _run_rows(cfg: BenchConfig, device: torch.device, progress: bool) -> List[Row]:
    dtype = DTYPES[cfg.dtype]
    cin = cfg.in_channels or cfg.channels
    hidden = [cfg.channels] * cfg.layers
    impls = implementations(cfg)
    work = [(s, d, i) for s in cfg.sizes for d in DESIGNS for i in impls]
    bar = _progress(len(work), enabled=progress)
    rows: List[Row] = []
    for (H, W) in cfg.sizes:
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(cfg.batch, cfg.steps, cin, H, W, generator=gen).to(device=device, dtype=dtype)
        gout = torch.randn(cfg.batch, cfg.channels, H, W, generator=gen).to(device=device, dtype=dtype)
        for label, cls in DESIGNS:
            torch.manual_seed(cfg.seed)
            base = cls(cin, hidden, cfg.kernel_size, backend="reference").to(device=device, dtype=dtype)
            ref_module = copy.deepcopy(base).double()  # float64 reference for the correctness gate
            n_params = sum(p.numel() for p in base.parameters())
            gflop = forward_flops(base, x) / 1e9
            eager = None
            for impl, backend in impls:
                bar.set(f"{H}x{W} {label} {impl}")
                row = Row(label, impl, backend, H, W, cfg.batch, cin, cfg.channels, cfg.steps, cfg.layers,
                          cfg.kernel_size, cfg.dtype, params=n_params, fwd_gflop=gflop)
                module = copy.deepcopy(base)
                module.backend = backend
                try:
                    if impl not in ("eager", "compile"):  # the fused path does less conv work
                        row.fwd_gflop = forward_flops(module, x) / 1e9
                    _bench_impl(row, module, impl, x, gout, cfg, device, ref_module)
                except Exception as e:  # noqa: BLE001 -- one broken row must not end the run
                    row.status, row.reason = "failed", _short(e)
                if impl == "eager":
                    eager = row
                if eager is not None and row.status == "ok":
                    row.speedup_fwd = eager.fwd_ms / row.fwd_ms
                    row.speedup_train = eager.train_ms / row.train_ms
                rows.append(row)
                bar.update()
                if impl == "compile":
                    torch._dynamo.reset()  # free the compiled graphs before the next module
    bar.close()
    return rows


def _row_dict(r: Row) -> Dict[str, object]:
    d = asdict(r)
    d["size"] = r.size
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------
class _Progress:
    """tqdm when installed, else one line per item on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.n, self._bar = total, enabled, 0, None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)

    def set(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)
        elif self.enabled:
            print(f"[{self.n + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _progress(total: int, enabled: bool) -> _Progress:
    return _Progress(total, enabled)


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def _fmt(v, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def format_table(result: Dict[str, object]) -> str:
    rows = result["rows"]
    header = ["design", "impl", "size", "params", "fwd GFLOP", "fwd ms (IQR)", "fwd+bwd ms (IQR)",
              "peak MiB fwd/train", "speed-up fwd/train", "status"]
    body = []
    for r in rows:
        # a row that failed part-way has some of its numbers: each cell shows what was measured
        fwd = f"{_fmt(r['fwd_ms'], '.3f')} ({_fmt(r['fwd_iqr_ms'], '.3f')})" if r["fwd_ms"] is not None else "-"
        train = f"{_fmt(r['train_ms'], '.3f')} ({_fmt(r['train_iqr_ms'], '.3f')})" if r["train_ms"] is not None else "-"
        mem = f"{_fmt(r['fwd_peak_mib'], '.2f')} / {_fmt(r['train_peak_mib'], '.2f')}"
        sp = f"{_fmt(r['speedup_fwd'], '.2f')}x / {_fmt(r['speedup_train'], '.2f')}x" if r["speedup_fwd"] is not None else "-"
        status = r["status"] if not r["reason"] else f"{r['status']}: {r['reason']}"
        body.append([r["design"], r["impl"], r["size"], f"{r['params']:,}", _fmt(r["fwd_gflop"], ".3f"), fwd, train, mem, sp, status])
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    compiled = [r for r in rows if r["impl"] == "compile" and r["compile_s"] is not None]
    if compiled:
        lines.append("")
        lines.append("torch.compile time (excluded from latency; first inference + first training call): " + ", ".join(
            f"{r['design']} {r['size']} {r['compile_s']:.1f} s" for r in compiled))
    return "\n".join(lines)


def format_header(result: Dict[str, object]) -> str:
    m = result["meta"]
    c = m["config"]
    return "\n".join([
        f"device: {m['device']} ({m['device_name']}), {m['threads']} threads; torch {m['torch']}, "
        f"triton {m['triton'] or '-'}, python {m['python']}; commit {m['git_commit'] or '-'}",
        f"shape: B={c['batch']} T={c['steps']} Cin={c['in_channels'] or c['channels']} C={c['channels']} "
        f"layers={c['layers']} k={c['kernel_size']} dtype={c['dtype']} sizes={','.join(c['sizes'])}",
        f"fwd = {m['forward']}; fwd+bwd = {m['forward_backward']}",
        f"latency: {m['timing']}",
        f"peak memory: {m['memory']}",
        f"FLOPs: {m['flops']}; speed-up = eager median / row median",
    ] + _load_warning(m))


def _load_warning(m: Dict[str, object]) -> List[str]:
    load, cpus = m.get("load_average"), m.get("cpu_count")
    if m["device"] != "cpu" or load is None or not cpus or load <= cpus:
        return []
    return [f"WARNING: 1-minute load average {load} on {cpus} CPUs: other processes compete for the cores, so "
            f"CPU timings are noisy{'' if m['threads'] == 1 else ' (multi-threaded ops suffer most: try --threads 1)'}"]


CSV_META = ("device", "device_name", "torch", "triton", "cuda", "python", "git_commit", "command")


def write_outputs(result: Dict[str, object], out_dir: str, log: Callable[[str], None] = print) -> Dict[str, str]:
    """Write ``bench.json``, ``bench.csv`` and (with matplotlib) ``bench.png`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "csv": os.path.join(out_dir, "bench.csv")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    rows = result["rows"]
    meta = result["meta"]
    fields = list(rows[0].keys()) + list(CSV_META) if rows else list(CSV_META)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **{k: meta.get(k) for k in CSV_META}})
    png = plot(result, os.path.join(out_dir, "bench.png"), log)
    if png:
        paths["png"] = png
    return paths


def plot(result: Dict[str, object], path: str, log: Callable[[str], None] = print) -> Optional[str]:
    """Latency vs size, one line per design x implementation; ``None`` without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        log("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series: Dict[Tuple[str, str], List[dict]] = {}
    for r in result["rows"]:
        if r["status"] == "ok":
            series.setdefault((r["design"], r["impl"]), []).append(r)
    styles = {d: s for (d, _), s in zip(DESIGNS, ("-", "--", ":"))}
    for ax, key, title in ((axes[0], "fwd_ms", "forward (inference)"), (axes[1], "train_ms", "forward + backward")):
        for (design, impl), rs in series.items():
            rs = sorted(rs, key=lambda r: r["H"] * r["W"])
            ax.plot([r["H"] * r["W"] for r in rs], [r[key] for r in rs], styles.get(design, "-"), marker="o",
                    label=f"{design} {impl}")
        ax.set_xlabel("pixels H*W")
        ax.set_ylabel("median latency (ms)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    m = result["meta"]
    fig.suptitle(f"salstm_kernels bench -- {m['device_name']} ({m['config']['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(cfg: BenchConfig, out_dir: str, progress: bool = True) -> int:
    result = run_bench(cfg, progress=progress)
    paths = write_outputs(result, out_dir)  # first: the measurements are kept whatever happens next
    print(format_header(result))
    print()
    print(format_table(result))
    print("\nwrote " + ", ".join(paths.values()))
    bad = [r for r in result["rows"] if r["status"] in ("FAIL", "failed")]
    if bad:
        print(f"\n{len(bad)} row(s) FAIL (wrong numbers) or failed (an error): "
              + ", ".join(f"{r['design']} {r['impl']} {r['size']}" for r in bad))
    return 1 if bad else 0
