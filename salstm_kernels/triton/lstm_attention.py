"""Triton SA-LSTM / LSTM-SA last step: cell + QKV formation + channel attention, and its backward.

Shapes (NCHW flattened): ``A (B, 4C, N)`` conv output (gate order i, f, o, g), ``c (B, C, N)``;
or every tensor channels_last (``LAYOUT``, :data:`.lstm_cell.LAYOUTS`: the tile offsets change, the
math does not).
Tokens of the attention are the ``C`` channels, features the ``N`` pixels, so every score matrix is
a tiny ``C x C`` per image and the work is streaming passes over ``N``.

Forward (three launches):

1. ``_cell_qk_scores_kernel`` -- grid ``(SPLITS, B)``; each program walks its share of the N tiles:
   gates, ``c'``, ``h'`` (written), ``Q``, ``K`` in registers (LSTM-SA: ``q = Wq h' + bq`` is a
   ``tl.dot`` on the tile, never written), and accumulates ``Q K^T`` in float32 into its own
   ``(C, C)`` partial.
2. ``P = softmax(scale * sum of the partials)``, float32, one small kernel
   (:mod:`.attention_partials`: splits summed in a fixed order, no float atomics: deterministic).
3. ``_attention_out_kernel`` -- grid ``(N tiles, B)``: ``O = P V`` with ``V`` formed on the fly from
   ``h'`` (LSTM-SA: ``V = h' * (Wv h' + bv)``).

Backward (two passes over N, gates recomputed from ``A`` and ``c``; nothing else saved):

1. ``_scores_grad_kernel`` -- grid ``(SPLITS, B)``: ``dP = dO V^T`` per-split partials; their sum
   and ``dS = P * (dP - rowsum(dP * P)) * scale`` in one small kernel (``C x C``).
2. ``_attention_bwd_kernel`` -- grid ``(SPLITS, B)``: per tile ``dV = P^T dO``, ``dQ = dS K``,
   ``dK = dS^T Q``, the QKV-formation chain rule (LSTM-SA: ``dh' += W^T dq`` by ``tl.dot``, and
   ``dW += dq h'^T``, ``db += sum dq`` into per-split partials, summed by a small kernel per
   ``dW`` / ``db`` triple), then one pointwise pass into
   ``dA`` and ``dc`` honouring the incoming ``dh'``, ``dc'``; with a folded conv bias, each
   tile's ``dA`` summed per gate row too (the bias gradient's partials, summed in torch: no
   separate reduction over ``dA``).

Precision: all math and accumulation in float32.  float32 inputs use ``tl.dot(...,
input_precision="ieee")`` (no TF32, exact parity with the reference) unless a measured launch
setting says "tf32x3" (``Launch.prec``: three TF32 tensor-core products per ``tl.dot``, about
float32's accuracy); float16/bfloat16 inputs use
TF32 tensor cores on float32 operands (more accurate than rounding ``Q, K`` to 16 bits), except the
learned projections' dots (``W h'``, ``W^T dq``), which take the 16-bit weights as stored
(:data:`WEIGHT_DOTS_16BIT`: half the shared memory; every kernel, both directions), and, with
``Launch.dw_apart``, the projection-weight gradients, whose ``dq, dk, dv, h'`` are stored in the
16-bit type before their sums (as the matmul path's are).  float64
is not supported (raises ``TypeError``): use the reference or cpp backend for gradcheck.  Channel counts are padded to a power of two >= 16 with masks (``tl.dot``
needs dims >= 16); any ``N`` works (masks); all batch / channel offsets are 64-bit.

Channel range: these single-pass kernels run for ``C <= 64`` (:data:`FUSED_MAX_CP`); wider ``C``
(any size; the issue's range is 8..256) runs the channel-blocked kernels of
:mod:`.attention_blocked`, whose on-chip footprint does not depend on ``C`` (``(C, C)`` products are
loops over 64-channel blocks) at the cost of float32 ``Q, K, V`` / gradient temporaries and more
passes; from :data:`MATMUL_PRODUCTS_MIN_C` on, the blocked path does its products with a long
output (projections, ``P V`` and their gradients) as library matmuls (:mod:`.attention_matmul`:
cuBLAS, 16-bit tensor cores for 16-bit inputs), its sums over pixels with the split-N Triton kernel
on input-dtype operands, and its pointwise work in the blocked rows kernels.  The single-pass
kernels are kept for ``C <= 64``: fewer launches and no temporaries,
except at ``33 <= C <= 64`` in the directions :data:`PATH_AT_CP64` routes to one of the wide
paths (the float32 SA-LSTM backward, whose single-pass kernel measured 7.5x slower on an H200);
:func:`attention_path` says which path a call takes.
Tile width, split count and warps at those widths come from :data:`GPU_LAUNCH`, measured by
``benchmarks/gpu_tune.py``.
sm_90 compile stats: ``python -m salstm_kernels.triton.sm90_stats``.

Reference: :func:`salstm_kernels.ops.reference_kernels.attention_forward` / ``attention_backward``.
"""
from __future__ import annotations

import os
from typing import Dict, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from . import attention_blocked as blocked
from . import attention_matmul
from .attention_partials import projection_grad_sums, scores_grad_of_partials, softmax_of_partials
from .lstm_cell import (
    bias_args, bias_partials, cell_forward_into, check_cell_shapes, check_dtypes, dense_layout, gate_sums,
    load_lstm_inputs, lstm_state, lstm_state_grads, load_optional_grad, optional_grad, qk_factors, qkv_factor_grads,
    store_gate_sums, store_lstm_grads, weight_dot,
)

_COMBINATIONS = {"linear": 0, "nonlinear": 1, "none": 2}

#: Widest padded channel count of the single-pass kernels.  They keep ``(CP, CP)`` matrices (``S``
#: accumulators, ``P``, ``dS``, the projections) on chip; at ``CP = 128`` several variants need more
#: than the 227 KiB of shared memory an H100 block can have (measured by compiling for sm_90), so
#: wider ``C`` runs the channel-blocked kernels (:mod:`.attention_blocked`).
FUSED_MAX_CP = 64
#: Narrowest ``C`` above the single-pass range whose channel-blocked path does its products with a
#: long output (``P V``,
#: ``dS K``, LSTM-SA's projections and their gradients) as library matmuls (:mod:`.attention_matmul`;
#: cuBLAS on a GPU) instead of blocked Triton dots (the sums over pixels: see
#: ``attention_matmul.SPLIT_N_REDUCTIONS``).  The Triton dots measured slower than eager at
#: ``C = 256`` and faster at ``C = 128`` (H200, ``RESULTS.md``); the matmul form is not yet measured
#: on a GPU.  (At ``33 <= C <= 64`` :data:`PATH_AT_CP64` picks the path per direction instead.)
MATMUL_PRODUCTS_MIN_C = 129
#: Force the number of N splits of the reduction kernels (tests use it to cover 1 and many splits).
SPLITS_OVERRIDE = None
#: Force the N tile width (a power of two >= 16).
BLOCK_N_OVERRIDE = None


class Launch(NamedTuple):
    """One GPU launch setting: N tile, programs per SM of the reductions (``splits_per_sm * SMs``
    programs over the whole batch), warps; the blocked path's reductions take their own N tile.
    ``prec``: the ``tl.dot`` input precision for float32 inputs, "" for the default "ieee" (see the
    module docstring); "tf32x3" (three TF32 tensor-core products, about float32's accuracy) is a
    candidate ``benchmarks/gpu_tune.py`` sweeps.  16-bit inputs take "tf32" on float32 operands (their
    ``prec`` stays ""), the learned projections' dots as :data:`WEIGHT_DOTS_16BIT` says.
    ``dw_apart`` (the single-pass LSTM-SA backward only): the projection-weight gradients
    ``dW = dq h'^T`` summed over pixels by the split-N kernel of the channel-blocked path instead of
    in the kernel's registers, from ``dq, dk, dv, h'`` the kernel stores in the input dtype (float32:
    the same math; 16-bit: rounded first, about twice the ``dW`` error, well inside tolerance; 4 state
    units more traffic and memory; Triton 3.6 sm_90 compiles, C = 64, BN 16: float32 with 8 warps
    spills nothing instead of 292-1304 B, bfloat16 396-500 B instead of 1164-1248 B).  A sweep
    candidate, not yet timed on a GPU."""

    bn: int
    splits_per_sm: float
    num_warps: int
    bn_red: int = 64
    prec: str = ""
    num_stages: int = 0  # software-pipelining depth of the kernels' N loops; 0: Triton's default
    dw_apart: bool = False


def _launch_options(launch: Launch) -> dict:
    """The launch keywords of a plan's kernels: warps, and a pipelining depth where ``launch`` sets one."""
    return dict(num_warps=launch.num_warps, **({"num_stages": launch.num_stages} if launch.num_stages else {}))


#: The padded channel count the launch table was measured at (``33 <= C <= 64``).  Other widths
#: keep the compile-time heuristics of :class:`_Plan` / :class:`_BlockedPlan` and the default path.
TUNED_CP = 64

#: GPU launch settings at :data:`TUNED_CP`, keyed by ``(path, backward, gated, float32)`` with a path
#: of :data:`PATHS`; float16 shares bfloat16's (``float32`` False).  The fastest of a
#: sweep by ``benchmarks/gpu_tune.py`` on an NVIDIA H200 (triton 3.6, B=2, C=64, 224x224; the
#: attention op alone, do_bench median; ``benchmarks/RESULTS.md``): the comment is that time and
#: the compile-time heuristics' time in the same run.  The 16-bit LSTM-SA entries were measured
#: with the projection dots on float32 operands, before :data:`WEIGHT_DOTS_16BIT`.
GPU_LAUNCH: Dict[Tuple[str, bool, bool, bool], "Launch"] = {
    ("single", False, False, False): Launch(16, 2, 4),  # 0.096 ms, was 0.101
    ("single", False, False, True): Launch(16, 4, 4),  # 0.158 ms, was 0.189
    ("single", False, True, False): Launch(32, 2, 4),  # 0.116 ms, was 0.160
    ("single", False, True, True): Launch(16, 2, 4),  # 0.300 ms, was 0.334
    ("single", True, False, False): Launch(16, 2, 4),  # 0.188 ms, was 0.222
    ("blocked", True, False, True): Launch(32, 2, 4, 64),  # 0.390 ms, was 2.948 (single-pass)
    ("single", True, True, False): Launch(16, 2, 4),  # 0.573 ms, was 0.808
    ("single", True, True, True): Launch(16, 1, 8),  # 1.118 ms, was 1.144
}
#: The attention op's kernel paths: ``"single"`` (the single-pass kernels here, ``C <= 64``),
#: ``"blocked"`` (channel-blocked Triton kernels with Triton dots, :mod:`.attention_blocked`) and
#: ``"matmul"`` (the channel-blocked rows kernels with the long-output products as library matmuls,
#: :mod:`.attention_matmul`).
PATHS = ("single", "blocked", "matmul")
#: ``(backward, gated, float32)`` directions that run another path than the single-pass one at
#: :data:`TUNED_CP`, where it measured faster (``benchmarks/gpu_tune.py`` sweeps all three).  The
#: forward and backward are independent given ``P``, so each direction picks its own path.  The
#: float32 SA-LSTM backward: the single-pass kernel took 2.95 ms against 0.39 ms blocked.  Triton
#: 3.6 (the H200's) compiles it to 32 registers and 3 KB of spills at its default pipelining depth,
#: to 80 registers and none at ``num_stages=1`` (``sm90_stats --stages``; Triton 3.9: no spills at
#: any depth), a setting ``benchmarks/gpu_tune.py`` now sweeps first.  The "matmul" path at this
#: width is not yet measured on a GPU.
PATH_AT_CP64: Dict[Tuple[bool, bool, bool], str] = {(True, False, True): "blocked"}


def attention_path(C: int, backward: bool, gated: bool, dtype: torch.dtype) -> str:
    """The path (:data:`PATHS`) one direction of the op takes at ``C`` channels in ``dtype``:
    single-pass up to padded ``C = 64`` except where :data:`PATH_AT_CP64` routes the measured width
    elsewhere; wider, channel-blocked with Triton dots or, from :data:`MATMUL_PRODUCTS_MIN_C` on, with
    library matmuls."""
    CP = _padded(C)
    if CP > FUSED_MAX_CP:
        return "matmul" if C >= MATMUL_PRODUCTS_MIN_C else "blocked"
    if CP == TUNED_CP:
        path = PATH_AT_CP64.get((backward, gated, dtype == torch.float32), "single")
        if path not in PATHS:
            raise ValueError(f"PATH_AT_CP64 routes to one of {PATHS}, got {path!r}")
        return path
    return "single"


def _tuned(A: torch.Tensor, path: str, backward: bool, gated: bool, C: int):
    if A.device.type != "cuda" or _interpreted() or _padded(C) != TUNED_CP:
        return None  # the table holds what was measured: CUDA, padded C = 64
    return GPU_LAUNCH.get((path, backward, gated, A.dtype == torch.float32))


def _splits(A: torch.Tensor, per_sm: float, work_per_split: int) -> int:
    sms = torch.cuda.get_device_properties(A.device).multi_processor_count
    return triton.cdiv(max(1, round(per_sm * sms)), max(work_per_split, 1))


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _tile_offsets(b, t, C, N, CP: tl.constexpr, BN: tl.constexpr, LAYOUT: tl.constexpr):
    """The ``(CP, BN)`` tile's mask, 64-bit offsets into ``A`` (gate i) and ``c``, and the gate
    stride of ``A``; ``LAYOUT`` (``lstm_cell.LAYOUTS``): NCHW, channels_last (channels contiguous
    per pixel), or NCHW with a 64-bit gate stride.  The same offsets as ``attention_blocked._rows_tile``
    with one channel block, but written out: computed through it (another order of the same 64-bit
    sums) the shipped sm_90 kernels spilled more (float32 gated backward 1664 -> 1728 B)."""
    rows = tl.arange(0, CP)
    cols = t * BN + tl.arange(0, BN)
    mask = (rows < C)[:, None] & (cols < N)[None, :]
    if LAYOUT == 1:
        pix = cols[None, :].to(tl.int64)
        a_offs = b * 4 * C * N + pix * (4 * C) + rows[:, None]
        c_offs = b * C * N + pix * C + rows[:, None]
        gs = C
    else:
        plane = rows[:, None].to(tl.int64) * N + cols[None, :]
        a_offs = b * 4 * C * N + plane
        c_offs = b * C * N + plane
        if LAYOUT == 2:
            gs = (b * 0 + C) * N  # 64-bit, as b is
        else:
            gs = C * N
    return mask, a_offs, c_offs, gs


@triton.jit
def _ch(CP: tl.constexpr):
    """The tile's channel of each row, shaped to broadcast over the pixels (for the folded bias)."""
    return tl.arange(0, CP)[:, None]


@triton.jit
def _load_square(ptr, C, CP: tl.constexpr):
    """A ``(C, C)`` row-major matrix as a zero-padded ``(CP, CP)`` float32 tile."""
    rows = tl.arange(0, CP)
    m = (rows < C)[:, None] & (rows < C)[None, :]
    return tl.load(ptr + rows[:, None] * C + rows[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_square(ptr, x, C, CP: tl.constexpr):
    rows = tl.arange(0, CP)
    m = (rows < C)[:, None] & (rows < C)[None, :]
    tl.store(ptr + rows[:, None] * C + rows[None, :], x, mask=m)


@triton.jit
def _load_vec(ptr, C, CP: tl.constexpr):
    rows = tl.arange(0, CP)
    return tl.load(ptr + rows, mask=rows < C, other=0.0).to(tl.float32)


@triton.jit
def _load_weight(ptr, C, CP: tl.constexpr, W16: tl.constexpr):
    """A ``(C, C)`` projection weight as a zero-padded ``(CP, CP)`` tile: in its 16-bit storage type
    (exact) for ``W16`` dots, else float32."""
    w = _load_square(ptr, C, CP)
    if W16:
        w = w.to(ptr.dtype.element_ty)
    return w


@triton.jit
def _project(w, bias, h, PREC: tl.constexpr, W16: tl.constexpr):
    """Per-pixel ``Linear`` over channels on a tile: ``w (CP, CP) @ h (CP, BN) + bias``."""
    return weight_dot(w, h, None, PREC, W16) + bias[:, None]


@triton.jit
def _project_grad(w, d, PREC: tl.constexpr, W16: tl.constexpr):
    """``w^T d``: a projection's input gradient on a tile."""
    return weight_dot(tl.trans(w), d, None, PREC, W16)


# --------------------------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "SPLITS"])
def _cell_qk_scores_kernel(
    a_ptr, c_ptr, h_ptr, cn_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, s_ptr, bias_ptr,
    C, N, tiles_per_split, n_tiles, SPLITS,
    CP: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr = False, W16: tl.constexpr = False,
):
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if GATED:
        wq = _load_weight(wq_ptr, C, CP, W16)
        wk = _load_weight(wk_ptr, C, CP, W16)
        bq = _load_vec(bq_ptr, C, CP)
        bk = _load_vec(bk_ptr, C, CP)
    acc = tl.zeros((CP, CP), dtype=tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        mask, a_offs, c_offs, gs = _tile_offsets(b, t, C, N, CP, BN, LAYOUT)
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, _ch(CP), C, HAS_BIAS)
        i, f, o, g, c_new, tc, h = lstm_state(ai, af, ao, ag, c)
        tl.store(h_ptr + c_offs, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(cn_ptr + c_offs, c_new.to(cn_ptr.dtype.element_ty), mask=mask)
        h = tl.where(mask, h, 0.0)
        if COMB != 2:
            q, k = qk_factors(f, g, c_new, h, COMB)
            if GATED:
                q = q * _project(wq, bq, h, PREC, W16)
                k = k * _project(wk, bk, h, PREC, W16)
        else:
            q = _project(wq, bq, h, PREC, W16)
            k = _project(wk, bk, h, PREC, W16)
        q = tl.where(mask, q, 0.0)
        k = tl.where(mask, k, 0.0)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC)
    _store_square(s_ptr + (b * SPLITS + split) * C * C, acc, C, CP)


@triton.jit
def _attention_out_kernel(
    h_ptr, p_ptr, wv_ptr, bv_ptr, o_ptr, C, N,
    CP: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
    LAYOUT: tl.constexpr, W16: tl.constexpr = False,
):
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    mask, _, c_offs, _ = _tile_offsets(b, t, C, N, CP, BN, LAYOUT)
    h = tl.load(h_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        v = _project(_load_weight(wv_ptr, C, CP, W16), _load_vec(bv_ptr, C, CP), h, PREC, W16)
        if COMB != 2:
            v = h * v
        v = tl.where(mask, v, 0.0)
    else:
        v = h
    p = _load_square(p_ptr + b * C * C, C, CP)
    out = tl.dot(p, v, input_precision=PREC)
    tl.store(o_ptr + c_offs, out.to(o_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "SPLITS"])
def _scores_grad_kernel(
    a_ptr, c_ptr, do_ptr, wv_ptr, bv_ptr, dp_ptr, bias_ptr,
    C, N, tiles_per_split, n_tiles, SPLITS,
    CP: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr = False, W16: tl.constexpr = False,
):
    """Per-split partials of ``dP = dO V^T`` (``V`` recomputed from ``A`` and ``c``)."""
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if GATED:
        wv = _load_weight(wv_ptr, C, CP, W16)
        bv = _load_vec(bv_ptr, C, CP)
    acc = tl.zeros((CP, CP), dtype=tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        mask, a_offs, c_offs, gs = _tile_offsets(b, t, C, N, CP, BN, LAYOUT)
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, _ch(CP), C, HAS_BIAS)
        _, _, _, _, _, _, h = lstm_state(ai, af, ao, ag, c)
        h = tl.where(mask, h, 0.0)
        if GATED:
            v = _project(wv, bv, h, PREC, W16)
            if COMB != 2:
                v = h * v
            v = tl.where(mask, v, 0.0)
        else:
            v = h
        do = tl.load(do_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.dot(do, tl.trans(v), acc, input_precision=PREC)
    _store_square(dp_ptr + (b * SPLITS + split) * C * C, acc, C, CP)


@triton.jit(do_not_specialize=["tiles_per_split", "n_tiles", "SPLITS"])
def _attention_bwd_kernel(
    a_ptr, c_ptr, do_ptr, dh_ptr, dcn_ptr, p_ptr, ds_ptr,
    wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
    da_ptr, dc_ptr, dw_ptr, db_ptr, bias_ptr, dbias_ptr, apart_ptr,
    C, N, tiles_per_split, n_tiles, SPLITS,
    CP: tl.constexpr, BN: tl.constexpr, COMB: tl.constexpr, GATED: tl.constexpr, PREC: tl.constexpr,
    LAYOUT: tl.constexpr, HAS_DH: tl.constexpr = True, HAS_DCN: tl.constexpr = True,
    HAS_BIAS: tl.constexpr = False, W16: tl.constexpr = False, DW_APART: tl.constexpr = False,
):
    """``dV = P^T dO``, ``dQ = dS K``, ``dK = dS^T Q``, QKV chain rule, then ``dA``, ``dc``.

    LSTM-SA also accumulates per-split partials of ``dW = dq h'^T`` and ``db = sum dq`` (q, k, v);
    with ``DW_APART`` it stores ``dq, dk, dv`` and ``h'`` instead (``apart_ptr``: four tensors laid
    out as ``c``, one after another), for sums over pixels done apart (``Launch.dw_apart``): the
    three float32 ``(CP, CP)`` accumulators are what spills most of this kernel's registers.
    ``HAS_BIAS``: the folded conv bias's gradient partials too, ``dA`` summed per gate row into row
    ``b * n_tiles + t`` of ``(B * n_tiles, 4C)`` float32, so no separate pass reads ``dA`` again for
    it.  A row per tile, not sums carried across a split's tiles: compiled for sm_90 the carried
    sums spilled (bfloat16 SA-LSTM: 52 B, none per tile; ``sm90_stats``).
    """
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    p = _load_square(p_ptr + b * C * C, C, CP)
    ds = _load_square(ds_ptr + b * C * C, C, CP)
    if GATED:
        wq = _load_weight(wq_ptr, C, CP, W16)
        wk = _load_weight(wk_ptr, C, CP, W16)
        wv = _load_weight(wv_ptr, C, CP, W16)
        bq = _load_vec(bq_ptr, C, CP)
        bk = _load_vec(bk_ptr, C, CP)
        bv = _load_vec(bv_ptr, C, CP)
        if DW_APART:
            # B C N: one of the four tensors at apart_ptr.  From the grid, not passed in: an argument
            # apart_part = B C N measured more spills (sm_90, Triton 3.9: fp32 8 warps 0 -> 92-172 B,
            # bf16 0-232 -> 8-376 B), its 64-bit value held live through the tile loop
            part = tl.num_programs(1).to(tl.int64) * C * N
        else:
            dwq = tl.zeros((CP, CP), dtype=tl.float32)
            dwk = tl.zeros((CP, CP), dtype=tl.float32)
            dwv = tl.zeros((CP, CP), dtype=tl.float32)
            dbq = tl.zeros((CP,), dtype=tl.float32)
            dbk = tl.zeros((CP,), dtype=tl.float32)
            dbv = tl.zeros((CP,), dtype=tl.float32)
    t0 = split * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0, t1):
        mask, a_offs, c_offs, gs = _tile_offsets(b, t, C, N, CP, BN, LAYOUT)
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, _ch(CP), C, HAS_BIAS)
        i, f, o, g, c_new, tc, h = lstm_state(ai, af, ao, ag, c)
        h = tl.where(mask, h, 0.0)
        # ---- Q, K, V as in the forward
        if COMB != 2:
            fq, fk = qk_factors(f, g, c_new, h, COMB)
        if GATED:
            pq = tl.where(mask, _project(wq, bq, h, PREC, W16), 0.0)
            pk = tl.where(mask, _project(wk, bk, h, PREC, W16), 0.0)
            pv = tl.where(mask, _project(wv, bv, h, PREC, W16), 0.0)
            if COMB != 2:
                q = fq * pq
                k = fk * pk
                v = h * pv
            else:
                q = pq
                k = pk
                v = pv
        else:
            q = fq
            k = fk
            v = h
        q = tl.where(mask, q, 0.0)
        k = tl.where(mask, k, 0.0)
        # ---- attention backward on the tile
        do = tl.load(do_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        dq = tl.dot(ds, k, input_precision=PREC)
        dk = tl.dot(tl.trans(ds), q, input_precision=PREC)
        # ---- QKV formation backward
        dh_t = load_optional_grad(dh_ptr, c_offs, mask, HAS_DH)
        dc_t = load_optional_grad(dcn_ptr, c_offs, mask, HAS_DCN)
        if GATED:
            if COMB != 2:
                dfq = dq * pq
                dfk = dk * pk
                dfv = dv * pv
                dq = dq * fq
                dk = dk * fk
                dv = dv * h
            dq = tl.where(mask, dq, 0.0)
            dk = tl.where(mask, dk, 0.0)
            dv = tl.where(mask, dv, 0.0)
            if DW_APART:
                ty = apart_ptr.dtype.element_ty
                tl.store(apart_ptr + c_offs, dq.to(ty), mask=mask)
                tl.store(apart_ptr + part + c_offs, dk.to(ty), mask=mask)
                tl.store(apart_ptr + 2 * part + c_offs, dv.to(ty), mask=mask)
                tl.store(apart_ptr + 3 * part + c_offs, h.to(ty), mask=mask)
            else:
                ht = tl.trans(h)
                dwq = tl.dot(dq, ht, dwq, input_precision=PREC)
                dwk = tl.dot(dk, ht, dwk, input_precision=PREC)
                dwv = tl.dot(dv, ht, dwv, input_precision=PREC)
                dbq += tl.sum(dq, axis=1)
                dbk += tl.sum(dk, axis=1)
                dbv += tl.sum(dv, axis=1)
            dh_t += _project_grad(wq, dq, PREC, W16)
            dh_t += _project_grad(wk, dk, PREC, W16)
            dh_t += _project_grad(wv, dv, PREC, W16)
        else:
            dfq = dq
            dfk = dk
            dfv = dv
        df = 0.0
        dg = 0.0
        if COMB != 2:
            df, dg, dh_t, dc_t = qkv_factor_grads(f, g, c_new, h, dfq, dfk, dfv, dh_t, dc_t, COMB)
        # ---- cell backward into dA, dc
        dai, daf, dao, dag, dc = lstm_state_grads(i, f, o, g, c, tc, dh_t, dc_t, df, dg)
        store_lstm_grads(da_ptr, dc_ptr, a_offs, c_offs, gs, mask, dai, daf, dao, dag, dc)
        if HAS_BIAS:
            si, sf, so, sg = gate_sums(mask, dai, daf, dao, dag, 1)
            store_gate_sums(dbias_ptr + (b * n_tiles + t) * 4 * C, tl.arange(0, CP), C, si, sf, so, sg)
    if GATED and not DW_APART:
        base = b * SPLITS + split
        _store_square(dw_ptr + (base * 3 + 0) * C * C, dwq, C, CP)
        _store_square(dw_ptr + (base * 3 + 1) * C * C, dwk, C, CP)
        _store_square(dw_ptr + (base * 3 + 2) * C * C, dwv, C, CP)
        rows = tl.arange(0, CP)
        tl.store(db_ptr + (base * 3 + 0) * C + rows, dbq, mask=rows < C)
        tl.store(db_ptr + (base * 3 + 1) * C + rows, dbk, mask=rows < C)
        tl.store(db_ptr + (base * 3 + 2) * C + rows, dbv, mask=rows < C)


# --------------------------------------------------------------------------------------------
# Launch code (the provider contract, see salstm_kernels/ops/providers.py)
# --------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Plan:
    """Tile width, split count and warps for one call."""

    def __init__(self, A: torch.Tensor, B: int, C: int, N: int, backward: bool, gated: bool):
        self.CP = _padded(C)
        tuned = _tuned(A, "single", backward, gated, C)
        launch = tuned or heuristic_launch("single", backward, gated, A.dtype == torch.float32, self.CP)
        if BLOCK_N_OVERRIDE is not None:
            bn = BLOCK_N_OVERRIDE
        elif tuned is not None:
            bn = tuned.bn
        elif _interpreted() or A.device.type != "cuda":
            bn = 16  # small tiles: more tiles per split, so masks and splits get exercised
        else:
            bn = launch.bn
        self.BN = bn
        self.n_tiles = triton.cdiv(N, bn)
        if SPLITS_OVERRIDE is not None:
            splits = SPLITS_OVERRIDE
        elif A.device.type == "cuda":
            splits = _splits(A, launch.splits_per_sm, B)
        else:
            splits = 3
        splits = max(1, min(splits, self.n_tiles))
        self.tiles_per_split = triton.cdiv(self.n_tiles, splits)
        self.splits = triton.cdiv(self.n_tiles, self.tiles_per_split)  # no empty splits
        self.num_warps = launch.num_warps
        self.options = _launch_options(launch)
        self.prec = _precision(A.dtype, tuned)
        self.w16 = gated and _weight_dots_16bit(A.dtype)
        self.dw_apart = gated and backward and launch.dw_apart


def _padded(C: int) -> int:
    return max(16, triton.next_power_of_2(C))


def heuristic_launch(path: str, backward: bool, gated: bool, fp32: bool, CP: int) -> Launch:
    """The GPU launch the plans use without a table entry (padded width ``CP``), chosen by compiling
    for sm_90 and reading ptxas register / spill counts.  Single-pass: ``(CP, BN)`` float32 tiles
    of about 2048 elements forward, 1024 backward (C = 64: BN 32 / 16), 8 warps from CP = 64.
    Blocked: ``(BC, BN)`` rows tiles, BN 16 where float32 "ieee" projection dots need it, and
    ``(BC, BC)`` reduction accumulators over BN 64 loads, 8 warps.  Matmul: the rows kernels only
    stream (:data:`MATMUL_ROWS_BLOCK_N`), the reductions as blocked.

    The float32 SA-LSTM single-pass backward takes pipelining depth 1: at Triton's default depth,
    Triton 3.6 (with CUDA 12.8's ptxas) spills it -- 116 B at CP = 16, 704 B at CP = 32, and at
    CP = 64 3 KB with 32 registers, the kernel run 1 measured 7.5x slower than the blocked one --
    and at depth 1 not at all (``sm90_stats --stages``; Triton 3.9: no spills at either depth, one
    more block per SM at depth 1)."""
    if path == "single":
        return Launch(max(16, min(64, (1024 if backward else 2048) // CP)), 2, 4 if CP <= 32 else 8,
                      num_stages=1 if backward and fp32 and not gated else 0)
    if path == "matmul":
        return Launch(MATMUL_ROWS_BLOCK_N, 2, 8, 64)
    return Launch(16 if gated and fp32 else 32, 2, 8, 64)


#: ``Launch.prec`` values for float32 inputs ("" is the default, "ieee").
FLOAT32_PRECISIONS = ("", "ieee", "tf32x3")


#: 16-bit inputs, LSTM-SA / separated (learned projections): the projection dots (``W h'`` and
#: ``W^T dq``) take ``W`` in its 16-bit storage type (exact: the modules pass the weights in the
#: input dtype) and ``h'`` / ``dq`` rounded to it, as the reference's 16-bit matmuls do; float32
#: accumulation.  One setting for every kernel, both paths and both directions, so a backward's
#: projections round their input as its forward's did (the ``h'`` factor of ``V`` still differs
#: by rounding: the forward reads the stored 16-bit ``h'``, the backward its float32 recomputation).  Why: on float32 operands each ``(C, C)``
#: weight is a float32 tile in shared memory twice (``W`` and ``W^T``); sm_90 compiles
#: (``sm90_stats``, shipped bfloat16 launch, BN 16, 4 warps) of the single-pass gated backward:
#: 168 -> 96 KiB of shared memory, so 2 blocks per SM instead of 1 (registers allow 2), spills
#: 1112 -> 1076 B.  Not yet timed on a GPU: ``gpu_tune.py`` has an A/B module row ("tuned, f32 proj").
WEIGHT_DOTS_16BIT = True


def _precision(dtype: torch.dtype, launch=None) -> str:
    """``tl.dot`` input precision for float32 operands."""
    prec = launch.prec if launch is not None else ""
    if dtype != torch.float32:
        if prec:
            raise ValueError(f"Launch.prec is for float32 entries; a 16-bit entry takes '' (got {prec!r})")
        return "tf32"
    if prec not in FLOAT32_PRECISIONS:
        raise ValueError(f"Launch.prec must be one of {FLOAT32_PRECISIONS} for float32, got {prec!r}")
    return prec or "ieee"


def _weight_dots_16bit(dtype: torch.dtype) -> bool:
    """Whether the projection dots run in the 16-bit storage type (:data:`WEIGHT_DOTS_16BIT`)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreted()):
        return False  # (the Triton interpreter's bfloat16 tl.dot returns garbage: triton 3.9, numpy 2.4)
    return WEIGHT_DOTS_16BIT


def _combination(combination: str, gated: bool) -> int:
    if combination not in _COMBINATIONS:
        raise ValueError(f"combination must be one of {tuple(_COMBINATIONS)}, got {combination!r}")
    if combination == "none" and not gated:
        raise ValueError("combination='none' needs learned projections")
    return _COMBINATIONS[combination]


def _prepare_projections(projections, C: int, device):
    if projections is None:
        return None
    if len(projections) != 6:
        raise ValueError("projections must be (wq, bq, wk, bk, wv, bv)")
    check_dtypes(*projections)
    out = []
    for idx, p in enumerate(projections):
        shape = (C, C) if idx % 2 == 0 else (C,)
        if tuple(p.shape) != shape:
            raise ValueError(f"projection {idx} must have shape {shape}, got {tuple(p.shape)}")
        if p.device != device:
            raise ValueError(f"projection {idx} is on {p.device}, expected {device}")
        out.append(p.contiguous())
    return tuple(out)


def attention_forward(A, c, projections, scale, combination, bias=None):
    check_cell_shapes(A, c)
    check_dtypes(A, c, bias)
    A, c, fmt, layout = dense_layout(A, c)
    B, C = c.shape[:2]
    N = c[0, 0].numel() if B and C else 0
    proj = _prepare_projections(projections, C, A.device)
    gated = proj is not None
    comb = _combination(combination, gated)
    out, h, c_new = (torch.empty_like(c, dtype=A.dtype) for _ in range(3))  # c's layout
    if B == 0 or C == 0 or N == 0:
        P = torch.softmax(torch.zeros(B, C, C, dtype=torch.float32, device=A.device), dim=-1)
        return out, h, c_new, P
    path = attention_path(C, False, gated, A.dtype)
    if path == "matmul":
        plan = _BlockedPlan(A, B, C, N, gated, backward=False, matmul=True)
        return attention_matmul.forward(A, c, proj, scale, comb, layout, out, h, c_new, bias, plan)
    if path == "blocked":
        return _forward_blocked(A, c, proj, scale, comb, layout, out, h, c_new, bias)
    b, has_bias = bias_args(bias, A)
    plan = _Plan(A, B, C, N, backward=False, gated=gated)
    wq, bq, wk, bk, wv, bv = proj if gated else (A,) * 6  # dummies: never read when not GATED
    partials = torch.empty(B, plan.splits, C, C, dtype=torch.float32, device=A.device)
    meta = dict(CP=plan.CP, BN=plan.BN, COMB=comb, GATED=gated, PREC=plan.prec, LAYOUT=layout, W16=plan.w16,
                **plan.options)
    _cell_qk_scores_kernel[(plan.splits, B)](
        A, c, h, c_new, wq, bq, wk, bk, partials, b, C, N, plan.tiles_per_split, plan.n_tiles, plan.splits,
        HAS_BIAS=has_bias, **meta
    )
    P = softmax_of_partials(partials, scale)
    _attention_out_kernel[(plan.n_tiles, B)](h, P, wv, bv, out, C, N, **meta)
    return out, h, c_new, P


def attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h=None, bias=None):
    """``(dA, dc, dprojections or None)``; with a ``bias``, a fourth element: its gradient, float32
    ``(4C,)``, from per-program sums of ``dA`` the kernels write with it.  ``h`` (the forward's
    ``h'``) is not used: the kernels recompute it with the gates."""
    check_cell_shapes(A, c)
    check_dtypes(A, c, dout, dh, dc_new, bias)
    A, c, fmt, layout = dense_layout(A, c)
    has = dict(HAS_DH=dh is not None, HAS_DCN=dc_new is not None)
    dout, dh, dc_new = dout.contiguous(memory_format=fmt), optional_grad(dh, c, fmt), optional_grad(dc_new, c, fmt)
    B, C = c.shape[:2]
    N = c[0, 0].numel() if B and C else 0
    proj = _prepare_projections(projections, C, A.device)
    gated = proj is not None
    comb = _combination(combination, gated)
    if B == 0 or C == 0 or N == 0:
        dproj = tuple(torch.zeros_like(p) for p in proj) if gated else None
        empty = (torch.empty_like(A), torch.empty_like(c), dproj)
        return empty if bias is None else (*empty, bias_partials(0, A).sum(dim=0))
    P = P.to(device=A.device, dtype=torch.float32).contiguous()
    path = attention_path(C, True, gated, A.dtype)
    if path == "matmul":
        plan = _BlockedPlan(A, B, C, N, gated, backward=True, matmul=True)
        return attention_matmul.backward(A, c, proj, P, dout, dh, dc_new, scale, comb, layout, has, bias, plan)
    if path == "blocked":
        return _backward_blocked(A, c, proj, P, dout, dh, dc_new, scale, comb, layout, has, bias)
    dA = torch.empty_like(A)
    dc = torch.empty_like(c)
    b, has["HAS_BIAS"] = bias_args(bias, A)
    plan = _Plan(A, B, C, N, backward=True, gated=gated)
    wq, bq, wk, bk, wv, bv = proj if gated else (A,) * 6
    meta = dict(CP=plan.CP, BN=plan.BN, COMB=comb, GATED=gated, PREC=plan.prec, LAYOUT=layout, W16=plan.w16,
                **plan.options)
    grid = (plan.splits, B)
    dp_partials = torch.empty(B, plan.splits, C, C, dtype=torch.float32, device=A.device)
    _scores_grad_kernel[grid](
        A, c, dout, wv, bv, dp_partials, b, C, N, plan.tiles_per_split, plan.n_tiles, plan.splits,
        HAS_BIAS=has["HAS_BIAS"], **meta
    )
    dS = scores_grad_of_partials(dp_partials, P, scale)
    del dp_partials
    dw = db = apart = A  # dummies: never written when not GATED (dw, db) or not DW_APART (apart)
    if plan.dw_apart:  # dq, dk, dv, h' in c's layout, one after another
        apart = torch.empty((4 * B, *c.shape[1:]), dtype=A.dtype, device=A.device, memory_format=fmt)
    elif gated:
        dw = torch.empty(B * plan.splits, 3, C, C, dtype=torch.float32, device=A.device)
        db = torch.empty(B * plan.splits, 3, C, dtype=torch.float32, device=A.device)
    dbias = bias_partials(B * plan.n_tiles, A) if has["HAS_BIAS"] else A
    _attention_bwd_kernel[grid](
        A, c, dout, dh, dc_new, P, dS, wq, bq, wk, bk, wv, bv, dA, dc, dw, db, b, dbias, apart,
        C, N, plan.tiles_per_split, plan.n_tiles, plan.splits, DW_APART=plan.dw_apart, **meta, **has
    )
    if plan.dw_apart:
        sums = _BlockedPlan(A, B, C, N, gated, backward=True, matmul=True)  # the matmul path's sums over N
        dq, dk, dv, h_new = apart.split(B)
        dproj = _projection_grads(sums, (dq, dk, dv), h_new, C, N, sums.prec, layout, proj)
    else:
        dproj = projection_grad_sums(dw.unbind(1), db.unbind(1), proj) if gated else None
    return (dA, dc, dproj, dbias.sum(dim=0)) if has["HAS_BIAS"] else (dA, dc, dproj)


# --------------------------------------------------------------------------------------------
# Channel-blocked path (C > 64), kernels in attention_blocked.py
# --------------------------------------------------------------------------------------------
#: Channel block of the blocked kernels (rows of every tile, and the reduction chunk of every
#: ``(C, C)`` product).
BLOCK_C = 64


#: N tile of the matmul path's rows kernels on a GPU (:mod:`.attention_matmul`) where the table has no
#: ``("matmul", ...)`` entry: with ``PROJ`` they only stream, so not the blocked path's tile (16 for
#: gated float32, sized for the projection dots).
#: sm_90 (``sm90_stats``, 8 warps): 30-127 registers, no spills, 2-8 blocks per SM at 32; at 64 the
#: backward kernels hold 1 block per SM (fewer elements in flight).
MATMUL_ROWS_BLOCK_N = 32


class _BlockedPlan:
    def __init__(self, A: torch.Tensor, B: int, C: int, N: int, gated: bool, backward: bool, matmul=False):
        self.BC = BLOCK_C
        self.NB = triton.cdiv(C, self.BC)
        gpu = A.device.type == "cuda" and not _interpreted()
        path = "matmul" if matmul else "blocked"
        tuned = _tuned(A, path, backward, gated, C)
        launch = tuned or heuristic_launch(path, backward, gated, A.dtype == torch.float32, _padded(C))
        if BLOCK_N_OVERRIDE is not None:
            self.BN = self.BN_red = BLOCK_N_OVERRIDE
        elif tuned is not None or gpu:
            self.BN, self.BN_red = launch.bn, launch.bn_red
        else:
            self.BN, self.BN_red = 16, 16
        self.n_tiles = triton.cdiv(N, self.BN)
        n_red = triton.cdiv(N, self.BN_red)
        self.n_tiles_red = n_red
        if SPLITS_OVERRIDE is not None:
            splits = SPLITS_OVERRIDE
        elif A.device.type == "cuda":
            splits = _splits(A, launch.splits_per_sm, B * self.NB * self.NB)
        else:
            splits = 3
        splits = max(1, min(splits, n_red))
        self.tiles_per_split = triton.cdiv(n_red, splits)
        self.splits = triton.cdiv(n_red, self.tiles_per_split)
        self.rows_grid = (self.n_tiles, self.NB, B)
        self.red_grid = (self.NB * self.NB, self.splits, B)
        self.num_warps = launch.num_warps
        self.options = _launch_options(launch)
        self.prec = _precision(A.dtype, tuned)
        self.w16 = gated and _weight_dots_16bit(A.dtype)


def _projection_grads(plan, dqkv, h, C, N, prec, layout, proj):
    """LSTM-SA's projection gradients from the gradients on the projections ``dq, dk, dv`` and ``h'``:
    ``dW = d h'^T`` and ``db = sum d`` per split by the split-N kernel, the splits summed in order."""
    dw, db = zip(*(blocked.outer_partials(plan, d, h, C, N, prec, layout, rowsum=True) for d in dqkv))
    return projection_grad_sums(dw, db, proj)


def _mm(plan, M, X, out, C, N, prec, layout, trans=False):
    blocked.mm_rows_kernel[plan.rows_grid](M, X, out, C, N, TRANS=trans, BC=plan.BC, BN=plan.BN, PREC=prec,
                                           LAYOUT=layout, **plan.options)
    return out


def _fp32_like(c):
    return torch.empty_like(c, dtype=torch.float32)  # c's layout: one offset scheme per kernel


def _forward_blocked(A, c, proj, scale, comb, layout, out, h, c_new, bias):
    """C > 64 (or routed here by PATH_AT_CP64), non-empty; writes the outputs attention_forward allocated."""
    B, C = c.shape[:2]
    N = c[0, 0].numel()
    gated = proj is not None
    plan = _BlockedPlan(A, B, C, N, gated, backward=False)
    prec = plan.prec
    wq, bq, wk, bk, wv, bv = proj if gated else (A,) * 6  # dummies: never read when not GATED
    Q, K = _fp32_like(c), _fp32_like(c)
    V = _fp32_like(c) if gated else h
    if gated:  # the projections read h' of every channel block: write it first
        cell_forward_into(A, c, h, c_new, layout, bias)
    b, has_bias = bias_args(bias, A)
    blocked.qkv_rows_kernel[plan.rows_grid](
        A, c, h, wq, bq, wk, bk, wv, bv, A, A, A, Q, K, V, h, c_new, b, C, N,
        BC=plan.BC, BN=plan.BN, COMB=comb, GATED=gated, WRITE_STATE=not gated, PREC=prec, LAYOUT=layout,
        HAS_BIAS=has_bias, W16=plan.w16, **plan.options,
    )
    P = softmax_of_partials(blocked.outer_partials(plan, Q, K, C, N, prec, layout), scale)
    del Q, K
    _mm(plan, P, V, out, C, N, prec, layout)
    return out, h, c_new, P


def _backward_blocked(A, c, proj, P, dout, dh, dc_new, scale, comb, layout, has, bias):
    """C > 64 (or routed here by PATH_AT_CP64), non-empty, P float32; ``bias``: the folded conv
    bias or None.  ``dA``, ``dc`` are allocated only for the last kernel, once the float32
    temporaries are down to ``dQ, dK, dV``: 5 state units fewer alive while they peak."""
    B, C = c.shape[:2]
    N = c[0, 0].numel()
    gated = proj is not None
    plan = _BlockedPlan(A, B, C, N, gated, backward=True)
    prec = plan.prec
    wq, bq, wk, bk, wv, bv = proj if gated else (A,) * 6
    b, has_bias = bias_args(bias, A)
    has = {**has, "HAS_BIAS": has_bias}
    # recompute h' (float32) and Q, K, V once, as float32 temporaries
    h32, c32 = _fp32_like(c), _fp32_like(c)
    Q, K = _fp32_like(c), _fp32_like(c)
    V = _fp32_like(c) if gated else h32
    if gated:
        cell_forward_into(A, c, h32, c32, layout, bias)
    blocked.qkv_rows_kernel[plan.rows_grid](
        A, c, h32, wq, bq, wk, bk, wv, bv, A, A, A, Q, K, V, h32, c32, b, C, N,
        BC=plan.BC, BN=plan.BN, COMB=comb, GATED=gated, WRITE_STATE=not gated, PREC=prec, LAYOUT=layout,
        HAS_BIAS=has["HAS_BIAS"], W16=plan.w16, **plan.options,
    )
    del c32
    dP_partials = blocked.outer_partials(plan, dout, V, C, N, prec, layout)
    del V
    if not gated:
        del h32  # only the projection gradients read it again: at most 4 (B, C, N) float32 live
    dS = scores_grad_of_partials(dP_partials, P, scale)
    del dP_partials
    dQ = _mm(plan, dS, K, _fp32_like(c), C, N, prec, layout)
    dK = _mm(plan, dS, Q, _fp32_like(c), C, N, prec, layout, trans=True)
    del Q, K
    dV = _mm(plan, P, dout, _fp32_like(c), C, N, prec, layout, trans=True)
    dproj = None
    if gated:
        dq, dk, dv = _fp32_like(c), _fp32_like(c), _fp32_like(c)
        blocked.proj_grad_rows_kernel[plan.rows_grid](
            A, c, h32, wq, bq, wk, bk, wv, bv, A, A, A, dQ, dK, dV, dq, dk, dv, b, C, N,
            BC=plan.BC, BN=plan.BN, COMB=comb, PREC=prec, LAYOUT=layout, HAS_BIAS=has["HAS_BIAS"], W16=plan.w16,
            **plan.options,
        )  # dQ, dK, dV now hold the gradients on the LSTM-state factors
        dproj = _projection_grads(plan, (dq, dk, dv), h32, C, N, prec, layout, proj)
        del h32  # the last kernel does not read it
    else:
        dq = dk = dv = dQ  # dummies: never read when not GATED
    dA, dc = torch.empty_like(A), torch.empty_like(c)
    dbias = bias_partials(B * plan.n_tiles, A) if has_bias else dA
    blocked.attention_bwd_rows_kernel[plan.rows_grid](
        A, c, dh, dc_new, dQ, dK, dV, dq, dk, dv, wq, wk, wv, A, dA, dc, b, dbias, C, N,
        BC=plan.BC, BN=plan.BN, COMB=comb, GATED=gated, PREC=prec, LAYOUT=layout, W16=plan.w16,
        **plan.options, **has,
    )
    return (dA, dc, dproj, dbias.sum(dim=0)) if has_bias else (dA, dc, dproj)
