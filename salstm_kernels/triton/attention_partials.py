"""The single-pass attention's reductions of per-split partials, one launch each.

The single-pass kernels (:mod:`.lstm_attention`) leave float32 partials per N split: the scores
``S``, the score gradient ``dP`` and LSTM-SA's projection gradients.  Summed and finished in torch
they took 3 device operations in the forward (sum, scale, softmax) and 7 in the backward (sum, the
``dS`` formula), LSTM-SA's backward 6 to 12 more (a sum, and in 16-bit a cast, per projection
gradient): each a launch and host work for a few kilobytes, where at 112x112 on an H200 the step is
host-bound.  These kernels do each reduction with its epilogue in one launch, summing the splits in
a fixed order (deterministic, no atomics).

* :func:`softmax_of_partials` -- ``P = softmax(scale * sum_s S_s)`` (``RB`` rows per program).
* :func:`scores_grad_of_partials` -- ``dS = P * (dP - rowsum(dP * P)) * scale``, ``dP = sum_s dP_s``.
* :func:`projection_grad_sums` -- ``(dWq, dbq, dWk, dbk, dWv, dbv)`` from the weight and bias
  partials of q, k, v, each its own fresh tensor in its projection's dtype.

The channel-blocked paths (``C > 64``) finish their split partials with all three as well.
One program holds ``RB`` full rows of the ``(C, C)`` matrices (padded to a power of two), with more
warps for wider rows.  Reference: ``torch.softmax(S.sum(1) * scale, -1)`` and
``P * (dP - rowsum(dP * P)) * scale`` in torch (``tests/test_triton_ops.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Rows of the ``(C, C)`` matrices per program: ``B * C / RB`` programs (32 at B = 2, C = 64).
ROWS_PER_PROGRAM = 4
#: Elements of the projection-gradient partials' rows per program.
SUM_BLOCK = 256


@triton.jit
def _rows_tile(rb, C, CP: tl.constexpr, RB: tl.constexpr):
    rows = rb * RB + tl.arange(0, RB)
    cols = tl.arange(0, CP)
    mask = (rows < C)[:, None] & (cols < C)[None, :]
    return cols, mask, rows[:, None] * C + cols[None, :]


@triton.jit
def _split_sum(ptr, b, offs, mask, C, SPLITS, CP: tl.constexpr, RB: tl.constexpr):
    """``sum_s X[b, s][rows]`` of ``(B, SPLITS, C, C)`` float32 partials, in split order."""
    acc = tl.zeros((RB, CP), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(ptr + (b * SPLITS + s) * C * C + offs, mask=mask, other=0.0)
    return acc


@triton.jit(do_not_specialize=["SPLITS"])
def _softmax_of_partials_kernel(s_ptr, p_ptr, C, SPLITS, scale, CP: tl.constexpr, RB: tl.constexpr):
    rb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols, mask, offs = _rows_tile(rb, C, CP, RB)
    x = _split_sum(s_ptr, b, offs, mask, C, SPLITS, CP, RB) * scale
    x = tl.where((cols < C)[None, :], x, float("-inf"))  # padding columns: no weight; every row finite
    x = x - tl.max(x, axis=1)[:, None]
    e = tl.exp(x)
    tl.store(p_ptr + b * C * C + offs, e / tl.sum(e, axis=1)[:, None], mask=mask)


@triton.jit(do_not_specialize=["SPLITS"])
def _scores_grad_of_partials_kernel(dp_ptr, p_ptr, ds_ptr, C, SPLITS, scale, CP: tl.constexpr, RB: tl.constexpr):
    rb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    _, mask, offs = _rows_tile(rb, C, CP, RB)
    dp = _split_sum(dp_ptr, b, offs, mask, C, SPLITS, CP, RB)
    p = tl.load(p_ptr + b * C * C + offs, mask=mask, other=0.0)
    ds = p * (dp - tl.sum(dp * p, axis=1)[:, None]) * scale
    tl.store(ds_ptr + b * C * C + offs, ds, mask=mask)


@triton.jit(do_not_specialize=["R"])
def _sum_three_kernel(x0_ptr, x1_ptr, x2_ptr, o0_ptr, o1_ptr, o2_ptr, R, M, row_stride, BLOCK: tl.constexpr):
    """``o_k = sum_r x_k[r]`` for three float32 ``x_k`` of ``R`` rows of ``M`` contiguous elements,
    ``row_stride`` apart, in row order; outputs in their dtypes."""
    blk = tl.program_id(0)
    k = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    m = cols < M
    if k == 0:
        x_ptr = x0_ptr
    elif k == 1:
        x_ptr = x1_ptr
    else:
        x_ptr = x2_ptr
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = x_ptr + cols
    for _ in range(R):
        acc += tl.load(ptrs, mask=m, other=0.0)
        ptrs += row_stride  # pointer arithmetic: 64-bit
    if k == 0:
        tl.store(o0_ptr + cols, acc.to(o0_ptr.dtype.element_ty), mask=m)
    elif k == 1:
        tl.store(o1_ptr + cols, acc.to(o1_ptr.dtype.element_ty), mask=m)
    else:
        tl.store(o2_ptr + cols, acc.to(o2_ptr.dtype.element_ty), mask=m)


def _launch_rows(kernel, partials, *tensors, scale):
    B, splits, C = partials.shape[:3]
    CP = triton.next_power_of_2(C)
    warps = max(1, min(8, CP * ROWS_PER_PROGRAM // 512))  # 1 warp up to C = 128, 8 from C = 1024
    grid = (triton.cdiv(C, ROWS_PER_PROGRAM), B)
    kernel[grid](partials, *tensors, C, splits, scale, CP=CP, RB=ROWS_PER_PROGRAM, num_warps=warps)


def softmax_of_partials(partials: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, C, C)`` float32 ``P`` from ``(B, SPLITS, C, C)`` float32 score partials."""
    B, _, C = partials.shape[:3]
    P = torch.empty(B, C, C, dtype=torch.float32, device=partials.device)
    _launch_rows(_softmax_of_partials_kernel, partials, P, scale=scale)
    return P


def scores_grad_of_partials(partials: torch.Tensor, P: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, C, C)`` float32 ``dS`` from ``(B, SPLITS, C, C)`` float32 ``dP`` partials and ``P``."""
    dS = torch.empty_like(P)
    _launch_rows(_scores_grad_of_partials_kernel, partials, P, dS, scale=scale)
    return dS


def projection_grad_sums(dw, db, proj) -> tuple:
    """``(dWq, dbq, dWk, dbk, dWv, dbv)`` from float32 partials summed over their leading rows, each
    a fresh tensor in the dtype of its projection (``proj``: ``(wq, bq, wk, bk, wv, bv)``; returned
    tensors must not alias each other).  ``dw``, ``db``: the weight and bias partials of q, k, v,
    three tensors each, ``(..., C, C)`` / ``(..., C)`` (the single-pass kernels' ``(R, 3, C, C)``
    unbound along dim 1, or the blocked paths' ``(B, SPLITS, C, C)`` per projection)."""
    grads = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in proj]
    for parts, outs in ((dw, grads[0::2]), (db, grads[1::2])):
        M = outs[0].numel()
        rows = [x.reshape(-1, M) for x in parts]  # views: each partial's (C, C) / (C,) is contiguous
        row_stride = rows[0].stride(0)
        if any(x.stride() != (row_stride, 1) or x.shape != rows[0].shape or x.dtype != torch.float32 for x in rows):
            raise ValueError("projection_grad_sums: the three partials need one float32 (R, M) row layout")
        _sum_three_kernel[(triton.cdiv(M, SUM_BLOCK), 3)](*rows, *outs, rows[0].shape[0], M, row_stride,
                                                          BLOCK=SUM_BLOCK, num_warps=4)
    return tuple(grads)
