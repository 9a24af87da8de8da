"""Triton ConvLSTM cell: gates + state update from the conv output ``A``, and its backward.

Forward: ``A (B, 4C, N)`` (gate order i, f, o, g) and ``c (B, C, N)`` -> ``h', c'``.
Backward: recomputes the gates from ``A`` and ``c`` (nothing else is saved) -> ``dA, dc``.
From a zero state (:mod:`salstm_kernels.ops.lstm_cell_zero_state`) the same kernels run with
``GATES = 3``: ``A (B, 3C, N)`` holds rows i, o, g; neither ``f`` nor ``c`` is read, no ``dc`` written.  With
a folded conv bias it runs tiles whose channels are known instead -- NCHW: a block of one (image,
channel) plane (``_cell_bwd_plane_kernel``); channels_last: a block of pixels x all channels
(``_cell_bwd_pixels_kernel``) -- and each program also sums its ``dA`` per gate and channel: the
bias gradient's partials, summed by torch (no separate pass over ``dA``).

Layout (:mod:`salstm_kernels.ops.layout`): NCHW, or channels_last when ``A`` is (every state
tensor and ``dA`` then channels_last too).  Both are "``G`` consecutive values of one gate, then
the next gate": ``G = C*N`` in NCHW (a gate's plane per image), ``G = C`` channels_last (a gate's
channels per pixel), so one kernel serves both with ``G`` as an argument.
Reference: :func:`salstm_kernels.ops.reference_kernels.cell_forward` / ``cell_backward``.

The ``@triton.jit`` helpers here (``tanh``, ``lstm_state``, ``lstm_state_grads``) are shared with
:mod:`salstm_kernels.triton.lstm_attention`, whose fused kernels do the same gate math on tiles.
All math is float32 whatever the storage dtype; offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.layout import layout_of

# --------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def tanh(x):
    """``tanh`` from ``exp`` (no libdevice: the Triton interpreter cannot run it); no overflow.
    Below ``|x| = 0.3`` an odd Taylor polynomial to ``x^9`` (truncation 5e-8 relative): there
    ``(1 - t) / (1 + t)`` cancels (``t = exp(-2|x|)`` near 1; 3e-3 relative error at ``|x| = 1e-5``,
    where a saturated input gate leaves ``c'``)."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    y = (1.0 - t) / (1.0 + t)
    s = x * x
    p = x * (1.0 + s * (-1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0)))))
    return tl.where(ax < 0.3, p, tl.where(x >= 0, y, -y))


@triton.jit
def load_gate(a_ptr, offs, mask, bias_ptr, row, ch, C, HAS_BIAS: tl.constexpr):
    """One gate's pre-activations as float32 at ``offs``; with ``HAS_BIAS``, plus bias row ``row``
    (``bias[row * C + ch]``; ``ch`` shaped to broadcast against the tile)."""
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a += tl.load(bias_ptr + row * C + ch, mask=ch < C, other=0.0).to(tl.float32)
    return a


@triton.jit
def load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gate_stride, mask, bias_ptr, ch, C, HAS_BIAS: tl.constexpr):
    """Pre-activations ``(Ai, Af, Ao, Ag)`` and ``c`` as float32.

    ``a_offs`` point at gate ``i`` in ``A``; the other gates are ``gate_stride`` apart (``C*N`` NCHW,
    ``C`` channels_last; a 64-bit scalar where ``3 * gate_stride`` passes 2^31, see :data:`LAYOUTS`).
    ``HAS_BIAS``: ``A`` came from a conv run without its bias; the bias ``(4C,)`` (gate order i, f,
    o, g) is added here, at channels ``ch`` (shaped to broadcast against the tile) -- this saves the
    separate broadcast add PyTorch runs after a cuDNN conv (a read and write of ``A``).
    """
    # (the four loads, then the four bias loads: this order gives the shipped sm_90 attention
    # kernels fewer spills than load_gate per gate -- 224 against 588 B in the bfloat16 gated
    # cell_qk_scores, sm90_stats)
    ai = tl.load(a_ptr + a_offs, mask=mask, other=0.0).to(tl.float32)
    af = tl.load(a_ptr + gate_stride + a_offs, mask=mask, other=0.0).to(tl.float32)
    ao = tl.load(a_ptr + 2 * gate_stride + a_offs, mask=mask, other=0.0).to(tl.float32)
    ag = tl.load(a_ptr + 3 * gate_stride + a_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bm = ch < C
        ai += tl.load(bias_ptr + ch, mask=bm, other=0.0).to(tl.float32)
        af += tl.load(bias_ptr + C + ch, mask=bm, other=0.0).to(tl.float32)
        ao += tl.load(bias_ptr + 2 * C + ch, mask=bm, other=0.0).to(tl.float32)
        ag += tl.load(bias_ptr + 3 * C + ch, mask=bm, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    return ai, af, ao, ag, c


@triton.jit
def lstm_state(ai, af, ao, ag, c):
    """Gates ``i, f, o, g``, ``c' = f c + i g``, ``tanh(c')`` and ``h' = o tanh(c')``."""
    i = tl.sigmoid(ai)
    f = tl.sigmoid(af)
    o = tl.sigmoid(ao)
    g = tanh(ag)
    c_new = f * c + i * g
    tc = tanh(c_new)
    return i, f, o, g, c_new, tc, o * tc


@triton.jit
def lstm_state_grads(i, f, o, g, c, tc, dh, dc_new, df, dg):
    """``dAi, dAf, dAo, dAg, dc`` from total grads on ``h', c'`` plus extra grads on ``f, g``."""
    dct = dc_new + dh * o * (1.0 - tc * tc)
    dai = dct * g * i * (1.0 - i)
    daf = (dct * c + df) * f * (1.0 - f)
    dao = dh * tc * o * (1.0 - o)
    dag = (dct * i + dg) * (1.0 - g * g)
    return dai, daf, dao, dag, dct * f


@triton.jit
def qk_factors(f, g, c_new, h, COMB: tl.constexpr):
    """LSTM-state factors of paper eq. 4 for Q and K (``COMB`` 0 linear, 1 nonlinear)."""
    if COMB == 0:
        fq = (f + c_new) * 0.5
        fk = (g + h) * 0.5
    else:  # relu keeping NaN, as torch.relu (tl.maximum's default drops it: maxnum)
        fq = tl.maximum(f * c_new, 0.0, propagate_nan=tl.PropagateNan.ALL)
        fk = tl.maximum(g * h, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return fq, fk


@triton.jit
def qkv_factor_grads(f, g, c_new, h, dfq, dfk, dfv, dh, dc_new, COMB: tl.constexpr):
    """Chain rule through the QKV factors of paper eq. 4 (``COMB`` 0 linear, 1 nonlinear).

    ``dfq, dfk, dfv`` are the grads on the factors; returns ``df, dg`` and the totals on ``h', c'``.
    """
    if COMB == 0:  # ((f + c')/2, (g + h')/2, h')
        df = dfq * 0.5
        dc_new += dfq * 0.5
        dg = dfk * 0.5
        dh += dfk * 0.5 + dfv
    else:  # (relu(f c'), relu(g h'), h'), in autograd's order: relu's backward (zero where
        # x <= 0; a NaN x or gradient passes), then the product's -- so 0 * inf is NaN there too
        gq = tl.where(f * c_new <= 0, 0.0, dfq)
        gk = tl.where(g * h <= 0, 0.0, dfk)
        df = gq * c_new
        dc_new += gq * f
        dg = gk * h
        dh += gk * g + dfv
    return df, dg, dh, dc_new


@triton.jit
def store_lstm_grads(da_ptr, dc_ptr, a_offs, c_offs, gate_stride, mask, dai, daf, dao, dag, dc):
    """Write ``dA`` (gate rows i, f, o, g ``gate_stride`` apart) and ``dc`` in the outputs' dtypes."""
    ty = da_ptr.dtype.element_ty
    tl.store(da_ptr + a_offs, dai.to(ty), mask=mask)
    tl.store(da_ptr + a_offs + gate_stride, daf.to(ty), mask=mask)
    tl.store(da_ptr + a_offs + 2 * gate_stride, dao.to(ty), mask=mask)
    tl.store(da_ptr + a_offs + 3 * gate_stride, dag.to(ty), mask=mask)
    tl.store(dc_ptr + c_offs, dc.to(dc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_sums(mask, dai, daf, dao, dag, AXIS: tl.constexpr):
    """A tile's ``dA`` summed over its pixel axis ``AXIS``, per gate: its share of the folded conv
    bias's gradient.  Masked-out elements count as zero."""
    si = tl.sum(tl.where(mask, dai, 0.0), axis=AXIS)
    sf = tl.sum(tl.where(mask, daf, 0.0), axis=AXIS)
    so = tl.sum(tl.where(mask, dao, 0.0), axis=AXIS)
    sg = tl.sum(tl.where(mask, dag, 0.0), axis=AXIS)
    return si, sf, so, sg


@triton.jit
def store_gate_sums(ptr, ch, C, si, sf, so, sg):
    """Per-gate sums of channels ``ch`` (a vector, or one channel) into one ``(4C,)`` float32 row of
    bias-gradient partials (gate order i, f, o, g: the bias's)."""
    m = ch < C
    tl.store(ptr + ch, si, mask=m)
    tl.store(ptr + C + ch, sf, mask=m)
    tl.store(ptr + 2 * C + ch, so, mask=m)
    tl.store(ptr + 3 * C + ch, sg, mask=m)


@triton.jit
def load_cell_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, ch, C, HAS_BIAS: tl.constexpr,
                     GATES: tl.constexpr):
    """:func:`load_lstm_inputs` for the cell kernels.  ``GATES == 3``: a zero state -- ``A`` holds rows
    i, o, g (``gs`` apart; bias ``(3C,)`` likewise); ``f`` and ``c`` come back as zeros, unread
    (``f`` only ever multiplies ``c``)."""
    if GATES == 4:
        ai, af, ao, ag, c = load_lstm_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, ch, C, HAS_BIAS)
    else:
        ai = load_gate(a_ptr, a_offs, mask, bias_ptr, 0, ch, C, HAS_BIAS)
        ao = load_gate(a_ptr + gs, a_offs, mask, bias_ptr, 1, ch, C, HAS_BIAS)
        ag = load_gate(a_ptr + 2 * gs, a_offs, mask, bias_ptr, 2, ch, C, HAS_BIAS)
        af = tl.zeros_like(ai)
        c = tl.zeros_like(ai)
    return ai, af, ao, ag, c


@triton.jit
def store_cell_grads(da_ptr, dc_ptr, a_offs, c_offs, gs, mask, dai, daf, dao, dag, dc, GATES: tl.constexpr):
    """:func:`store_lstm_grads`; ``GATES == 3``: rows i, o, g of ``dA`` only (no ``f`` row, no ``dc``)."""
    if GATES == 4:
        store_lstm_grads(da_ptr, dc_ptr, a_offs, c_offs, gs, mask, dai, daf, dao, dag, dc)
    else:
        ty = da_ptr.dtype.element_ty
        tl.store(da_ptr + a_offs, dai.to(ty), mask=mask)
        tl.store(da_ptr + a_offs + gs, dao.to(ty), mask=mask)
        tl.store(da_ptr + a_offs + 2 * gs, dag.to(ty), mask=mask)


@triton.jit
def store_cell_gate_sums(ptr, ch, C, si, sf, so, sg, GATES: tl.constexpr):
    """:func:`store_gate_sums` into a row of ``GATES * C`` partials (``GATES == 3``: i, o, g)."""
    if GATES == 4:
        store_gate_sums(ptr, ch, C, si, sf, so, sg)
    else:
        m = ch < C
        tl.store(ptr + ch, si, mask=m)
        tl.store(ptr + C + ch, so, mask=m)
        tl.store(ptr + 2 * C + ch, sg, mask=m)


# --------------------------------------------------------------------------------------------
# Kernels: one program per BLOCK elements of the state in memory order
# --------------------------------------------------------------------------------------------


@triton.jit
def gate_stride_of(G, LAYOUT: tl.constexpr):
    """The gate stride as the kernels compute with it: 64-bit for ``LAYOUT == 2`` (see :data:`LAYOUTS`)."""
    if LAYOUT == 2:
        gs = G.to(tl.int64)
    else:
        gs = G
    return gs  # one return: the compiler types every return statement, even in a branch it drops


@triton.jit
def _gate_i_offsets(idx, G, GATES: tl.constexpr):
    """Offset in ``A`` of gate ``i`` for state element ``idx``: each run of ``G`` state values
    (an image's plane in NCHW, a pixel's channels channels_last) sits in a run of ``GATES * G`` in ``A``."""
    return idx + (idx // G) * ((GATES - 1) * G)


@triton.jit
def _channel(idx, G, PIX):
    """Channel of state element ``idx``: ``G`` values per gate run, ``PIX`` pixels per channel in it
    (NCHW: ``G = C N``, ``PIX = N``; channels_last: ``G = C``, ``PIX = 1``)."""
    return (idx % G) // PIX


@triton.jit
def _cell_fwd_kernel(a_ptr, c_ptr, h_ptr, cn_ptr, bias_ptr, G, PIX, total, BLOCK: tl.constexpr,
                     LAYOUT: tl.constexpr, HAS_BIAS: tl.constexpr = False, GATES: tl.constexpr = 4):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    G = gate_stride_of(G, LAYOUT)
    a_offs = _gate_i_offsets(idx, G, GATES)
    ai, af, ao, ag, c = load_cell_inputs(a_ptr, c_ptr, a_offs, idx, G, mask, bias_ptr, _channel(idx, G, PIX),
                                         G // PIX, HAS_BIAS, GATES)
    _, _, _, _, c_new, _, h = lstm_state(ai, af, ao, ag, c)
    tl.store(h_ptr + idx, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(cn_ptr + idx, c_new.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def weight_dot(w, x, acc, PREC: tl.constexpr, W16: tl.constexpr):
    """``acc + w @ x`` (``acc`` None: ``w @ x``) with a learned projection's weight tile ``w``: for
    ``W16`` (``lstm_attention.WEIGHT_DOTS_16BIT``) ``w`` is in its 16-bit storage type and ``x`` is
    rounded to it, float32 accumulation; else float32 operands at input precision ``PREC``."""
    # (one return after the branches: with a return in each, the sm_90 compile fails -- triton 3.9)
    if W16:
        out = tl.dot(w, x.to(w.dtype), acc)
    else:
        out = tl.dot(w, x, acc, input_precision=PREC)
    return out


@triton.jit
def load_optional_grad(ptr, offs, mask, PRESENT: tl.constexpr):
    """A gradient tile as float32; zero without a read when the gradient is absent (PRESENT False)."""
    if PRESENT:
        g = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros_like(mask).to(tl.float32)
    return g


@triton.jit
def cell_grads_into(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, a_offs, c_offs, gs, mask, bias_ptr, ch, C,
                    HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr, HAS_DCN: tl.constexpr, GATES: tl.constexpr):
    """The cell backward at given offsets: gates recomputed from ``A`` (+ bias) and ``c``, ``dA``
    and ``dc`` written; returns ``dA``'s four gate values (for the bias gradient's sums).
    ``GATES == 3``: from a zero state (see :func:`load_cell_inputs`), no ``dc``."""
    ai, af, ao, ag, c = load_cell_inputs(a_ptr, c_ptr, a_offs, c_offs, gs, mask, bias_ptr, ch, C, HAS_BIAS, GATES)
    i, f, o, g, _, tc, _ = lstm_state(ai, af, ao, ag, c)
    dh = load_optional_grad(dh_ptr, c_offs, mask, HAS_DH)
    dcn = load_optional_grad(dcn_ptr, c_offs, mask, HAS_DCN)
    dai, daf, dao, dag, dc = lstm_state_grads(i, f, o, g, c, tc, dh, dcn, 0.0, 0.0)
    store_cell_grads(da_ptr, dc_ptr, a_offs, c_offs, gs, mask, dai, daf, dao, dag, dc, GATES)
    return dai, daf, dao, dag


@triton.jit
def _cell_bwd_kernel(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, G, total, BLOCK: tl.constexpr,
                     LAYOUT: tl.constexpr, HAS_DH: tl.constexpr, HAS_DCN: tl.constexpr, GATES: tl.constexpr = 4):
    """Without a bias (with one, the plane / pixel kernels below also sum the bias gradient)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < total
    G = gate_stride_of(G, LAYOUT)
    cell_grads_into(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, _gate_i_offsets(idx, G, GATES), idx, G, mask, a_ptr,
                    idx, G, False, HAS_DH, HAS_DCN, GATES)


@triton.jit
def _cell_bwd_plane_kernel(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, bias_ptr, dbias_ptr, C, N, n_chunks,
                           BLOCK: tl.constexpr, HAS_DH: tl.constexpr, HAS_DCN: tl.constexpr, GATES: tl.constexpr = 4):
    """NCHW with the conv bias folded in: ``_cell_bwd_kernel``'s math, one program per ``BLOCK``
    pixels of one (image, channel) plane, so each program also sums its ``dA`` per gate -- the bias
    gradient's partials, row ``b * n_chunks + chunk`` of a ``(B * n_chunks, GATES * C)`` float32 tensor --
    instead of a separate reduction reading all of ``dA`` again.  Offsets are 64-bit."""
    pid = tl.program_id(0).to(tl.int64)
    plane = pid // n_chunks  # b * C + channel
    chunk = pid % n_chunks
    b = plane // C
    ch = plane % C
    pix = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = pix < N
    c_offs = plane * N + pix
    a_offs = (plane + (GATES - 1) * b * C) * N + pix  # (b * GATES C + ch) * N
    gs = (b * 0 + C) * N
    dai, daf, dao, dag = cell_grads_into(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, a_offs, c_offs, gs, mask,
                                         bias_ptr, ch, C, True, HAS_DH, HAS_DCN, GATES)
    si, sf, so, sg = gate_sums(mask, dai, daf, dao, dag, 0)
    store_cell_gate_sums(dbias_ptr + (b * n_chunks + chunk) * GATES * C, ch, C, si, sf, so, sg, GATES)


@triton.jit
def _cell_bwd_pixels_kernel(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, bias_ptr, dbias_ptr, C, n_pixels,
                            BP: tl.constexpr, CP: tl.constexpr, HAS_DH: tl.constexpr, HAS_DCN: tl.constexpr,
                            GATES: tl.constexpr = 4):
    """channels_last with the conv bias folded in: ``_cell_bwd_kernel``'s math on a tile of ``BP``
    pixels x all ``C`` channels (padded to ``CP``), so each program also sums its ``dA`` per gate
    and channel over its pixels -- row ``pid`` of the bias gradient's ``(programs, GATES * C)``
    float32 partials.  Pixels of every image in a row (``B * N`` of them); offsets are 64-bit."""
    pid = tl.program_id(0).to(tl.int64)
    pix = pid * BP + tl.arange(0, BP)
    ch = tl.arange(0, CP)
    mask = (pix < n_pixels)[:, None] & (ch < C)[None, :]
    c_offs = pix[:, None] * C + ch[None, :]
    a_offs = pix[:, None] * (GATES * C) + ch[None, :]
    dai, daf, dao, dag = cell_grads_into(a_ptr, c_ptr, dh_ptr, dcn_ptr, da_ptr, dc_ptr, a_offs, c_offs, C, mask,
                                         bias_ptr, ch[None, :], C, True, HAS_DH, HAS_DCN, GATES)
    si, sf, so, sg = gate_sums(mask, dai, daf, dao, dag, 0)
    store_cell_gate_sums(dbias_ptr + pid * GATES * C, ch, C, si, sf, so, sg, GATES)


# --------------------------------------------------------------------------------------------
# Launch code (the provider contract, see salstm_kernels/ops/providers.py)
# --------------------------------------------------------------------------------------------
_BLOCK = 1024
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(*tensors: torch.Tensor) -> None:
    """The Triton provider computes in float32 for float32/float16/bfloat16 storage only."""
    for t in tensors:
        if t is not None and t.dtype not in _SUPPORTED:
            raise TypeError(
                f"salstm_kernels triton backend supports float32, float16 and bfloat16 tensors, got {t.dtype}; "
                "use backend='reference' (or 'cpp') for float64, e.g. for gradcheck"
            )


def check_cell_shapes(A: torch.Tensor, c: torch.Tensor) -> None:
    if A.dim() < 3 or c.dim() != A.dim() or A.shape[0] != c.shape[0] or A.shape[1] != 4 * c.shape[1] \
            or A.shape[2:] != c.shape[2:]:
        raise ValueError(f"expected A (B, 4C, ...) and c (B, C, ...), got {tuple(A.shape)} and {tuple(c.shape)}")
    if A.device != c.device:
        raise ValueError(f"A and c on different devices: {A.device} and {c.device}")


def _block(total: int) -> int:
    return min(_BLOCK, max(16, triton.next_power_of_2(total)))


#: The kernels' ``LAYOUT`` constexpr: the tensors' layout, and the width of the NCHW gate stride.
#: 0: NCHW; 1: channels_last (gate stride ``C``); 2: NCHW with a 64-bit gate stride -- one image's
#: ``3 C N`` passes 2^31, which 32-bit gate offsets would wrap.  2 is its own variant because
#: 64-bit strides everywhere cost registers (sm_90: more spills in the single-pass backward).
LAYOUTS = {"nchw": 0, "channels_last": 1, "nchw_wide": 2}


def dense_layout(A: torch.Tensor, c: torch.Tensor):
    """``(A, c, fmt, layout)``: both dense in the layout the kernels run in -- channels_last when
    ``A`` is channels_last per image (the provider contract), else NCHW; no copy when they already
    are -- and the kernels' ``LAYOUT`` code for them (:data:`LAYOUTS`)."""
    fmt = layout_of(A) if A.dim() == 4 else torch.contiguous_format
    A, c = A.contiguous(memory_format=fmt), c.contiguous(memory_format=fmt)
    if fmt == torch.channels_last:
        return A, c, fmt, LAYOUTS["channels_last"]
    wide = 3 * c[:1].numel() >= 2**31  # one image's C N (none for B = 0)
    return A, c, fmt, LAYOUTS["nchw_wide" if wide else "nchw"]


def gate_stride(c: torch.Tensor, layout: int) -> int:
    """Distance between a value of gate ``i`` and the same value of gate ``f`` in ``A``."""
    return c.shape[1] if layout == LAYOUTS["channels_last"] else c[0].numel()


def _pixels_per_channel_run(c: torch.Tensor, layout: int) -> int:
    """``PIX`` of :func:`_channel`: consecutive state values of one channel in memory."""
    return 1 if layout == LAYOUTS["channels_last"] else c[0, 0].numel()


def check_bias(bias, A: torch.Tensor) -> None:
    """The folded conv bias: one per row of ``A`` (``4C``; ``3C`` from a zero state), with ``A``'s
    dtype and device (the op layer checks it with its argument names; this guards direct provider
    calls)."""
    if bias is not None and (tuple(bias.shape) != (A.shape[1],) or bias.dtype != A.dtype or bias.device != A.device):
        raise ValueError(f"bias must be ({A.shape[1]},) {A.dtype} on {A.device}, got {tuple(bias.shape)} "
                         f"{bias.dtype} on {bias.device}")


def bias_args(bias, A: torch.Tensor):
    """``(bias tensor or a never-read dummy, HAS_BIAS)`` for a kernel launch."""
    check_bias(bias, A)
    return (A, False) if bias is None else (bias.contiguous(), True)


def bias_partials(rows: int, A: torch.Tensor) -> torch.Tensor:
    """The folded conv bias's gradient partials: ``(rows, A.shape[1])`` float32, one row per program (or
    tile) of a backward kernel, each written once (``store_gate_sums``); the gradient is their sum
    over rows, fixed order, no atomics (zeros for no rows)."""
    return torch.empty(rows, A.shape[1], dtype=torch.float32, device=A.device)


def cell_forward_into(A: torch.Tensor, c, h: torch.Tensor, c_new: torch.Tensor, layout: int, bias=None) -> None:
    """``h', c'`` into given dense tensors of ``A``'s layout (any supported dtype, e.g. float32
    temporaries); ``layout`` from :func:`dense_layout`; ``bias`` the conv bias folded in (or None).
    ``c`` None: from a zero state, ``A`` holding rows i, o, g (``GATES = 3``)."""
    total = h.numel()
    if total == 0:
        return
    block = _block(total)
    b, has_bias = bias_args(bias, A)
    _cell_fwd_kernel[(triton.cdiv(total, block),)](A, A if c is None else c, h, c_new, b, gate_stride(h, layout),
                                                   _pixels_per_channel_run(h, layout), total, BLOCK=block,
                                                   LAYOUT=layout, HAS_BIAS=has_bias, GATES=3 if c is None else 4)


def cell_forward(A: torch.Tensor, c: torch.Tensor, bias=None):
    check_cell_shapes(A, c)
    check_dtypes(A, c, bias)
    A, c, fmt, layout = dense_layout(A, c)
    h = torch.empty_like(c, dtype=A.dtype)
    c_new = torch.empty_like(c, dtype=A.dtype)
    cell_forward_into(A, c, h, c_new, layout, bias)
    return h, c_new


def zero_state_layout(A: torch.Tensor):
    """:func:`dense_layout` for a zero-state ``A (B, 3C, ...)``: ``(A, state, fmt, layout)`` with
    ``state`` a ``(B, C, ...)`` meta tensor of ``A``'s dtype in that layout -- the state's shape and
    strides, no memory."""
    if A.dim() < 3 or A.shape[1] % 3 or A.shape[1] == 0:
        raise ValueError(f"expected A (B, 3C, ...) with rows i, o, g, got {tuple(A.shape)}")
    shape = (A.shape[0], A.shape[1] // 3, *A.shape[2:])
    fmt = layout_of(A) if A.dim() == 4 else torch.contiguous_format
    state = torch.empty(shape, dtype=A.dtype, device="meta", memory_format=fmt)
    A, _, fmt, layout = dense_layout(A, state)
    return A, state, fmt, layout


def cell_zero_state_forward(A: torch.Tensor, bias=None):
    """``(h', c')`` from a zero state: ``A (B, 3C, ...)`` rows i, o, g (``c' = i g``)."""
    check_dtypes(A, bias)
    A, state, fmt, layout = zero_state_layout(A)
    # (torch.empty, not empty_like of the meta tensor: that one goes through Python refs, 80 us)
    h, c_new = (torch.empty(state.shape, dtype=A.dtype, device=A.device, memory_format=fmt) for _ in range(2))
    cell_forward_into(A, None, h, c_new, layout, bias)
    return h, c_new


def optional_grad(t, dummy: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A gradient that may be absent (None: no gradient on that output) as a kernel argument: the
    tensor, dense in layout ``fmt``, or ``dummy`` -- never read, the kernel masks its loads with HAS_*."""
    return dummy if t is None else t.contiguous(memory_format=fmt)


def cell_backward(A: torch.Tensor, c: torch.Tensor, dh, dc_new, bias=None):
    """``(dA, dc)``; with a ``bias``, ``(dA, dc, dbias)``: ``dbias`` float32 ``(4C,)``, the kernels'
    per-program sums of ``dA`` added up (NCHW: per block of a plane; channels_last: per block of
    pixels, all channels)."""
    check_cell_shapes(A, c)
    check_dtypes(A, c, dh, dc_new, bias)
    A, c, fmt, layout = dense_layout(A, c)
    dc = torch.empty_like(c)
    dA, *dbias = _cell_backward(A, c, c, dc, dh, dc_new, fmt, layout, bias)
    return (dA, dc, *dbias)


def cell_zero_state_backward(A: torch.Tensor, dh, dc_new, bias=None):
    """``(dA,)`` (rows i, o, g), with a ``bias`` ``(dA, dbias)``: :func:`cell_backward` from a zero state."""
    check_dtypes(A, dh, dc_new, bias)
    A, state, fmt, layout = zero_state_layout(A)
    return _cell_backward(A, None, state, None, dh, dc_new, fmt, layout, bias)


def _cell_backward(A, c, state, dc, dh, dc_new, fmt, layout, bias):
    """``(dA[, dbias])``, ``dc`` written when ``c`` is given; ``c`` None: a zero state (``GATES = 3``,
    ``A`` rows i, o, g).  ``state``: a ``(B, C, ...)`` tensor in the layout, read for its shape only
    (meta for the zero state)."""
    gates = 3 if c is None else 4
    has = dict(HAS_DH=dh is not None, HAS_DCN=dc_new is not None, GATES=gates)
    dh, dc_new = optional_grad(dh, A, fmt), optional_grad(dc_new, A, fmt)
    c = A if c is None else c  # never read with GATES = 3
    dc = A if dc is None else dc  # never written with GATES = 3
    dA = torch.empty_like(A)
    total = state.numel()
    b, has_bias = bias_args(bias, A)
    if total == 0:
        return (dA, bias_partials(0, A).sum(dim=0)) if has_bias else (dA,)
    if has_bias and layout != LAYOUTS["channels_last"]:
        B, C = state.shape[:2]
        N = state[0, 0].numel()
        block = _block(N)
        n_chunks = triton.cdiv(N, block)
        partials = bias_partials(B * n_chunks, A)
        _cell_bwd_plane_kernel[(B * C * n_chunks,)](A, c, dh, dc_new, dA, dc, b, partials, C, N, n_chunks,
                                                    BLOCK=block, **has)
        return dA, partials.sum(dim=0)
    if has_bias:  # channels_last
        C = state.shape[1]
        CP = triton.next_power_of_2(C)
        BP = max(1, _BLOCK // CP)
        n_pixels = total // C
        programs = triton.cdiv(n_pixels, BP)
        partials = bias_partials(programs, A)
        _cell_bwd_pixels_kernel[(programs,)](A, c, dh, dc_new, dA, dc, b, partials, C, n_pixels, BP=BP, CP=CP,
                                             **has)
        return dA, partials.sum(dim=0)
    block = _block(total)
    _cell_bwd_kernel[(triton.cdiv(total, block),)](A, c, dh, dc_new, dA, dc, gate_stride(state, layout), total,
                                                   BLOCK=block, LAYOUT=layout, **has)
    return (dA,)
