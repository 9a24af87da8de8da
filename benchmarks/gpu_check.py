"""One-shot GPU check of the Triton backend: parity first, then speed and memory.

    PYTHONPATH=. python benchmarks/gpu_check.py              # CUDA machine (< 8 min on an H100)
    PYTHONPATH=. python benchmarks/gpu_check.py --skip-bench # parity only: allow 6 min (the
                                                             # channels_last rows' compiles; a
                                                             # 240 s limit cut it short once)
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu-smoke  # tiny shapes, Triton interpreter, CPU
    PYTHONPATH=. python benchmarks/gpu_check.py --wide-only  # C > 64 only: parity and the non-conv
                                                             # rows with both product paths (~2 min)

1. **Parity** (exit status 1 if any row fails): every Triton op (cell forward/backward, the cell
   from a zero state with its bias gradient, attention
   forward/backward for SA-LSTM linear/nonlinear, LSTM-SA linear/nonlinear, separated "none") and
   every module (:data:`salstm_kernels.verify.DESIGNS`) in float32, bfloat16 and float16, forward
   and all gradients, against the float64 reference (``salstm_kernels.reference``) on the same
   rounded inputs, with the tolerance table of :mod:`salstm_kernels.testing`; the ops also with
   channels_last tensors (``NHWC`` rows).  One line per row:
   ``PASS``/``FAIL``, worst tensor, scaled error / tolerance.
2. **Speed** at ``B=2, Cin=C=64, T=2, k=5``, ``112x112`` and ``224x224``, float32 and bfloat16:
   SA-LSTM and LSTM-SA module forward+backward as eager reference (``backend="reference"``),
   ``torch.compile`` of it (compile time excluded from the timing, reported apart) and
   ``backend="triton"`` (``triton.testing.do_bench``, median); peak training memory (CUDA
   ``max_memory_allocated`` above the pre-call allocation) against eager; and the fused non-conv
   part alone (``lstm_attention`` forward+backward of the last step, and ``lstm_cell``
   forward+backward) with achieved GB/s for the bytes it must move against a measured device copy
   bandwidth (at ``C = 64`` also each of ``lstm_attention.PATHS`` forced, the A/B of
   ``PATH_AT_CP64``); the non-conv rows also run at ``C = 128, 256`` (channel-blocked kernels; the note
   column says which attention kernels ran, and a row forces the other products path: Triton dots
   or library matmuls, ``MATMUL_PRODUCTS_MIN_C``).  Parity includes ``C = 96, 128, 130`` shapes
   (channel-blocked, Triton dots but for 130) and ``C = 256`` (matmul products).
   The summary table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
import traceback

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported anywhere

import torch  # noqa: E402

import salstm_kernels as sk  # noqa: E402
from salstm_kernels import ops, recurrence, reference  # noqa: E402
from salstm_kernels.ops import providers  # noqa: E402
from salstm_kernels.testing import nan_allocations, random_projections, scaled_error, tolerance  # noqa: E402
from salstm_kernels.verify import DESIGNS, module_runner, parity, same_dtype_allowance  # noqa: E402

if SMOKE:
    from salstm_kernels.testing import patch_triton_interpreter_once  # noqa: E402

    patch_triton_interpreter_once()  # interpreter time only

COMBOS = (("linear", False), ("nonlinear", False), ("linear", True), ("nonlinear", True), ("none", True))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def combo_name(comb, gated) -> str:
    return {("linear", False): "SA-LSTM/linear", ("nonlinear", False): "SA-LSTM/nonlinear",
            ("linear", True): "LSTM-SA/linear", ("nonlinear", True): "LSTM-SA/nonlinear",
            ("none", True): "LSTM-then-SA"}[(comb, gated)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# 1. parity
# ------------------------------------------------------------------------------------------------
class ParityLog:
    def __init__(self):
        self.n_pass = 0
        self.failures = []

    def row(self, label, dtype, errs, error=None):
        """``errs``: list of ``(name, err, backward)`` or ``(name, err, backward, allowed)``: a tolerance
        widened by the same-dtype reference's own error (``verify.same_dtype_allowance``), marked ``*``."""
        if error is not None:
            ok, text = False, f"error: {error}"
        else:
            allowed = lambda e: e[3] if len(e) > 3 else tolerance(dtype, e[2])  # noqa: E731
            worst = max(errs, key=lambda e: e[1] / allowed(e))
            name, err = worst[0], worst[1]
            ok = all(e[1] <= allowed(e) for e in errs)
            fwd = max((e[1] for e in errs if not e[2]), default=0.0)
            bwd_e = max((e[1] for e in errs if e[2]), default=0.0)
            widened = "*" if len(worst) > 3 and worst[3] > tolerance(dtype, worst[2]) else ""
            text = (f"fwd {fwd:.2e}/{tolerance(dtype):.0e}  bwd {bwd_e:.2e}/{tolerance(dtype, True):.0e}"
                    f"  worst {name} ({err / allowed(worst):.2f} of tol{widened})")
        status = "PASS" if ok else "FAIL"
        line = f"{status}  {label:<58} {dname(dtype):<9} {text}"
        print(line, flush=True)
        if ok:
            self.n_pass += 1
        else:
            self.failures.append(line)


def _leaf64(t):
    return t.detach().double().requires_grad_(True)


def op_parity(log: ParityLog, tk, device, shape, dtype, combos, seed=0, fmt=torch.contiguous_format, path=""):
    """Every op on ``shape`` against autograd of the float64 spec; ``fmt`` channels_last: all
    tensors NHWC (what channels_last convs write; the Triton path's opt-in conv layout on CUDA),
    outputs checked to keep it.  ``path``: appended to the labels (a forced attention path)."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, scale=1.0):
        t = (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device, dtype)
        return t.contiguous(memory_format=fmt)

    A, c = rnd(B, 4 * C, H, W, scale=2.0), rnd(B, C, H, W)
    dout, dh, dcn = rnd(B, C, H, W), rnd(B, C, H, W), rnd(B, C, H, W)
    nhwc = fmt == torch.channels_last
    tag = (" NHWC" if nhwc else "") + path

    def layout_kept(*ts):
        if not all(t.is_contiguous(memory_format=fmt) for t in ts):
            raise AssertionError(f"outputs not in the inputs' layout ({fmt})")

    label = f"op cell B{B} C{C} {H}x{W}{tag}"
    try:
        h, c1 = tk.cell_forward(A, c)
        dA, dc = tk.cell_backward(A, c, dh, dcn)
        layout_kept(h, c1, dA, dc)
        A64, c64 = _leaf64(A), _leaf64(c)
        hr, cr = reference.lstm_cell_ref(A64, c64)
        gr = torch.autograd.grad([hr, cr], [A64, c64], [dh.double(), dcn.double()])
        log.row(label, dtype, [("h", scaled_error(h, hr), False), ("c'", scaled_error(c1, cr), False),
                               ("dA", scaled_error(dA, gr[0]), True), ("dc", scaled_error(dc, gr[1]), True)])
    except Exception as e:  # noqa: BLE001
        log.row(label, dtype, [], error=f"{type(e).__name__}: {e}"[:200])
    label = f"op cell from zero state +bias B{B} C{C} {H}x{W}{tag}"
    try:  # A holds rows i, o, g; the spec is the 4-gate cell with any f row and c = 0
        A3 = A[:, [*range(C), *range(2 * C, 4 * C)]].contiguous(memory_format=fmt)
        g_bias = torch.Generator().manual_seed(seed + 1)  # not g: the rows below keep their inputs
        bias = torch.randn(3 * C, generator=g_bias, dtype=torch.float64).to(device, dtype)
        h, c1 = tk.cell_zero_state_forward(A3, bias)
        dA3, dbias = tk.cell_zero_state_backward(A3, dh, dcn, bias)
        layout_kept(h, c1, dA3)
        A64, b64 = _leaf64(A3), _leaf64(bias)
        Ab = A64 + b64.view(1, -1, 1, 1)
        A4 = torch.cat([Ab[:, :C], A[:, C:2 * C].double(), Ab[:, C:]], dim=1)
        hr, cr = reference.lstm_cell_ref(A4, torch.zeros_like(c, dtype=torch.float64))
        gr = torch.autograd.grad([hr, cr], [A64, b64], [dh.double(), dcn.double()])
        log.row(label, dtype, [("h", scaled_error(h, hr), False), ("c'", scaled_error(c1, cr), False),
                               ("dA", scaled_error(dA3, gr[0]), True), ("dbias", scaled_error(dbias, gr[1]), True)])
    except Exception as e:  # noqa: BLE001
        log.row(label, dtype, [], error=f"{type(e).__name__}: {e}"[:200])
    scale = 1.0 / math.sqrt(H * W)
    for comb, gated in combos:
        label = f"op attention {combo_name(comb, gated)} B{B} C{C} {H}x{W}{tag}"
        try:
            proj = tuple(p.detach() for p in random_projections(C, dtype, device, generator=g)) if gated else None
            out, h, c1, P = tk.attention_forward(A, c, proj, scale, comb)
            dA, dc, dproj = tk.attention_backward(A, c, proj, P, dout, dh, dcn, scale, comb)
            layout_kept(out, h, c1, dA, dc)
            refs64 = _attention_spec(A, c, proj, scale, comb, (dout, dh, dcn), torch.float64)
            names = ["out", "h", "c'", "dA", "dc"] + (["dWq", "dbq", "dWk", "dbk", "dWv", "dbv"] if gated else [])
            got = [out, h, c1, dA, dc] + (list(dproj) if gated else [])
            errs = [(n, scaled_error(x, r), i >= 3) for i, (n, x, r) in enumerate(zip(names, got, refs64))]
            if any(e > tolerance(dtype, b) for _, e, b in errs):
                errs = _with_same_dtype_allowance(errs, dtype, A, c, proj, scale, comb, (dout, dh, dcn), refs64)
            log.row(label, dtype, errs)
        except Exception as e:  # noqa: BLE001
            log.row(label, dtype, [], error=f"{type(e).__name__}: {e}"[:200])


def _attention_spec(A, c, proj, scale, comb, upstream, dtype):
    """The spec (autograd of ``reference.lstm_attention_ref``) run in ``dtype`` on these inputs and
    upstream gradients ``(dout, dh, dc')``: ``[out, h', c', dA, dc, *dproj]``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (A, c, *(proj or ()))]
    outs = list(reference.lstm_attention_ref(leaves[0], leaves[1], scale, comb, tuple(leaves[2:]) or None))
    return outs + list(torch.autograd.grad(outs, leaves, [u.to(dtype) for u in upstream]))


def _with_same_dtype_allowance(errs, dtype, A, c, proj, scale, comb, upstream, refs64):
    """``errs`` with each tensor's tolerance widened by the error of the spec run in ``dtype`` itself
    (:func:`_attention_spec`), by ``verify.same_dtype_allowance`` (twice it, capped), as ``verify``
    does: an ill-conditioned tensor that PyTorch in the same dtype misses as much is not a kernel
    error.  ``refs64``: the float64 spec, in ``errs``' order."""
    same = _attention_spec(A, c, proj, scale, comb, upstream, dtype)
    return [(n, e, b, same_dtype_allowance(tolerance(dtype, b), scaled_error(x, r)))
            for (n, e, b), x, r in zip(errs, same, refs64)]


def module_parity(log: ParityLog, device, design, cin, hidden, T, H, W, dtype, with_state, seed=0, nhwc=False):
    """One module against the float64 reference; ``nhwc``: with channels_last convs (the Triton
    path's opt-in, ``recurrence.CHANNELS_LAST_CONVS``) instead of the shipped layout."""
    label = (f"module {design} B2 T{T} Cin{cin} C{'x'.join(map(str, hidden))} {H}x{W}" + (" state" if with_state else "")
             + (" NHWC convs" if nhwc else ""))
    kept = recurrence.CHANNELS_LAST_CONVS
    if nhwc:
        recurrence.CHANNELS_LAST_CONVS = kept | {("triton", device.type)}
    try:
        torch.manual_seed(seed)
        m = DESIGNS[design](cin, list(hidden), 3, "triton").to(device=device, dtype=dtype)
        x = torch.randn(2, T, cin, H, W, device=device).to(dtype)
        state = None
        if with_state:
            state = [(torch.randn(2, C, H, W, device=device).to(dtype), torch.randn(2, C, H, W, device=device).to(dtype))
                     for C in hidden]
        res = parity(module_runner(m), m, x, state, seed=seed)
        if res.error:
            log.row(label, dtype, [], error=res.error)
        else:
            # verify.parity's tolerances: widened where the same-dtype reference misses as much
            log.row(label, dtype, [(res.fwd_worst, res.fwd_err, False, res.fwd_tol),
                                   (res.bwd_worst, res.bwd_err, True, res.bwd_tol)])
    except Exception as e:  # noqa: BLE001
        log.row(label, dtype, [], error=f"{type(e).__name__}: {e}"[:200])
    finally:
        recurrence.CHANNELS_LAST_CONVS = kept


def autocast_parity(log: ParityLog, device, design, amp_dtype, seed=0):
    """float32 module under ``torch.autocast``: triton vs reference under the same autocast.

    Parameter gradients must stay float32; the output within ``amp_dtype``'s tolerance."""
    label = f"autocast module {design} B2 T2 Cin8 C24 13x11"
    try:
        torch.manual_seed(seed)
        ref_m = DESIGNS[design](8, [24], 3, "reference").to(device)
        tri_m = DESIGNS[design](8, [24], 3, "triton").to(device)
        tri_m.load_state_dict(ref_m.state_dict())
        x = torch.randn(2, 2, 8, 13, 11, device=device)
        errs = []
        outs, grads = [], []
        for m in (tri_m, ref_m):
            xi = x.clone().requires_grad_(True)
            with torch.autocast(device.type, dtype=amp_dtype):
                y = m(xi)
            outs.append(y)
            gy = torch.ones_like(y) / y.numel() ** 0.5
            grads.append(torch.autograd.grad(y, [xi, *m.parameters()], gy))
        errs.append(("out", scaled_error(outs[0].float(), outs[1].float()), False))
        names = ["x"] + [n for n, _ in tri_m.named_parameters()]
        for n, a, b in zip(names, grads[0], grads[1]):
            if a.dtype != b.dtype:
                raise TypeError(f"grad of {n} is {a.dtype}, reference gives {b.dtype}")
            errs.append((n, scaled_error(a, b), True))
        log.row(label, amp_dtype, errs)
    except Exception as e:  # noqa: BLE001
        log.row(label, amp_dtype, [], error=f"{type(e).__name__}: {e}"[:200])


def bias_grad_err(dbias, dA, prefix=""):
    """The kernels' bias gradient (per-tile / per-plane sums taken as they write ``dA``) against
    ``dA`` as written, summed by torch: every partial row, at every offset, written and added."""
    return (prefix + "dbias", scaled_error(dbias, dA.sum(dim=(0, 2, 3), dtype=torch.float32)), True)


def offsets_64bit(log: ParityLog, tk, device, fmt=torch.contiguous_format, B=2, H=2049, W=2049, backward=False):
    """``B * 4C * N > 2^31`` elements, float16, C = 64, with a conv bias folded in (as the modules
    run), the last image checked against the reference kernels (float32) on ``A + bias``.  B = 2,
    2049x2049: the second image lies past 2^31 (batch offsets).  B = 1, 2900x2900: offsets *within*
    one image pass 2^31.  B = 1, 3400x3400: in NCHW also the gate stride ``3 C N`` (the kernels'
    64-bit-stride variant, ``LAYOUT = 2``)."""
    C = 64
    label = (f"op 64-bit offsets B{B} C{C} {H}x{W} (B*4C*N={B * 4 * C * H * W:.2e})"
             + (" NHWC" if fmt == torch.channels_last else "") + (" fwd+bwd" if backward else ""))
    need_gib = 24 if not backward else (64 if H * W < 3345 ** 2 else 96)
    if device.type == "cuda" and torch.cuda.mem_get_info()[0] < need_gib * 2**30:
        print(f"SKIP  {label}: needs ~{need_gib} GiB free")
        return
    try:
        from salstm_kernels.ops import reference_kernels as rk

        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape):
            return torch.randn(*shape, device=device, dtype=torch.float16, generator=g).contiguous(memory_format=fmt)

        A, c = rnd(B, 4 * C, H, W), rnd(B, C, H, W)
        # the conv bias, folded in as the modules launch the kernels (HAS_BIAS); the reference adds it
        bias = torch.randn(4 * C, device=device, dtype=torch.float16, generator=g)
        biased = lambda a, b=bias: a.float() + b.float().view(1, -1, 1, 1)  # noqa: E731
        last = lambda *ts: [t[-1:].float() for t in ts]  # noqa: E731  (the reference in float32)

        def tail(t):
            """The last image's last 8 pixel rows of every channel: the highest offsets of each
            channel (both layouts) and of each gate.  The errors are computed there only: the
            float64 copies and mask indices of whole 3e9-element tensors ran out of memory."""
            return t[-1:, :, -8:, :] if t.dim() == 4 else t[-1:]

        def err(x, r):
            return scaled_error(tail(x), tail(r))

        scale = 1.0 / (H * W)
        out, h, c1, P = tk.attention_forward(A, c, None, scale, "linear", bias=bias)
        ref = rk.attention_forward(biased(A[-1:]), *last(c), None, scale, "linear")
        errs = [(n, err(x, r), False) for n, x, r in zip(("out", "h", "c'", "P"), (out, h, c1, P), ref)]
        del out, h, c1, ref
        if backward:
            dout, dh, dcn = rnd(B, C, H, W), rnd(B, C, H, W), rnd(B, C, H, W)
            with nan_allocations():  # an unwritten partial row or dA element: NaN, a FAIL
                dA, dc, _, dbias = tk.attention_backward(A, c, None, P, dout, dh, dcn, scale, "linear", bias=bias)
            rdA, rdc, _ = rk.attention_backward(biased(A[-1:]), *last(c), None, P[-1:], *last(dout, dh, dcn), scale,
                                                "linear")
            errs += [("dA", err(dA, rdA), True), ("dc", err(dc, rdc), True), bias_grad_err(dbias, dA)]
            del dA, dc, rdA, rdc, dout
        del P
        # the cell is pointwise: its reference runs on the compared rows alone
        h, c1 = tk.cell_forward(A, c, bias=bias)
        hr, cr = rk.cell_forward(biased(tail(A)), tail(c).float())
        errs += [("cell h", err(h, hr), False), ("cell c'", err(c1, cr), False)]
        del h, c1, hr, cr
        if backward:
            with nan_allocations():
                dA, dc, dbias = tk.cell_backward(A, c, dh, dcn, bias=bias)
            rdA, rdc = rk.cell_backward(biased(tail(A)), *(tail(t).float() for t in (c, dh, dcn)))
            errs += [("cell dA", err(dA, rdA), True), ("cell dc", err(dc, rdc), True),
                     bias_grad_err(dbias, dA, "cell ")]
            del dA, dc, rdA, rdc
        # the cell from a zero state: A's last 3C rows stand for rows i, o, g (3-gate strides and
        # partial rows at the same offsets; a copy where the slice is not dense in the layout)
        A3, bias3 = A[:, C:], bias[C:]
        h, c1 = tk.cell_zero_state_forward(A3, bias=bias3)
        hr, cr = rk.cell_zero_state_forward(biased(tail(A3), bias3))
        errs += [("zero-state h", err(h, hr), False), ("zero-state c'", err(c1, cr), False)]
        del h, c1, hr, cr
        if backward:
            with nan_allocations():
                dA3, dbias3 = tk.cell_zero_state_backward(A3, dh, dcn, bias=bias3)
            (rdA3,) = rk.cell_zero_state_backward(biased(tail(A3), bias3), tail(dh).float(), tail(dcn).float())
            errs += [("zero-state dA", err(dA3, rdA3), True), bias_grad_err(dbias3, dA3, "zero-state ")]
        log.row(label, torch.float16, errs)
    except Exception as e:  # noqa: BLE001
        log.row(label, torch.float16, [], error=f"{type(e).__name__}: {e}"[:200])
    finally:
        torch.cuda.empty_cache()


def wide_op_cases(smoke: bool):
    """Op parity cases at C > 64 (the channel-blocked paths): ``(shape, dtypes, combos[, fmt])``."""
    if smoke:
        return [((1, 72, 5, 3), (torch.float32,), (("linear", True), ("nonlinear", False))),
                ((1, 72, 5, 3), (torch.float32,), (("linear", False),), torch.channels_last)]
    linear_only = (("linear", False), ("linear", True))
    return [((2, 128, 17, 15), (torch.float32, torch.bfloat16), COMBOS),
            ((1, 130, 9, 7), (torch.float16,), COMBOS),
            ((2, 256, 9, 7), (torch.float32, torch.bfloat16), linear_only),
            ((2, 128, 17, 15), (torch.float32, torch.bfloat16), linear_only, torch.channels_last)]


def run_parity(device, smoke: bool, only_64bit: bool = False, wide_only: bool = False) -> ParityLog:
    tk = providers.kernels("triton")
    log = ParityLog()
    print("== parity vs float64 reference (scaled error / tolerance) ==", flush=True)
    if wide_only:  # every products variant the bench times, at every wide case
        wide = wide_op_cases(smoke)
        variants = ((" triton-dots", forced_products(False), wide),
                    (" matmul-products", forced_products(True), wide),
                    (" matmul-products bmm-sums", forced_products(True, split_n=False), wide[-2:]),
                    # the matmul path forced at padded C = 64
                    (" matmul path", forced_path("matmul"),
                     [((2, 40, 9, 7), (torch.float32,) if smoke else (torch.float32, torch.bfloat16), COMBOS)]))
        for path, forced, cases in variants:
            with forced:
                for shape, dtypes, combos, *fmt in cases:
                    for dt in dtypes:
                        op_parity(log, tk, device, shape, dt, combos, fmt=fmt[0] if fmt else torch.contiguous_format,
                                  path=path)
        print(f"parity: {log.n_pass} PASS, {len(log.failures)} FAIL  ({elapsed():.0f}s)", flush=True)
        return log
    if only_64bit:
        if device.type == "cuda":
            _offset_cases(log, tk, device)
        print(f"parity: {log.n_pass} PASS, {len(log.failures)} FAIL  ({elapsed():.0f}s)", flush=True)
        return log
    if smoke:
        op_cases = [((1, 8, 5, 3), DTYPES, COMBOS), ((1, 72, 5, 3), (torch.float32,), (("linear", True),)),
                    ((1, 8, 5, 3), (torch.float32,), COMBOS, torch.channels_last),
                    ((1, 72, 5, 3), (torch.float32,), (("linear", False),), torch.channels_last)]
        mod_cases = [(d, 3, (8,), 2, 5, 3, dt, True) for d in DESIGNS for dt in (torch.float32,)]
        mod_cases += [("LSTMSA2d(linear)", 3, (8,), 1, 5, 3, torch.bfloat16, False)]
        mod_cases += [("SALSTM2d(linear)", 3, (8,), 2, 5, 3, torch.float32, True, True)]
    else:
        linear_only = (("linear", False), ("linear", True))
        op_cases = [
            ((2, 24, 13, 11), (torch.float32, torch.bfloat16), COMBOS),
            ((2, 24, 13, 11), (torch.float16,), linear_only),
            ((2, 64, 33, 31), (torch.float32,), linear_only),  # odd N at the benchmark's C
            ((2, 64, 32, 32), (torch.bfloat16, torch.float16), linear_only),
            # C > 64: the channel-blocked kernels (attention_blocked.py)
            ((2, 128, 17, 15), (torch.float32, torch.bfloat16), COMBOS),
            ((1, 96, 13, 11), (torch.float16,), linear_only),
            ((1, 130, 9, 7), (torch.float32,), (("nonlinear", True),)),
            # C >= MATMUL_PRODUCTS_MIN_C: the products as library matmuls (attention_matmul.py)
            ((2, 256, 9, 7), (torch.float32, torch.bfloat16, torch.float16), COMBOS),
            # channels_last (NHWC): what channels_last convs write (opt-in for the Triton path on CUDA)
            ((2, 64, 33, 31), (torch.float32, torch.bfloat16), COMBOS, torch.channels_last),
            ((2, 24, 13, 11), (torch.float16,), linear_only, torch.channels_last),
            ((2, 128, 17, 15), (torch.float32, torch.bfloat16), linear_only, torch.channels_last),
        ]
        mod_cases = []
        for dt in (torch.float32, torch.bfloat16):
            mod_cases += [(d, 5, (24,), 2, 13, 11, dt, False) for d in DESIGNS]
            mod_cases += [(d, 4, (16, 24), 3, 9, 7, dt, True) for d in ("SALSTM2d(linear)", "LSTMSA2d(linear)")]
        mod_cases += [(d, 5, (24,), 2, 13, 11, torch.float16, True) for d in ("SALSTM2d(linear)", "LSTMSA2d(linear)")]
        # channels_last convs: run 4's three float32 failures here were TF32-sized (verify now turns
        # cuDNN TF32 off for the backend); these rows test that with the NHWC kernels end to end
        mod_cases += [(d, 5, (24,), 2, 13, 11, dt, False, True) for dt in (torch.float32, torch.bfloat16)
                      for d in ("SALSTM2d(linear)", "LSTMSA2d(linear)")]
    for shape, dtypes, combos, *fmt in op_cases:
        for dt in dtypes:
            op_parity(log, tk, device, shape, dt, combos, fmt=fmt[0] if fmt else torch.contiguous_format)
    for design, cin, hidden, T, H, W, dt, st, *nhwc in mod_cases:
        module_parity(log, device, design, cin, hidden, T, H, W, dt, st, nhwc=bool(nhwc and nhwc[0]))
    if device.type == "cuda":
        for amp_dtype in (torch.bfloat16, torch.float16):
            for design in ("SALSTM2d(linear)", "LSTMSA2d(linear)"):
                autocast_parity(log, device, design, amp_dtype)
        _offset_cases(log, tk, device)
    else:  # the offset cases' harness (bias gradients included) on tiny tensors: it runs on a GPU once
        for fmt in (torch.contiguous_format, torch.channels_last):
            offsets_64bit(log, tk, device, fmt, B=1, H=9, W=7, backward=True)
    print(f"parity: {log.n_pass} PASS, {len(log.failures)} FAIL  ({elapsed():.0f}s)", flush=True)
    return log


def _offset_cases(log: ParityLog, tk, device):
    for fmt in (torch.contiguous_format, torch.channels_last):
        offsets_64bit(log, tk, device, fmt)
        offsets_64bit(log, tk, device, fmt, B=1, H=2900, W=2900, backward=True)
        offsets_64bit(log, tk, device, fmt, B=1, H=3400, W=3400, backward=True)


# ------------------------------------------------------------------------------------------------
# 2. speed and memory
# ------------------------------------------------------------------------------------------------
def bench_ms(fn, device, grad_to_none=None) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()  # CPU smoke: a rough timing only
    t = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t) / 2 * 1e3


def peak_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(device) -> float:
    """Device copy bandwidth (read + write bytes / time) of a large tensor copy."""
    n = (256 * 2**20 if device.type == "cuda" else 2**20) // 4
    src = torch.empty(n, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


class Table:
    def __init__(self):
        self.rows = []

    def add(self, **kw):
        self.rows.append(kw)
        print("  " + "  ".join(f"{k}={v}" for k, v in kw.items()), flush=True)

    def render(self) -> str:
        cols = ["case", "impl", "fwd+bwd ms", "vs eager", "peak MiB", "mem vs eager", "GB/s", "% copy BW", "compile s", "note"]
        lines = []
        widths = {c: len(c) for c in cols}
        cells = []
        for r in self.rows:
            row = {c: str(r.get(c, "")) for c in cols}
            cells.append(row)
            for c in cols:
                widths[c] = max(widths[c], len(row[c]))
        lines.append("  ".join(c.ljust(widths[c]) for c in cols))
        lines.append("  ".join("-" * widths[c] for c in cols))
        for row in cells:
            lines.append("  ".join(row[c].ljust(widths[c]) for c in cols))
        return "\n".join(lines)


def _mem_cols(mem, eager):
    if math.isnan(mem):
        return {"peak MiB": "-", "mem vs eager": "-"}
    em = eager.get("mem", float("nan"))
    return {"peak MiB": f"{mem:.0f}", "mem vs eager": f"{mem / em:.2f}x" if em and not math.isnan(em) else "-"}


def _module_step(m, x, gy):
    def step():
        m(x).backward(gy)
    return step


def _time_and_peak(step, device, grads):
    """Median ms and peak MiB of a training ``step``; ``grads`` are reset to None around each."""
    ms = bench_ms(step, device, grad_to_none=grads)
    for p in grads:
        p.grad = None
    mem = peak_mib(step, device)
    for p in grads:
        p.grad = None
    return ms, mem


def module_case(factory, device, dtype, B, C, T, k, H, W):
    """``(reference module, its Triton twin with the same weights, x, upstream grad)``, seeded."""
    torch.manual_seed(0)
    m_ref = factory(C, C, k, backend="reference").to(device=device, dtype=dtype)
    m_tri = copy.deepcopy(m_ref)
    m_tri.backend = "triton"
    x = torch.randn(B, T, C, H, W, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(B, C, H, W, device=device, dtype=dtype)
    return m_ref, m_tri, x, gy


def bench_modules(table: Table, device, dtype, B, C, T, k, H, W, budget_s, compile_backend, compile_jobs):
    """eager / triton rows now; the torch.compile rows are queued (run last, within the budget)."""
    for label, factory in (("SA-LSTM", sk.SALSTM2d), ("LSTM-SA", sk.LSTMSA2d)):
        case = f"{label} {H}x{W} {dname(dtype)}"
        m_ref, m_tri, x, gy = module_case(factory, device, dtype, B, C, T, k, H, W)
        eager = {}
        for impl, m in (("eager", m_ref), ("triton", m_tri)):
            try:
                step = _module_step(m, x, gy)
                step()
                sync(device)
                ms, mem = _time_and_peak(step, device, [x, *m.parameters()])
                if impl == "eager":
                    eager = {"ms": ms, "mem": mem}
                try:
                    split = device_time_split(step, device)
                except Exception as e:  # noqa: BLE001
                    split = f"profiler: {type(e).__name__}"
                for p in [x, *m.parameters()]:
                    p.grad = None
                table.add(case=case, impl=impl, **{"fwd+bwd ms": f"{ms:.3f}",
                          "vs eager": f"{eager['ms'] / ms:.2f}x" if eager.get("ms") else "-",
                          **_mem_cols(mem, eager), "note": split})
            except Exception as e:  # noqa: BLE001
                table.add(case=case, impl=impl, note=f"ERROR {type(e).__name__}: {str(e)[:80]}")
        compile_jobs.append((case, m_ref, x, gy, eager))


def run_compile_jobs(table: Table, device, jobs, budget_s, compile_backend):
    for case, m_ref, x, gy, eager in jobs:
        if elapsed() > budget_s:
            table.add(case=case, impl="compile", note=f"skipped: time budget {budget_s:.0f}s spent")
            continue
        try:
            torch._dynamo.reset()
            cm = torch.compile(m_ref, backend=compile_backend)
            step = _module_step(cm, x, gy)
            t = time.perf_counter()
            step()
            step()  # the second call can recompile (grad mode / guards); keep it out of the timing
            sync(device)
            compile_s = time.perf_counter() - t
            ms, mem = _time_and_peak(step, device, [x, *m_ref.parameters()])
            table.add(case=case, impl="compile", **{"fwd+bwd ms": f"{ms:.3f}",
                      "vs eager": f"{eager['ms'] / ms:.2f}x" if eager.get("ms") else "-",
                      **_mem_cols(mem, eager), "compile s": f"{compile_s:.1f}"})
        except Exception as e:  # noqa: BLE001
            table.add(case=case, impl="compile", note=f"ERROR {type(e).__name__}: {str(e)[:80]}")
    torch._dynamo.reset()


def single_pass(C, backward, gated, dtype) -> bool:
    from salstm_kernels.triton import lstm_attention as la

    return C > 0 and la.attention_path(C, backward, gated, dtype) == "single"


def tuned_width(C) -> bool:
    from salstm_kernels.triton import lstm_attention as la

    return C > 0 and la._padded(C) == la.TUNED_CP


#: How the tables name each path of ``lstm_attention.PATHS``.
PATH_NAMES = {"single": "single-pass", "blocked": "channel-blocked", "matmul": "channel-blocked, matmul products"}


def fused_path(C, gated, dtype) -> str:
    """Which Triton attention kernels run, per direction (single-pass at C <= 64 unless routed;
    channel-blocked with Triton dots or with library matmuls for the products)."""
    from salstm_kernels.triton import lstm_attention as la

    fwd, bwd = (PATH_NAMES[la.attention_path(C, backward, gated, dtype)] for backward in (False, True))
    return f"C={C} fused {fwd}" if fwd == bwd else f"C={C} fused fwd {fwd}, bwd {bwd}"


def launch_tables():
    """A copy of the Triton attention launch tables: ``(GPU_LAUNCH, PATH_AT_CP64)``."""
    from salstm_kernels.triton import lstm_attention as la

    return dict(la.GPU_LAUNCH), dict(la.PATH_AT_CP64)


def set_launch_tables(tables):
    """Make the package's launch tables equal to ``tables`` (a :func:`launch_tables` copy)."""
    from salstm_kernels.triton import lstm_attention as la

    la.GPU_LAUNCH.clear()
    la.GPU_LAUNCH.update(tables[0])
    la.PATH_AT_CP64.clear()
    la.PATH_AT_CP64.update(tables[1])


@contextlib.contextmanager
def launch_tables_kept():
    """Whatever the block does to the launch tables is undone on exit, failure or not."""
    saved = launch_tables()
    try:
        yield
    finally:
        set_launch_tables(saved)


@contextlib.contextmanager
def forced_path(path: str):
    """Route both directions to ``path`` (``lstm_attention.PATHS``) at padded C = 64 (the A/B of the
    routing table); its launches stay as shipped (tuned entry or heuristics)."""
    from salstm_kernels.triton import lstm_attention as la

    with launch_tables_kept():
        la.PATH_AT_CP64.update({(bwd, gated, fp32): path for bwd in (False, True) for gated in (False, True)
                                for fp32 in (False, True)})
        yield


@contextlib.contextmanager
def forced_products(matmul: bool, split_n: bool = True):
    """Every call at padded C > 64 does its products as library matmuls (``matmul``) or as Triton
    dots, whatever ``MATMUL_PRODUCTS_MIN_C`` says (the A/B at wide C; at C = 64 ``PATH_AT_CP64``
    decides, see :func:`forced_path`); ``split_n`` False: the
    matmul path's sums over pixels as bmm too (``attention_matmul.SPLIT_N_REDUCTIONS``)."""
    from salstm_kernels.triton import attention_matmul, lstm_attention as la

    kept = la.MATMUL_PRODUCTS_MIN_C, attention_matmul.SPLIT_N_REDUCTIONS
    la.MATMUL_PRODUCTS_MIN_C = 0 if matmul else 2**62
    attention_matmul.SPLIT_N_REDUCTIONS = split_n
    try:
        yield
    finally:
        la.MATMUL_PRODUCTS_MIN_C, attention_matmul.SPLIT_N_REDUCTIONS = kept


def our_kernel_names() -> set:
    """Names of this package's Triton kernels, as the profiler shows them."""
    import importlib
    import pkgutil

    import triton

    import salstm_kernels.triton as package

    # JITFunction on a GPU; InterpretedFunction under TRITON_INTERPRET=1 (the CPU smoke runs)
    interpreter = sys.modules.get("triton.runtime.interpreter")  # imported only where it is in use
    kinds = (triton.runtime.JITFunction, getattr(interpreter, "InterpretedFunction", triton.runtime.JITFunction))
    names = set()
    for info in pkgutil.iter_modules(package.__path__):  # every kernel file (attention_partials too)
        if info.name == "sm90_stats":  # a compile survey, not kernels
            continue
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, kinds):
                names.add(obj.fn.__name__)
    return names


def device_time_split(step, device) -> str:
    """Share of device time in this package's Triton kernels vs everything else (convs, cuDNN, ...)."""
    return device_time_profile(step, device)[0]


def device_time_profile(step, device, steps=5):
    """``(split, kernels, ops)``: the split line, ``[(kernel name, ms per step)]`` longest first,
    and ``[(operator, device ms per step)]``: the torch operators whose kernels took that time
    (children included, so nested operators repeat it), which names what launched a kernel."""
    if device.type != "cuda":
        return "", [], []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    return profile_rows(prof.key_averages(), steps, our_kernel_names())


def profile_rows(events, steps, ours):
    """:func:`device_time_profile`'s result from the profiler's averaged events."""
    fused = other = 0.0
    conv = 0.0
    kernels, ops = [], []
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CUDA:  # an operator on the host
            total = getattr(ev, "device_time_total", None)
            total = ev.cuda_time_total if total is None else total
            # operators: aten::* / salstm_kernels::* (and autograd's evaluate_function:: of backwards),
            # and the fused ops' eager entries (ops.dispatch: LstmAttentionFunction, ...)
            if total > 0 and ("::" in ev.key or ev.key.endswith("Function")):
                ops.append((ev.key, total / steps / 1e3))
            continue
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = ev.self_cuda_time_total
        if t > 0:
            kernels.append((ev.key, t / steps / 1e3))
        if ev.key in ours:
            fused += t
        else:
            other += t
            if any(k in ev.key.lower() for k in ("conv", "cudnn", "gemm", "xmma", "sm90", "wgrad", "dgrad", "fprop")):
                conv += t
    total = fused + other
    if total <= 0:
        return "profiler saw no device time", [], []
    kernels.sort(key=lambda kv: -kv[1])
    ops.sort(key=lambda kv: -kv[1])
    return (f"device time/step {total / steps / 1e3:.3f} ms: ours {100 * fused / total:.0f}%, "
            f"conv-like {100 * conv / total:.0f}%, other {100 * (other - conv) / total:.0f}%"), kernels, ops


def bench_fused_part(table: Table, tk, device, dtype, B, C, H, W, copy_gbs):
    """The non-conv part alone: lstm_attention fwd+bwd and lstm_cell fwd+bwd, GB/s vs copy BW."""
    from salstm_kernels.triton import lstm_attention as la

    N = H * W
    es = torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(B, 4 * C, H, W, device=device, dtype=dtype, generator=g)
    c, dout, dh, dcn = (torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g) for _ in range(4))
    scale = 1.0 / math.sqrt(N)
    for label, gated in (("SA-LSTM", False), ("LSTM-SA", True)):
        case = f"non-conv {label} C{C} {H}x{W} {dname(dtype)}"
        proj = tuple(p.detach() for p in random_projections(C, dtype, device)) if gated else None

        def fused():
            _, _, _, P = tk.attention_forward(A, c, proj, scale, "linear")
            tk.attention_backward(A, c, proj, P, dout, dh, dcn, scale, "linear")

        # must move: fwd reads A, c and writes out, h', c' (8CN); bwd reads A, c, dout, dh, dc'
        # and writes dA, dc (13CN)
        nbytes = 21 * B * C * N * es
        variants = [("triton ops", contextlib.nullcontext(), fused_path(C, gated, dtype))]
        if tuned_width(C):  # the routing table's A/B at padded C = 64, every path
            for path in la.PATHS:
                variants.append((f"triton {path}", forced_path(path), f"C={C} {PATH_NAMES[path]} (forced)"))
        elif not single_pass(C, False, gated, dtype):  # wider: the channel-blocked path, both product forms
            matmul = C < la.MATMUL_PRODUCTS_MIN_C  # the other products path than the shipped one
            variants.append(("triton matmul" if matmul else "triton dots", forced_products(matmul),
                             f"C={C} channel-blocked, {'matmul products' if matmul else 'Triton dots'} (forced)"))
            variants.append(("triton matmul, bmm sums", forced_products(True, split_n=False),
                             f"C={C} channel-blocked, matmul products, sums over N by bmm (forced)"))
        for impl, forced, path in variants:
            try:
                with forced:
                    ms = bench_ms(fused, device)
                gbs = nbytes / (ms * 1e-3) / 1e9
                table.add(case=case, impl=impl, **{"fwd+bwd ms": f"{ms:.3f}", "GB/s": f"{gbs:.0f}",
                          "% copy BW": f"{100 * gbs / copy_gbs:.0f}%",
                          "note": f"{nbytes / 2**20:.0f} MiB moved; {path}"})
            except Exception as e:  # noqa: BLE001
                table.add(case=case, impl=impl, note=f"ERROR {type(e).__name__}: {str(e)[:80]}")
        # the same math in eager PyTorch (autograd of the reference), for scale
        try:
            A_, c_ = A.clone().requires_grad_(True), c.clone().requires_grad_(True)
            proj_ = tuple(p.clone().requires_grad_(True) for p in proj) if gated else None

            def eager():
                outs = reference.lstm_attention_ref(A_, c_, scale, "linear", proj_)
                torch.autograd.backward(list(outs), [dout, dh, dcn])

            leaves = [A_, c_] + (list(proj_) if gated else [])
            ms_e = bench_ms(eager, device, grad_to_none=leaves)
            gbs = nbytes / (ms_e * 1e-3) / 1e9
            table.add(case=case, impl="eager ref", **{"fwd+bwd ms": f"{ms_e:.3f}", "GB/s": f"{gbs:.0f}",
                      "% copy BW": f"{100 * gbs / copy_gbs:.0f}%", "note": "same bytes model"})
        except Exception as e:  # noqa: BLE001
            table.add(case=case, impl="eager ref", note=f"ERROR {type(e).__name__}: {str(e)[:80]}")
    case = f"non-conv cell C{C} {H}x{W} {dname(dtype)}"
    nbytes = (7 + 12) * B * C * N * es  # fwd: read 5CN write 2CN; bwd: read 7CN write 5CN
    try:
        ms = bench_ms(lambda: (tk.cell_forward(A, c), tk.cell_backward(A, c, dh, dcn)), device)
        gbs = nbytes / (ms * 1e-3) / 1e9
        table.add(case=case, impl="triton ops", **{"fwd+bwd ms": f"{ms:.3f}", "GB/s": f"{gbs:.0f}",
                  "% copy BW": f"{100 * gbs / copy_gbs:.0f}%", "note": f"{nbytes / 2**20:.0f} MiB moved"})
    except Exception as e:  # noqa: BLE001
        table.add(case=case, impl="triton ops", note=f"ERROR {type(e).__name__}: {str(e)[:80]}")


def run_bench(device, smoke: bool, budget_s: float, no_compile: bool, wide_only: bool = False) -> Table:
    tk = providers.kernels("triton")
    table = Table()
    print("== speed / memory ==", flush=True)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    table.copy_gbs = copy_gbs
    if wide_only:  # the non-conv part at wide C, both product paths
        sizes = ((6, 5),) if smoke else ((112, 112), (224, 224))
        for H, W in sizes:
            for dt in (torch.float32, torch.bfloat16):
                for wide in ((72,) if smoke else (128, 256)):
                    bench_fused_part(table, tk, device, dt, 1 if smoke else 2, wide, H, W, copy_gbs)
        return table
    if smoke:
        B, C, T, k, sizes, dtypes = 1, 40, 2, 3, ((6, 5),), (torch.float32, torch.bfloat16)
        wide_cs = (72,)
        compile_backend = "eager"  # exercise the logic only
    else:
        B, C, T, k, sizes, dtypes = 2, 64, 2, 5, ((112, 112), (224, 224)), (torch.float32, torch.bfloat16)
        wide_cs = (128, 256)
        compile_backend = "inductor"
    jobs = []
    for H, W in sizes:
        for dt in dtypes:
            bench_modules(table, device, dt, B, C, T, k, H, W, budget_s, compile_backend, jobs)
            bench_fused_part(table, tk, device, dt, B, C, H, W, copy_gbs)
            for wide in wide_cs:  # the channel-blocked kernels, non-conv part only
                bench_fused_part(table, tk, device, dt, B, wide, H, W, copy_gbs)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if no_compile:
        for case, *_ in jobs:
            table.add(case=case, impl="compile", note="skipped (--no-compile)")
    else:
        # largest shapes first: if the time budget runs out, the small ones are what is lost
        run_compile_jobs(table, device, jobs[::-1], budget_s, compile_backend)
    table.copy_gbs = copy_gbs
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--only-64bit", action="store_true", help="parity: the > 2^31-element offset cases only")
    ap.add_argument("--wide-only", action="store_true",
                    help="C > 64 only: parity and the non-conv rows with both product paths (Triton dots, matmuls)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="torch.compile rows still pending after this many seconds are skipped")
    args = ap.parse_args()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("no CUDA device: run with --cpu-smoke (Triton interpreter, tiny shapes)")
        return 2
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (Triton interpreter)'}", flush=True)
    log = ParityLog()
    if not args.skip_parity:
        try:
            log = run_parity(device, args.cpu_smoke, args.only_64bit, args.wide_only)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            log.failures.append("parity section crashed")
    table = None
    if not args.skip_bench:
        try:
            table = run_bench(device, args.cpu_smoke, args.budget_s, args.no_compile, args.wide_only)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            log.failures.append("benchmark section crashed (traceback above)")  # so the exit status says so
    # ---- summary, last
    print()
    print("=" * 100)
    if table is not None:
        print(f"SUMMARY  B=2 Cin=C=64 T=2 k=5 fwd+bwd (do_bench median); copy BW {table.copy_gbs:.0f} GB/s; "
              f"non-conv bytes model: attention 21*B*C*N, cell 19*B*C*N elements; "
              f"note column says which attention kernels ran, per direction")
        print(table.render())
    return parity_verdict(log)


def parity_verdict(log: ParityLog) -> int:
    """Print the failures and the parity count last; the exit status (1 on any failure)."""
    for line in log.failures:
        print(line)
    print(f"parity: {log.n_pass} PASS, {len(log.failures)} FAIL; total {elapsed():.0f}s")
    return 1 if log.failures else 0


if __name__ == "__main__":
    sys.exit(main())
