"""Tune the Triton attention launches on the GPU at hand, then measure the modules with the result.

    PYTHONPATH=. python benchmarks/gpu_tune.py               # CUDA machine, ~8 min on an H200
    PYTHONPATH=. python benchmarks/gpu_tune.py --no-sweep    # shipped tables: parity + modules only
    PYTHONPATH=. python benchmarks/gpu_tune.py --cpu-smoke   # tiny shapes, Triton interpreter

1. **Sweep** at ``B=2, C=64, 224x224`` for float32 and bfloat16 (float16 shares bfloat16's
   setting; tensors in the layout the package's modules give the ops on that device,
   ``recurrence.CHANNELS_LAST_CONVS``), SA-LSTM and LSTM-SA, forward and backward apart: the
   single-pass kernels, the
   channel-blocked ones and the channel-blocked rows kernels with library-matmul products (the three
   ``lstm_attention.PATHS``; :data:`salstm_kernels.triton.lstm_attention.GPU_LAUNCH` /
   ``PATH_AT_CP64``) over N tile, N splits per SM and warps; ``do_bench`` median per point,
   against the compile-time heuristics and the shipped setting, which stays unless a point beats
   it by 3%.  float32 also tries "tf32x3" dot precision (``Launch.prec``; the parity step below
   then checks its accuracy); ``--sweep-dtypes float32`` sweeps float32 alone.  The resulting tables are printed as the Python literal for ``lstm_attention.py``.
2. **Parity** of the ops with those tables set (``gpu_check.op_parity``, every dtype).
3. **Modules** at 112x112 and 224x224, float32 and bfloat16, forward+backward, one row each:
   eager reference; Triton as shipped ("triton": the package's conv form and launch tables) and
   with the sweep's tables ("triton tuned"); tuned with each conv form -- channels_last (NHWC) or
   NCHW convs, one conv over ``cat(x_t, h)`` at ``t > 0`` or the input and recurrent ones apart
   (the A/B of ``recurrence.CHANNELS_LAST_CONVS`` / ``CAT_CONV_DEVICES``; the shipped form has
   its row already, "triton" / "triton tuned"); the shipped form with the conv bias added by
   PyTorch after each conv instead of folded into the fused ops ("tuned, conv bias": the A/B of
   the triton provider's ``FOLDS_BIAS``); the shipped form with the 4-gate conv and cell at ``t = 0``
   ("tuned, 4-gate t0": the A/B of ``recurrence.SKIP_FORGET_AT_ZERO_STATE``); 16-bit LSTM-SA with the
   projection dots on float32 operands ("tuned, f32 proj": the A/B of
   ``lstm_attention.WEIGHT_DOTS_16BIT``); ``torch.compile`` of the reference
   (inductor, compile time printed apart, while the run is under ``--compile-until-s``).  With
   ``--extra-ab`` also the convs alone NCHW vs channels_last, ``cudnn.benchmark`` rows and the eager
   module with channels_last weights (measured once; no gain for eager).  Columns: wall time per step
   (``do_bench``: the host's launch work included), device time of one step replayed from a CUDA
   graph (host work excluded), peak memory, the split of device time and the longest kernels
   (profiler).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import sys
import time

import gpu_check as gc  # noqa: E402  (same folder; sets TRITON_INTERPRET for --cpu-smoke)
import torch  # noqa: E402

import salstm_kernels as sk  # noqa: E402
from salstm_kernels import recurrence  # noqa: E402
from salstm_kernels.ops import providers  # noqa: E402
from salstm_kernels.testing import random_projections  # noqa: E402
from salstm_kernels.triton import lstm_attention as la  # noqa: E402

elapsed = gc.elapsed  # seconds since gpu_check was imported, i.e. since this run began


def grid(path, smoke, key=(False, False, False)):
    """The sweep's points for one path and ``(backward, gated, fp32)`` key; float32 also gets
    "tf32x3" dot precision (``Launch.prec``) where sm_90 compiles of it fit (``sm90_stats``): BN 16
    single-pass except the gated backward (378 KB of shared memory), BN 16 / 32 blocked; on the matmul
    path it sets only the sums over pixels (the rows kernels there have no dots).  The matmul path's
    rows kernels only stream, so its grid is small: their tile and warps."""
    backward, gated, fp32 = key
    x3_fits = fp32 and not (path == "single" and backward and gated)
    if smoke:
        pts = [la.Launch(16, 2, 4)] if path == "single" else [la.Launch(16, 2, 8, 16)]
        return pts + ([pts[0]._replace(prec="tf32x3")] if x3_fits else [])
    if path == "single":
        pts = [la.Launch(bn, per_sm, w) for bn, w, per_sm in itertools.product((16, 32, 64), (4, 8), (1, 2, 4))]
        x3 = [la.Launch(16, per_sm, w, prec="tf32x3") for w, per_sm in itertools.product((4, 8), (1, 2))]
        if backward and gated:  # the dW sums apart from the kernel (Launch.dw_apart)
            pts += [la.Launch(16, per_sm, w, dw_apart=True) for w, per_sm in itertools.product((4, 8), (1, 2))]
    elif path == "matmul":
        pts = [la.Launch(bn, 2, w, 64) for bn, w in itertools.product((32, 64), (4, 8))]
        x3 = [la.Launch(32, 2, 8, 64, "tf32x3")]
    else:
        pts = [la.Launch(bn, per_sm, w, red)
               for (bn, red), w, per_sm in itertools.product(((16, 64), (32, 64)), (4, 8), (2, 4))]
        x3 = [la.Launch(bn, 2, w, 64, "tf32x3") for bn, w in itertools.product((16, 32), (4, 8))]
    return pts + (x3 if x3_fits else [])


#: Pipelining depths tried beside Triton's default (``Launch.num_stages``; 3 on sm_90).  Triton 3.6
#: (the GPU machine's) compiles the float32 single-pass SA-LSTM backward at depth 2 or 3 into 32
#: registers and 3 KB of spills, at depth 1 into 80 registers and none (``sm90_stats --stages``).
SWEEP_STAGES = (1, 2)


def candidates(key, smoke):
    """``(path, launch)`` points of one key in the order the sweep times them (its budget may stop
    it early): first the shipped launch at each depth of :data:`SWEEP_STAGES`; for the LSTM-SA
    backward the single-pass launch with its dW sums apart (``Launch.dw_apart``) at 4 and 8 warps;
    then each other path's launch (its table entry, or the heuristics' one -- what ``sm90_stats --stages``
    compiles), the Triton-dots paths at depth 1, the matmul path at the depth its table entry or
    heuristics give (not yet timed on a GPU at C = 64); then each path's grid."""
    path0, _ = shipped_setting(key)

    def table_or_heuristic(path):
        return la.GPU_LAUNCH.get((path, *key)) or la.heuristic_launch(path, *key, la.TUNED_CP)

    first = [(path0, table_or_heuristic(path0)._replace(num_stages=d)) for d in SWEEP_STAGES]
    backward, gated, _ = key
    if backward and gated:  # the single-pass LSTM-SA backward with its dW sums apart, 4 and 8 warps
        single = table_or_heuristic("single")
        for warps in (single.num_warps, 8 if single.num_warps == 4 else 4):
            first.append(("single", single._replace(dw_apart=True, num_warps=warps)))
    for other in (p for p in la.PATHS if p != path0):
        launch = table_or_heuristic(other)
        first.append((other, launch if other == "matmul" else launch._replace(num_stages=1)))
    if smoke:
        first = first[:1]  # interpreter time
    rest = [(path, launch) for path in la.PATHS for launch in grid(path, smoke, key)]
    return first + [pt for pt in rest if pt not in first]


def launch_literal(launch) -> str:
    """``launch`` as ``lstm_attention.py`` writes its table entries (``prec`` and ``num_stages``
    only where they differ from their defaults)."""
    args = [repr(x) for x in launch[:4]]
    args += [repr(launch.prec)] if launch.prec else []
    args += [f"num_stages={launch.num_stages}"] if launch.num_stages else []
    args += ["dw_apart=True"] if launch.dw_apart else []
    return f"Launch({', '.join(args)})"


@contextlib.contextmanager
def setting(key, path, launch):
    """One ``(backward, gated, fp32)`` set to a path and launch, the tables restored on exit."""
    with gc.launch_tables_kept():
        apply({key: (0.0, path, launch)})
        yield


def shipped_setting(key):
    """``(path, launch or None)`` the package's tables give ``key`` (None: the heuristics)."""
    path = la.PATH_AT_CP64.get(key, "single")
    return path, la.GPU_LAUNCH.get((path, *key))


#: A new setting must beat the shipped one by this factor to replace it (run-to-run noise).
MARGIN = 0.97


def sweep(tk, device, B, C, H, W, dtypes, budget_s, smoke):
    """Returns ``{(backward, gated, fp32): (ms, path, launch or None)}``: the sweep's winner, or the
    shipped setting when no point beats it by :data:`MARGIN`; and the heuristics' timings."""
    g = torch.Generator(device=device).manual_seed(0)
    # in the layout the modules' convs give the ops on this device
    fmt = torch.channels_last if recurrence.channels_last_convs("triton", device.type) else torch.contiguous_format
    A = torch.randn(B, 4 * C, H, W, device=device, dtype=torch.float32, generator=g).contiguous(memory_format=fmt)
    c, dout, dh, dcn = (torch.randn(B, C, H, W, device=device, dtype=torch.float32, generator=g).contiguous(
        memory_format=fmt) for _ in range(4))
    scale = 1.0 / (H * W) ** 0.5
    best, heuristic = {}, {}
    # each (dtype, direction) key gets an equal share of what is left of the budget (the last ones
    # are not starved; what a key leaves unused carries over)
    keys = list(itertools.product(dtypes, (False, True), (False, True)))
    start = elapsed()
    share = max(budget_s - start, 0.0) / max(len(keys), 1)
    for n, (dtype, gated, backward) in enumerate(keys):
        deadline = start + share * (n + 1)
        A_, c_, do_, dh_, dcn_ = (t.to(dtype) for t in (A, c, dout, dh, dcn))
        proj = tuple(p.detach() for p in random_projections(C, dtype, device)) if gated else None
        P = tk.attention_forward(A_, c_, proj, scale, "linear")[3]
        if backward:
            fn = lambda: tk.attention_backward(A_, c_, proj, P, do_, dh_, dcn_, scale, "linear")  # noqa: E731
        else:
            fn = lambda: tk.attention_forward(A_, c_, proj, scale, "linear")  # noqa: E731
        key = (backward, gated, dtype == torch.float32)
        label = f"{'bwd' if backward else 'fwd'} {'LSTM-SA' if gated else 'SA-LSTM'} {gc.dname(dtype)}"
        with gc.launch_tables_kept():
            gc.set_launch_tables(({}, {}))  # no table: the single-pass path with the heuristics
            heuristic[key] = gc.bench_ms(fn, device)
        path0, launch0 = shipped_setting(key)
        shipped = (gc.bench_ms(fn, device), path0, launch0)
        results = []
        for path, launch in candidates(key, smoke):
            if elapsed() > deadline:
                break
            try:
                with setting(key, path, launch):
                    ms = gc.bench_ms(fn, device)
            except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                print(f"  {label} {path} {tuple(launch)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            results.append((ms, path, launch))
        results.sort(key=lambda r: r[0])
        best[key] = results[0] if results and results[0][0] < MARGIN * shipped[0] else shipped
        top = "; ".join(f"{p} {tuple(l)} {ms:.3f}" for ms, p, l in results[:4])
        # the pipelining-depth points apart: a single-pass one near the blocked time may still be
        # the better choice (no float32 temporaries: lower peak memory), a call the sweep leaves to you
        depth = "; ".join(f"{p} {launch_literal(l)} {ms:.3f}" for ms, p, l in results if l.num_stages)
        print(f"  {label} depth points: {depth or 'none timed'}", flush=True)
        # the ninth session's candidates apart, so their predictions can be checked even when they lose
        new = "; ".join(f"{p} {launch_literal(l)} {ms:.3f}" for ms, p, l in results if p == "matmul" or l.dw_apart)
        print(f"  {label} matmul / dw_apart points: {new or 'none timed'}", flush=True)
        verdict = "keep shipped" if best[key] is shipped else "new winner"
        print(f"{label}: heuristics {heuristic[key]:.3f} ms; shipped {shipped[0]:.3f} ({path0} "
              f"{tuple(launch0) if launch0 else 'heuristics'}); best of {len(results)}: {top}; {verdict}  "
              f"[{elapsed():.0f}s]", flush=True)
    return best, heuristic


def apply(best):
    """The package's tables with ``best`` on top: one path and at most one launch entry per key."""
    for key, (_, path, launch) in best.items():
        for p in la.PATHS:
            la.GPU_LAUNCH.pop((p, *key), None)
        if launch is not None:
            la.GPU_LAUNCH[(path, *key)] = launch
        if path == "single":
            la.PATH_AT_CP64.pop(key, None)
        else:
            la.PATH_AT_CP64[key] = path


def graph_ms(step, device, grads) -> "tuple[float, float]":
    """Median device time of ``step`` replayed from a CUDA graph (no host launch work), and the
    relative difference of the replay's input gradient from a plain step's."""
    if device.type != "cuda":
        return float("nan"), float("nan")
    import triton.testing

    for p in grads:
        p.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p in grads:  # as the timed wall steps: the captured backward allocates its gradients
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    # the replay computes what a plain step computes: compare the input gradients
    graph.replay()
    torch.cuda.synchronize()
    replayed = grads[0].grad.clone()
    del graph
    for p in grads:
        p.grad = None
    step()
    err = ((replayed - grads[0].grad).abs().max() / grads[0].grad.abs().max().clamp_min(1e-30)).item()
    for p in grads:
        p.grad = None
    return ms, err


def conv_layouts(device, sizes, dtypes, B, C, k):
    """The recurrence's convs alone, forward+backward (input, weight grads): NCHW against
    channels_last (activations and weight), with and without ``cudnn.benchmark``.  Decides whether
    the fused path should run its convs NHWC (the Triton kernels would then read that ``A``)."""
    rows = []
    kept_bm = torch.backends.cudnn.benchmark
    try:
        for (H, W), dtype, (cin, what), cl, bm in itertools.product(
                sizes, dtypes, ((C, "x or h conv Cin=C"), (2 * C, "cat conv Cin=2C")), (False, True), (False, True)):
            torch.backends.cudnn.benchmark = bm
            fmt = torch.channels_last if cl else torch.contiguous_format
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(B, cin, H, W, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)
            w = torch.randn(4 * C, cin, k, k, device=device, dtype=dtype, generator=g) / (cin * k * k) ** 0.5
            w = w.contiguous(memory_format=fmt).requires_grad_()
            x.requires_grad_()
            gy = torch.randn(B, 4 * C, H, W, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)

            def step():
                torch.nn.functional.conv2d(x, w, padding=k // 2).backward(gy)

            step()
            ms = gc.bench_ms(step, device, grad_to_none=[x, w])
            fwd = gc.bench_ms(lambda: torch.nn.functional.conv2d(x, w, padding=k // 2), device)
            rows.append(f"{H}x{W} {gc.dname(dtype):8s} {what:18s} {'NHWC' if cl else 'NCHW'} "
                        f"{'bm' if bm else '  '}  fwd {fwd:7.3f}  fwd+bwd {ms:7.3f} ms")
            print(rows[-1], flush=True)
            if not bm and (H, W) == sizes[-1] and cin == C:
                print("    top kernels, ms/step: " + "; ".join(
                    f"{n[:60]} {t:.3f}" for n, t in gc.device_time_profile(step, device)[1][:6]), flush=True)
    finally:
        torch.backends.cudnn.benchmark = kept_bm
    return rows


def modules(device, sizes, dtypes, B, C, T, k, tuned, current, compile_until_s, extra_ab):
    tk = providers.kernels("triton")
    kept = (recurrence.CHANNELS_LAST_CONVS, recurrence.CAT_CONV_DEVICES, torch.backends.cudnn.benchmark,
            tk.FOLDS_BIAS, recurrence.SKIP_FORGET_AT_ZERO_STATE, la.WEIGHT_DOTS_16BIT)
    # the conv form the package ships on this device, read once: the rows below change the sets
    shipped_convs = (recurrence.channels_last_convs("triton", device.type), device.type in kept[1])
    with gc.launch_tables_kept():
        try:
            return _modules(device, sizes, dtypes, B, C, T, k, tuned, current, compile_until_s, extra_ab,
                            shipped_convs)
        finally:  # the package's state as found, whatever failed
            (recurrence.CHANNELS_LAST_CONVS, recurrence.CAT_CONV_DEVICES, torch.backends.cudnn.benchmark,
             tk.FOLDS_BIAS, recurrence.SKIP_FORGET_AT_ZERO_STATE, la.WEIGHT_DOTS_16BIT) = kept


def _modules(device, sizes, dtypes, B, C, T, k, tuned, current, compile_until_s, extra_ab, shipped_convs):
    tk = providers.kernels("triton")
    # the shipped settings the A/B rows flip (read before any row changes them)
    shipped_skip, shipped_w16 = recurrence.SKIP_FORGET_AT_ZERO_STATE, la.WEIGHT_DOTS_16BIT
    rows = []
    nan = float("nan")
    for (H, W), dtype, (label, factory) in itertools.product(
            sizes, dtypes, (("SA-LSTM", sk.SALSTM2d), ("LSTM-SA", sk.LSTMSA2d))):
        case = f"{label} {H}x{W} {gc.dname(dtype)}"
        m_ref, m_tri, x, gy = gc.module_case(factory, device, dtype, B, C, T, k, H, W)
        eager = None
        # (name, module, launch tables, convs: (channels_last, one conv over cat(x_t, h) at t > 0),
        #  cudnn.benchmark, conv bias folded into the fused ops).  "triton" is the package as
        #  shipped, "triton tuned" the same with the sweep's tables; then the other conv forms with
        #  the tuned tables, and the shipped form with the bias added by PyTorch after each conv.
        impls = [("eager", m_ref, None, None, False, None), ("triton", m_tri, current, shipped_convs, False, True)]
        if tuned != current:
            impls.append(("triton tuned", m_tri, tuned, shipped_convs, False, True))
        impls += [(f"tuned {'NHWC' if cl else 'NCHW'} {'cat' if cat else 'split'}", m_tri, tuned, (cl, cat), False, True)
                  for cl, cat in ((True, True), (False, True), (False, False)) if (cl, cat) != shipped_convs]
        impls.append(("tuned, conv bias", m_tri, tuned, shipped_convs, False, False))
        impls.append(("tuned, 4-gate t0", m_tri, tuned, shipped_convs, False, True))
        if label == "LSTM-SA" and dtype != torch.float32:  # the A/B of la.WEIGHT_DOTS_16BIT
            impls.append(("tuned, f32 proj", m_tri, tuned, shipped_convs, False, True))
        if extra_ab:
            # the eager module with channels_last conv weights: its convs then run NHWC (cuDNN
            # follows the weight's layout), the layout a user would try first for tensor-core convs
            m_cl = copy.deepcopy(m_ref).to(memory_format=torch.channels_last)
            impls += [("eager, cudnn.bm", m_ref, None, None, True, None),
                      ("tuned, cudnn.bm", m_tri, tuned, shipped_convs, True, True),
                      ("eager, ch_last", m_cl, None, None, False, None)]
        if compile_until_s is not None and elapsed() < compile_until_s:
            torch._dynamo.reset()
            impls.append(("compile", torch.compile(m_ref), None, None, False, None))
        for impl, m, state, convs, cudnn_bm, fold in impls:
            # t = 0 from the zero state: gate rows i, o, g only (shipped), or all four (the A/B row)
            recurrence.SKIP_FORGET_AT_ZERO_STATE = shipped_skip != (impl == "tuned, 4-gate t0")
            # 16-bit LSTM-SA: projection dots on the 16-bit weights (shipped) or float32 operands
            la.WEIGHT_DOTS_16BIT = shipped_w16 != (impl == "tuned, f32 proj")
            if fold is not None:  # the conv bias folded into the fused ops (FOLDS_BIAS) or added by PyTorch
                tk.FOLDS_BIAS = fold
            if state is not None:
                gc.set_launch_tables(state)
            if convs is not None:
                channels_last, cat_conv = convs
                recurrence.CHANNELS_LAST_CONVS = {("triton", device.type)} if channels_last else set()
                recurrence.CAT_CONV_DEVICES = {device.type} if cat_conv else set()
            # cuDNN's own algorithm search for the convs (off by default in PyTorch)
            torch.backends.cudnn.benchmark = cudnn_bm
            grads = [x, *m.parameters()]
            step = gc._module_step(m, x, gy)
            try:
                t = time.perf_counter()
                step()
                step()  # a second call can recompile (torch.compile); keep it out of the timing
                gc.sync(device)
                if impl == "compile":
                    print(f"  {case} compile time {time.perf_counter() - t:.1f} s", flush=True)
                ms, mem = gc._time_and_peak(step, device, grads)
                try:
                    gms, gerr = graph_ms(step, device, grads)
                    if device.type == "cuda" and not gerr <= 1e-5:  # a replay must match a plain step (NaN too)
                        print(f"  {case} {impl}: CUDA graph replay differs from a plain step: dx rel err {gerr:.2e}",
                              flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"  {case} {impl}: CUDA graph failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    gms, gerr = float("nan"), float("nan")
                split, kernels, top_ops = gc.device_time_profile(step, device)
                for p in grads:
                    p.grad = None
            except Exception as e:  # noqa: BLE001
                rows.append(f"{case:26s} {impl:15s} ERROR {type(e).__name__}: {str(e)[:100]}")
                print(rows[-1], flush=True)
                if impl == "eager":
                    eager = (nan, nan, nan)  # no baseline: the ratios print as nan, not against another row
                continue
            if impl == "eager":
                eager = (ms, gms, mem)
            rows.append(f"{case:26s} {impl:15s} {ms:8.3f} {eager[0] / ms:6.2f}x {gms:8.3f} {eager[1] / gms:6.2f}x "
                        f"{mem:8.0f} {mem / eager[2]:5.2f}x  {split}")
            print(rows[-1], flush=True)
            if kernels:
                print("    top kernels, ms/step: " + "; ".join(f"{n[:60]} {t:.3f}" for n, t in kernels[:8]), flush=True)
                print("    top operators, device ms/step (children included): "
                      + "; ".join(f"{n[:50]} {t:.3f}" for n, t in top_ops[:12]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--sweep-budget-s", type=float, default=240.0,
                    help="stop sweeping new points this many seconds into the run (an equal share per key)")
    ap.add_argument("--sweep-dtypes", default="float32,bfloat16",
                    help="dtypes the sweep tunes (float32 includes the tf32x3 candidates)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="no launch sweep: parity and the modules with the shipped tables only")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    ap.add_argument("--compile-until-s", type=float, default=420.0,
                    help="no new torch.compile rows after this many seconds of the run")
    ap.add_argument("--extra-ab", action="store_true",
                    help="also the convs alone NCHW vs channels_last, cudnn.benchmark rows and the eager "
                         "module with channels_last weights (measured once: benchmarks/RESULTS.md)")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke")
        return 2
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}", flush=True)
    tk = providers.kernels("triton")
    current = gc.launch_tables()  # the package's launch tables as shipped
    if args.cpu_smoke:
        B, C, T, k, sweep_shape, sizes = 1, 40, 2, 3, (6, 5), ((6, 5),)
    else:
        B, C, T, k, sweep_shape, sizes = 2, 64, 2, 5, (224, 224), ((112, 112), (224, 224))
    dtypes = (torch.float32, torch.bfloat16)
    print("== sweep: attention op alone, ms (do_bench median), path (BN, splits/SM, warps, BN_red) ==", flush=True)
    sweep_dtypes = tuple(getattr(torch, d.strip()) for d in args.sweep_dtypes.split(",") if d.strip())
    best, heuristic = ({}, {}) if args.no_sweep else sweep(tk, device, B, C, *sweep_shape, sweep_dtypes,
                                                           args.sweep_budget_s, args.cpu_smoke)
    apply(best)
    tuned = gc.launch_tables()
    print("GPU_LAUNCH = {")
    for (path, bwd, gated, fp32), launch in sorted(tuned[0].items()):
        ms = best[(bwd, gated, fp32)][0] if (bwd, gated, fp32) in best else float("nan")
        print(f"    ({path!r}, {bwd}, {gated}, {fp32}): {launch_literal(launch)},  "
              f"# {ms:.3f} ms, was {heuristic.get((bwd, gated, fp32), float('nan')):.3f}")
    print("}")
    print(f"PATH_AT_CP64 = {dict(sorted(tuned[1].items()))}", flush=True)
    log = gc.ParityLog()
    shape = (1, 40, 6, 5) if args.cpu_smoke else (2, 64, 37, 41)
    for dtype in gc.DTYPES:
        for fmt in (torch.contiguous_format, torch.channels_last):
            gc.op_parity(log, tk, device, shape, dtype, gc.COMBOS, fmt=fmt)
    print(f"parity with the tuned launches: {log.n_pass} PASS, {len(log.failures)} FAIL  [{elapsed():.0f}s]",
          flush=True)
    print("== modules fwd+bwd: wall ms (do_bench), vs eager, graph-replay ms, vs eager, peak MiB, vs eager ==",
          flush=True)
    conv_rows = []
    if args.extra_ab:
        print("== convs alone: NCHW vs channels_last, cudnn.benchmark off / on ==", flush=True)
        conv_rows = conv_layouts(device, sizes, dtypes, B, C, k)
    rows = modules(device, sizes, dtypes, B, C, T, k, tuned, current,
                   None if args.no_compile else args.compile_until_s, args.extra_ab)
    print()
    print("=" * 100)
    print(f"SUMMARY B={B} Cin=C={C} T={T} k={k}; columns: case, impl, wall ms, vs eager, graph ms, vs eager, "
          "peak MiB, vs eager, device-time split")
    print("\n".join(conv_rows))
    print("\n".join(rows))
    return gc.parity_verdict(log)


if __name__ == "__main__":
    sys.exit(main())
