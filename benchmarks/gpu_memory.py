"""What is alive at the peak of one training step: the allocations behind ``peak MiB``.

    PYTHONPATH=. python benchmarks/gpu_memory.py            # CUDA: SA-LSTM / LSTM-SA, 224x224,
                                                            # float32 and bfloat16, eager and triton
    PYTHONPATH=. python benchmarks/gpu_memory.py --size 112 --dtype bfloat16
    PYTHONPATH=. python benchmarks/gpu_memory.py --nhwc     # also triton with channels_last convs

``gpu_check.py`` reports peak training memory against eager; this says what makes it up.  One step
(``B=2, Cin=C=64, T=2, k=5``, after a warm-up step) runs with the CUDA allocator's history on
(``torch.cuda.memory._record_memory_history``); the trace is replayed to the moment the allocated
bytes peak, and the blocks alive then are listed, largest first, in MiB and in *state units* (one
``(B, C, H, W)`` tensor of the input dtype), each with the innermost Python frame that allocated it
(``salstm_kernels`` frames preferred) -- e.g. saved ``A`` per step (4 units), the cuDNN conv
workspace, ``dA``.  The memory model in ``benchmarks/RESULTS.md`` (fourth session) is checked
against this.  CUDA only: the allocator history does not exist on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def live_at_peak(trace: Sequence[dict]) -> Tuple[int, List[Tuple[int, list]]]:
    """Replay an allocator trace (``device_traces[i]`` of a memory snapshot: dicts with ``action``,
    ``addr``, ``size``, ``frames``): ``(peak bytes, [(size, frames) of the blocks alive then]``,
    largest first).  A block counts from ``alloc`` to ``free_requested`` (when the allocator's
    *allocated* bytes drop; ``free_completed`` follows, later only for blocks used on another
    stream); ``segment_*`` entries are reserved memory, not counted.  Sizes are the requested ones
    (the allocator rounds blocks up, so ``max_memory_allocated`` can be a little higher).  Bytes
    count from the trace's start, as ``max_memory_allocated`` minus the allocation before the call."""
    live: Dict[int, Tuple[int, list]] = {}
    cur = peak = 0
    at_peak: Dict[int, Tuple[int, list]] = {}
    for e in trace:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action in ("free_requested", "free_completed") and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    return peak, sorted(at_peak.values(), key=lambda b: -b[0])


def allocation_site(frames: Sequence[dict]) -> str:
    """The innermost frame in ``salstm_kernels`` (else in torch's Python, else any), as ``name file:line``."""
    def short(f):
        return f"{f.get('name', '?')} {os.path.basename(f.get('filename', '?'))}:{f.get('line', '?')}"

    py = [f for f in frames if str(f.get("filename", "")).endswith(".py")]

    def ours(f):  # the package's own files (not a checkout directory that happens to share its name)
        path = f["filename"].replace(os.sep, "/")
        return "/salstm_kernels/" in path and "/benchmarks/" not in path and "/tests/" not in path

    for pick in (ours, lambda f: "torch" in f["filename"], lambda f: True):
        found = [f for f in py if pick(f)]
        if found:
            return short(found[0])
    return short(frames[0]) if frames else "(no frames)"


def report(blocks: Sequence[Tuple[int, list]], peak: int, unit: int, top: int = 14) -> str:
    """The peak and its largest blocks, one line each (sizes in MiB and state units)."""
    lines = [f"peak {peak / 2**20:8.1f} MiB = {peak / unit:5.1f} units  ({len(blocks)} blocks alive)"]
    for size, frames in blocks[:top]:
        lines.append(f"  {size / 2**20:8.1f} MiB {size / unit:5.2f} u  {allocation_site(frames)}")
    rest = sum(s for s, _ in blocks[top:])
    if rest:
        lines.append(f"  {rest / 2**20:8.1f} MiB {rest / unit:5.2f} u  ({len(blocks) - top} smaller blocks)")
    return "\n".join(lines)


def step_peak(module, x, gy) -> Tuple[int, List[Tuple[int, list]], int]:
    """Allocator trace of one forward+backward of ``module`` (after one untraced warm-up step):
    :func:`live_at_peak`'s result, and ``max_memory_allocated`` above the allocation before the step."""
    def step():
        for p in [x, *module.parameters()]:
            p.grad = None
        module(x).backward(gy)

    step()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    try:
        for p in [x, *module.parameters()]:
            p.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        allocated_peak = torch.cuda.max_memory_allocated() - base
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return (*live_at_peak(snap["device_traces"][x.device.index or 0]), allocated_peak)


def main(argv=None) -> int:
    import gpu_check  # same folder (the script's own directory is on sys.path)

    import salstm_kernels as sk
    from salstm_kernels import recurrence

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs="+", default=[224])
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--nhwc", action="store_true",
                    help="also the triton path with channels_last convs (the opt-in whose peak was 1.2-1.4x "
                         "the NCHW one's in bfloat16 on an H200, unexplained)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_memory.py needs CUDA (the allocator history is CUDA's)")
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    B, C, T, k = 2, 64, 2, 5
    for size in args.size:
        for dname in args.dtype:
            dtype = getattr(torch, dname)
            unit = B * C * size * size * torch.finfo(dtype).bits // 8
            for name, cls in (("SA-LSTM", sk.SALSTM2d), ("LSTM-SA", sk.LSTMSA2d)):
                ref, tri, x, gy = gpu_check.module_case(cls, device, dtype, B, C, T, k, size, size)
                impls = [("eager", ref, False), ("triton", tri, False)]
                impls += [("triton NHWC", tri, True)] if args.nhwc else []
                for impl, m, nhwc in impls:
                    kept = set(recurrence.CHANNELS_LAST_CONVS)
                    if nhwc:
                        recurrence.CHANNELS_LAST_CONVS.add(("triton", "cuda"))
                    try:
                        peak, blocks, allocated = step_peak(m, x, gy)
                    finally:
                        recurrence.CHANNELS_LAST_CONVS.clear()
                        recurrence.CHANNELS_LAST_CONVS.update(kept)
                    print(f"\n== {name} {size}x{size} {dname} {impl}: one unit = {unit / 2**20:.2f} MiB; "
                          f"max_memory_allocated {allocated / 2**20:.1f} MiB", flush=True)
                    print(report(blocks, peak, unit, args.top), flush=True)
                del m
                del ref, tri, x, gy
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
