"""Channel-blocked Triton kernels for the attention op at wide ``C`` (> 64; any ``C``).

The single-pass kernels of :mod:`.lstm_attention` keep ``(C, C)`` matrices on chip, which stops
fitting an H100 block beyond ``C = 64``.  These kernels never hold more than a ``(BC, BC)`` or
``(BC, BN)`` tile per operand (``BC`` = channel block, ``BN`` = pixel tile): every ``(C, C)``
product is a loop over channel chunks of ``tl.dot``s, so their on-chip footprint does not depend
on ``C`` (``C`` is a runtime argument: one compiled variant serves every ``C``).  The price is
materialising ``Q``, ``K``, ``V`` and the attention gradients as float32 ``(B, C, N)`` temporaries
(re-read from L2/HBM instead of recomputed per channel block).

Kernels (grids: ``T`` = N tiles, ``R`` = channel row blocks, ``S`` = N splits):

* :func:`qkv_rows_kernel` ``(T, R, B)`` -- gates, ``c'``, ``h'`` for a row block (optionally
  written), ``Q``, ``K`` and (LSTM-SA) ``V``; the projections ``W h' + b`` are blocked dots over
  input-channel chunks of ``h'`` (read from memory: another row block's ``h'``), or with ``PROJ``
  read from memory (``W h'`` computed by a library matmul, :mod:`.attention_matmul`).
* :func:`abt_partials_kernel` ``(R*R, S, B)`` -- per-split partials of ``X Y^T`` per ``(BC, BC)``
  block (scores ``Q K^T``, ``dP = dO V^T``, ``dW = dq h'^T``), optional row sums (``db``); summed
  over splits in a fixed order by the caller (deterministic, no atomics).
* :func:`mm_rows_kernel` ``(T, R, B)`` -- ``M X`` or ``M^T X`` for a ``(C, C)`` float32 ``M``
  (``O = P V``, ``dQ = dS K``, ``dK = dS^T Q``, ``dV = P^T dO``).
* :func:`proj_grad_rows_kernel` ``(T, R, B)`` -- LSTM-SA: ``dq = dQ * fq`` (written) and
  ``dfq = dQ * (Wq h' + bq)`` (written over ``dQ``), same for k, v.
* :func:`attention_bwd_rows_kernel` ``(T, R, B)`` -- ``dh' += Wq^T dq + Wk^T dk + Wv^T dv``
  (LSTM-SA; with ``PROJ`` that sum is read from memory), the QKV-formation chain rule and the cell
  backward into ``dA``, ``dc``.

:mod:`.attention_matmul` (``C >= MATMUL_PRODUCTS_MIN_C``) runs the rows kernels with ``PROJ`` and
:func:`outer_partials`, with the temporaries in the input dtype and the other products as library matmuls.

All math and accumulation float32; ``input_precision`` "ieee" for float32 inputs, "tf32" else;
64-bit offsets; masks for any ``C`` and ``N``.  ``LAYOUT`` (``lstm_cell.LAYOUTS``): NCHW, every
``(B, C, N)`` tensor (and ``A``) channels_last (channels contiguous per pixel; the float32
temporaries follow), or NCHW with a 64-bit gate stride.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lstm_cell import (
    gate_sums, load_lstm_inputs, load_optional_grad, lstm_state, lstm_state_grads, qk_factors, qkv_factor_grads,
    store_gate_sums, store_lstm_grads, weight_dot,
)


@triton.jit
def _state_offsets(b, rows, cols, C, N, LAYOUT: tl.constexpr):
    """64-bit offsets of channels ``rows`` x pixels ``cols`` of a ``(B, C, N)`` tensor: NCHW, or
    channels_last with ``LAYOUT == 1`` (``lstm_cell.LAYOUTS``)."""
    if LAYOUT == 1:
        return b * C * N + cols[None, :].to(tl.int64) * C + rows[:, None]
    return b * C * N + rows[:, None].to(tl.int64) * N + cols[None, :]


@triton.jit
def _rows_tile(b, blk, t, C, N, BC: tl.constexpr, BN: tl.constexpr, LAYOUT: tl.constexpr):
    """Rows, columns, mask, offsets into ``A`` (gate i) and the state tensors, and ``A``'s gate stride."""
    rows = blk * BC + tl.arange(0, BC)
    cols = t * BN + tl.arange(0, BN)
    mask = (rows < C)[:, None] & (cols < N)[None, :]
    c_offs = _state_offsets(b, rows, cols, C, N, LAYOUT)
    # one return: the compiler types every return statement, even in a branch it drops
    if LAYOUT == 1:  # A (B, N, 4C): a pixel's 4C gate values together
        a_offs = b * 4 * C * N + cols[None, :].to(tl.int64) * (4 * C) + rows[:, None]
        gs = C
    elif LAYOUT == 2:  # 64-bit gate stride, as b is
        a_offs = c_offs + b * 3 * C * N
        gs = (b * 0 + C) * N
    else:
        a_offs = c_offs + b * 3 * C * N
        gs = C * N
    return rows, cols, mask, a_offs, c_offs, gs


@triton.jit
def _chunk(ptr, b, kr, cols, C, N, LAYOUT: tl.constexpr):
    """Rows ``kr`` x columns ``cols`` of a ``(B, C, N)`` tensor, float32, zero outside."""
    m = (kr < C)[:, None] & (cols < N)[None, :]
    return tl.load(ptr + _state_offsets(b, kr, cols, C, N, LAYOUT), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _square_block(ptr, ri, rj, C, TRANS: tl.constexpr, W16: tl.constexpr = False):
    """Block ``M[ri, rj]`` (or ``M[rj, ri]^T`` with ``TRANS``) of a row-major ``(C, C)``, float32, or
    in its 16-bit storage type for ``W16`` (``lstm_attention.WEIGHT_DOTS_16BIT``)."""
    m = (ri < C)[:, None] & (rj < C)[None, :]
    if TRANS:
        offs = rj[None, :].to(tl.int64) * C + ri[:, None]
    else:
        offs = ri[:, None].to(tl.int64) * C + rj[None, :]
    if W16:
        blk = tl.load(ptr + offs, mask=m, other=0.0)
    else:
        blk = tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32)
    return blk


@triton.jit
def _projections(h_ptr, b, rows, cols, C, N, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                 BC: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, LAYOUT: tl.constexpr, W16: tl.constexpr):
    """``W[rows, :] @ h' + b[rows]`` for q, k, v on one tile, blocked over input channels."""
    pq = tl.zeros((BC, BN), dtype=tl.float32)
    pk = tl.zeros((BC, BN), dtype=tl.float32)
    pv = tl.zeros((BC, BN), dtype=tl.float32)
    for kk in range(0, C, BC):
        kr = kk + tl.arange(0, BC)
        hk = _chunk(h_ptr, b, kr, cols, C, N, LAYOUT)
        pq = weight_dot(_square_block(wq_ptr, rows, kr, C, False, W16), hk, pq, PREC, W16)
        pk = weight_dot(_square_block(wk_ptr, rows, kr, C, False, W16), hk, pk, PREC, W16)
        pv = weight_dot(_square_block(wv_ptr, rows, kr, C, False, W16), hk, pv, PREC, W16)
    return _plus_biases(pq, pk, pv, bq_ptr, bk_ptr, bv_ptr, rows, C)


@triton.jit
def _given_projections(pq_ptr, pk_ptr, pv_ptr, bq_ptr, bk_ptr, bv_ptr, rows, offs, mask, C):
    """``W h'`` for q, k, v computed outside (``PROJ``: a library matmul) at ``offs``, plus ``b[rows]``."""
    pq = tl.load(pq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pk = tl.load(pk_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pv = tl.load(pv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return _plus_biases(pq, pk, pv, bq_ptr, bk_ptr, bv_ptr, rows, C)


@triton.jit
def _plus_biases(pq, pk, pv, bq_ptr, bk_ptr, bv_ptr, rows, C):
    """The projections' biases ``b[rows]`` added to ``W h'`` tiles of q, k, v."""
    rm = rows < C
    pq += tl.load(bq_ptr + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
    pk += tl.load(bk_ptr + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
    pv += tl.load(bv_ptr + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
    return pq, pk, pv


@triton.jit
def qkv_rows_kernel(
    a_ptr, c_ptr, hsrc_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, pq_ptr, pk_ptr, pv_ptr,
    q_ptr, k_ptr, v_ptr, h_ptr, cn_ptr, bias_ptr, C, N,
    BC: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr,
    WRITE_STATE: tl.constexpr, PREC: tl.constexpr, LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr = False,
    W16: tl.constexpr = False, PROJ: tl.constexpr = False,
):
    """``Q, K`` (and LSTM-SA's ``V``) of a row block; the projections ``W h'`` by blocked dots over
    ``hsrc`` and ``W``, or with ``PROJ`` read from ``pq, pk, pv`` (may be ``q, k, v``: in place)."""
    t = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, cols, mask, a_offs, c_offs, gs = _rows_tile(b, blk, t, C, N, BC, BN, LAYOUT)
    if GATED:  # projections first: the gate math is not live across their loop (registers)
        if PROJ:
            pq, pk, pv = _given_projections(pq_ptr, pk_ptr, pv_ptr, bq_ptr, bk_ptr, bv_ptr, rows, c_offs, mask, C)
        else:
            pq, pk, pv = _projections(hsrc_ptr, b, rows, cols, C, N, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                                      BC, BN, PREC, LAYOUT, W16)
    if (not GATED) or COMB != 2:
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, rows[:, None], C,
                                             HAS_BIAS)
        i, f, o, g, c_new, tc, h = lstm_state(ai, af, ao, ag, c)
    if WRITE_STATE:
        tl.store(h_ptr + c_offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(cn_ptr + c_offs, c_new.to(cn_ptr.dtype.element_ty), mask=mask)
    if GATED:
        if COMB != 2:
            fq, fk = qk_factors(f, g, c_new, h, COMB)
            q = fq * pq
            k = fk * pk
            v = h * pv
        else:
            q = pq
            k = pk
            v = pv
        tl.store(v_ptr + c_offs, v, mask=mask)
    else:
        q, k = qk_factors(f, g, c_new, h, COMB)
    tl.store(q_ptr + c_offs, q, mask=mask)
    tl.store(k_ptr + c_offs, k, mask=mask)


@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "SPLITS", "NB"])
def abt_partials_kernel(
    x_ptr, y_ptr, out_ptr, rs_ptr, C, N, tiles_per_split, n_tiles, SPLITS, NB,
    BC: tl.constexpr, BN: tl.constexpr, ROWSUM: tl.constexpr, PREC: tl.constexpr, LAYOUT: tl.constexpr,
):
    """``out[b, split, ri, rj] = sum_{n in split} X[b, ri, n] Y[b, rj, n]`` (+ ``rs = sum_n X``)."""
    blk = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = (blk // NB) * BC + tl.arange(0, BC)
    rj = (blk % NB) * BC + tl.arange(0, BC)
    acc = tl.zeros((BC, BC), dtype=tl.float32)
    rs = tl.zeros((BC,), dtype=tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        cols = t * BN + tl.arange(0, BN)
        x = _chunk(x_ptr, b, ri, cols, C, N, LAYOUT)
        y = _chunk(y_ptr, b, rj, cols, C, N, LAYOUT)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PREC)
        if ROWSUM:
            rs += tl.sum(x, axis=1)
    base = b * SPLITS + split
    m = (ri < C)[:, None] & (rj < C)[None, :]
    tl.store(out_ptr + base * C * C + ri[:, None].to(tl.int64) * C + rj[None, :], acc, mask=m)
    if ROWSUM:
        if blk % NB == 0:
            tl.store(rs_ptr + base * C + ri, rs, mask=ri < C)


@triton.jit
def mm_rows_kernel(m_ptr, x_ptr, o_ptr, C, N, TRANS: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr, LAYOUT: tl.constexpr):
    """``O[b, rows] = M[b, rows, :] @ X[b]`` (``M[b, :, rows]^T`` with ``TRANS``), ``M (B, C, C)``."""
    t = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, cols, mask, _, c_offs, _ = _rows_tile(b, blk, t, C, N, BC, BN, LAYOUT)
    acc = tl.zeros((BC, BN), dtype=tl.float32)
    m_base = m_ptr + b * C * C
    for kk in range(0, C, BC):
        kr = kk + tl.arange(0, BC)
        acc = tl.dot(_square_block(m_base, rows, kr, C, TRANS), _chunk(x_ptr, b, kr, cols, C, N, LAYOUT), acc,
                     input_precision=PREC)
    tl.store(o_ptr + c_offs, acc.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def proj_grad_rows_kernel(
    a_ptr, c_ptr, hsrc_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, pq_ptr, pk_ptr, pv_ptr,
    dqa_ptr, dka_ptr, dva_ptr, dq_ptr, dk_ptr, dv_ptr, bias_ptr, C, N,
    BC: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, PREC: tl.constexpr, LAYOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, W16: tl.constexpr = False, PROJ: tl.constexpr = False,
):
    """LSTM-SA: ``dq = dQ * fq`` etc. (written); with a combination, ``dQ <- dQ * pq`` in place.
    ``PROJ``: the projections ``W h'`` read from ``pq, pk, pv`` (``dq, dk, dv`` may overwrite them)."""
    t = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, cols, mask, a_offs, c_offs, gs = _rows_tile(b, blk, t, C, N, BC, BN, LAYOUT)
    if COMB != 2:
        # projections first (nothing else live across their loop), then one operand at a time
        if PROJ:
            pq, pk, pv = _given_projections(pq_ptr, pk_ptr, pv_ptr, bq_ptr, bk_ptr, bv_ptr, rows, c_offs, mask, C)
        else:
            pq, pk, pv = _projections(hsrc_ptr, b, rows, cols, C, N, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
                                      BC, BN, PREC, LAYOUT, W16)
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, rows[:, None], C,
                                             HAS_BIAS)
        i, f, o, g, c_new, tc, h = lstm_state(ai, af, ao, ag, c)
        fq, fk = qk_factors(f, g, c_new, h, COMB)
        dQ = tl.load(dqa_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dqa_ptr + c_offs, dQ * pq, mask=mask)
        tl.store(dq_ptr + c_offs, dQ * fq, mask=mask)
        dK = tl.load(dka_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dka_ptr + c_offs, dK * pk, mask=mask)
        tl.store(dk_ptr + c_offs, dK * fk, mask=mask)
        dV = tl.load(dva_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dva_ptr + c_offs, dV * pv, mask=mask)
        tl.store(dv_ptr + c_offs, dV * h, mask=mask)
    else:
        tl.store(dq_ptr + c_offs, tl.load(dqa_ptr + c_offs, mask=mask, other=0.0), mask=mask)
        tl.store(dk_ptr + c_offs, tl.load(dka_ptr + c_offs, mask=mask, other=0.0), mask=mask)
        tl.store(dv_ptr + c_offs, tl.load(dva_ptr + c_offs, mask=mask, other=0.0), mask=mask)


@triton.jit
def attention_bwd_rows_kernel(
    a_ptr, c_ptr, dh_ptr, dcn_ptr, dfq_ptr, dfk_ptr, dfv_ptr, dq_ptr, dk_ptr, dv_ptr,
    wq_ptr, wk_ptr, wv_ptr, wdq_ptr, da_ptr, dc_ptr, bias_ptr, dbias_ptr, C, N,
    BC: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_DH: tl.constexpr = True, HAS_DCN: tl.constexpr = True,
    HAS_BIAS: tl.constexpr = False, W16: tl.constexpr = False, PROJ: tl.constexpr = False,
):
    """Total ``dh'``, ``dc'``, ``df``, ``dg`` of a row block, then the cell backward into ``dA``, ``dc``.

    ``dfq, dfk, dfv`` are the gradients on the LSTM-state factors of ``Q, K, V`` (SA-LSTM: ``dQ, dK,
    dV``); LSTM-SA adds ``W^T dq`` etc. (``dq`` over all rows, hence a separate pass), or with ``PROJ``
    reads that sum from ``wdq`` (computed outside by a library matmul).
    ``HAS_BIAS``: the tile's ``dA`` summed per gate row too, into row ``b * n_tiles + t`` of the folded
    conv bias's ``(B * n_tiles, 4C)`` gradient partials (no separate pass over ``dA`` for it).
    """
    t = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows, cols, mask, a_offs, c_offs, gs = _rows_tile(b, blk, t, C, N, BC, BN, LAYOUT)
    dh_t = load_optional_grad(dh_ptr, c_offs, mask, HAS_DH)
    if GATED and PROJ:
        dh_t += tl.load(wdq_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    elif GATED:  # cross-row term first: the gate math is not live across its loop (registers)
        x = tl.zeros((BC, BN), dtype=tl.float32)
        for kk in range(0, C, BC):
            kr = kk + tl.arange(0, BC)
            x = weight_dot(_square_block(wq_ptr, rows, kr, C, True, W16), _chunk(dq_ptr, b, kr, cols, C, N, LAYOUT),
                            x, PREC, W16)
            x = weight_dot(_square_block(wk_ptr, rows, kr, C, True, W16), _chunk(dk_ptr, b, kr, cols, C, N, LAYOUT),
                            x, PREC, W16)
            x = weight_dot(_square_block(wv_ptr, rows, kr, C, True, W16), _chunk(dv_ptr, b, kr, cols, C, N, LAYOUT),
                            x, PREC, W16)
        dh_t += x
    ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, rows[:, None], C, HAS_BIAS)
    i, f, o, g, c_new, tc, h = lstm_state(ai, af, ao, ag, c)
    dc_t = load_optional_grad(dcn_ptr, c_offs, mask, HAS_DCN)
    df = 0.0
    dg = 0.0
    if COMB != 2:
        dfq = tl.load(dfq_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        dfk = tl.load(dfk_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        dfv = tl.load(dfv_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        df, dg, dh_t, dc_t = qkv_factor_grads(f, g, c_new, h, dfq, dfk, dfv, dh_t, dc_t, COMB)
    dai, daf, dao, dag, dc = lstm_state_grads(i, f, o, g, c, tc, dh_t, dc_t, df, dg)
    store_lstm_grads(da_ptr, dc_ptr, a_offs, c_offs, gs, mask, dai, daf, dao, dag, dc)
    if HAS_BIAS:
        si, sf, so, sg = gate_sums(mask, dai, daf, dao, dag, 1)
        store_gate_sums(dbias_ptr + (b * tl.num_programs(0) + t) * 4 * C, rows, C, si, sf, so, sg)


def outer_partials(plan, X, Y, C, N, prec, layout, rowsum=False):
    """Per-split partials of ``sum_n X Y^T`` per image, ``(B, SPLITS, C, C)`` float32 (and of
    ``sum_n X``, ``(B, SPLITS, C)``), from :func:`abt_partials_kernel` (``plan``: the split and tile
    choice); the caller sums the splits in a fixed order (a torch sum, or ``attention_partials``
    with its epilogue)."""
    B = X.shape[0]
    out = torch.empty(B, plan.splits, C, C, dtype=torch.float32, device=X.device)
    rs = torch.empty(B, plan.splits, C, dtype=torch.float32, device=X.device) if rowsum else out
    abt_partials_kernel[plan.red_grid](
        X, Y, out, rs, C, N, plan.tiles_per_split, plan.n_tiles_red, plan.splits, plan.NB,
        BC=plan.BC, BN=plan.BN_red, ROWSUM=rowsum, PREC=prec, LAYOUT=layout, **plan.options,
    )
    return (out, rs) if rowsum else out
