"""The attention op at wide ``C`` (and at ``33 <= C <= 64`` where ``lstm_attention.PATH_AT_CP64``
routes a direction here) with its long-output products done by ``torch.matmul`` (cuBLAS).

At ``C = 256`` the channel-blocked Triton path (:mod:`.attention_blocked`) measured slower than the
eager reference on an H200 (float32 SA-LSTM 8.6 against 7.3 ms, LSTM-SA 25.3 against 11.9 ms,
fwd+bwd, 224x224): its products are Triton dots over 64-channel blocks (float32 "ieee": no tensor
cores), about 10 TFLOPS, and at ``C = 256`` the products are most of the op's work (``C`` flops per
byte).  Here the products with a long ``(C, N)`` output -- ``P V``, ``dS K``, ``dS^T Q``, ``P^T dO``,
LSTM-SA's projections ``W h'`` and ``W^T dq`` -- are library matmuls as in the reference; the sums
over pixels with a ``(C, C)`` output (``Q K^T``, ``dO V^T``, ``dW = dq h'^T``) run the blocked
path's split-N Triton kernel (tf32 dots for 16-bit operands, "ieee" for float32 unless a launch
table entry sets ``Launch.prec``; see
:data:`SPLIT_N_REDUCTIONS`); the pointwise work stays fused in the blocked rows
kernels (gates, ``c'``, ``h'``, ``Q, K, V`` formation, their chain rule, the cell backward into
``dA``, ``dc``) with ``PROJ`` set: they read the projections (and ``sum_j W_j^T dq_j``) from memory
instead of computing them.

Operands are in the input dtype, as the reference's matmuls: float32 stays float32 (cuBLAS
honours ``torch.backends.cuda.matmul`` settings, as the reference does), 16-bit operands of the
library matmuls run on 16-bit tensor cores with float32 accumulation.  Softmax and ``dS`` stay float32.  The backward
recomputes ``h'`` and the projections from ``A`` and ``c`` (nothing more is saved than on the
other paths), so its ``h'`` is the forward's bit for bit.

Layouts: NCHW tensors are ``(B, C, N)`` matrices per image; channels_last ones ``(B, N, C)``, so
their products are the transposed ones (no copies either way).
"""
from __future__ import annotations

import functools

import torch

from . import attention_blocked as blocked
from .attention_partials import projection_grad_sums, scores_grad_of_partials, softmax_of_partials
from .lstm_cell import LAYOUTS, bias_args, bias_partials, cell_forward_into

#: The products that reduce over the pixels (``Q K^T``, ``dO V^T``, ``dq h'^T``: ``(C, C)`` outputs,
#: ``N``-long sums) run the channel-blocked path's split-N Triton kernel on the same operands
#: (``blocked.outer_partials``: per-split partials, as many programs as the GPU needs).  One bmm per image
#: has only ``(C / 128)^2`` output tiles to spread over the SMs (4 at ``C = 256``) unless cuBLAS
#: splits the sum itself; ``False`` runs them as bmm anyway (the reference's way; an A/B in
#: ``benchmarks/gpu_check.py --wide-only``).
SPLIT_N_REDUCTIONS = True


def _matrices(x: torch.Tensor, layout: int) -> torch.Tensor:
    """A dense state tensor as per-image matrices: ``(B, C, N)`` (NCHW) or ``(B, N, C)`` (channels_last), a view."""
    if layout == LAYOUTS["channels_last"]:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
    return x.view(x.shape[0], x.shape[1], -1)


def _weight_times(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, layout: int, accumulate=False):
    """``out (+)= w @ x`` at every pixel of every image, ``w (C, C)`` (pass ``w.t()`` for ``w^T x``)."""
    X, O = _matrices(x, layout), _matrices(out, layout)
    if layout == LAYOUTS["channels_last"]:  # rows are pixels: x_n^T w^T, all images as one matrix
        X2, O2 = X.reshape(-1, X.shape[-1]), O.view(-1, O.shape[-1])
        if accumulate:
            O2.addmm_(X2, w.t())
        else:
            torch.mm(X2, w.t(), out=O2)
    elif accumulate:
        O.baddbmm_(w.expand(X.shape[0], -1, -1), X)
    else:
        torch.matmul(w, X, out=O)
    return out


def _outer_partials(x: torch.Tensor, y: torch.Tensor, layout: int, plan, rowsum=False):
    """Split partials of ``sum_n x[:, n] y[:, n]^T`` per image, ``(B, SPLITS, C, C)`` float32 (and
    with ``rowsum`` of ``sum_n x``, ``(B, SPLITS, C)``); one split when :data:`SPLIT_N_REDUCTIONS`
    is off (a bmm)."""
    if SPLIT_N_REDUCTIONS:
        return blocked.outer_partials(plan, x, y, x.shape[1], x[0, 0].numel(), plan.prec, layout, rowsum)
    X, Y = _matrices(x, layout), _matrices(y, layout)
    if layout == LAYOUTS["channels_last"]:
        out = torch.bmm(X.transpose(1, 2), Y).float()
    else:
        out = torch.bmm(X, Y.transpose(1, 2)).float()
    out = out.unsqueeze(1)
    return (out, x.sum(dim=tuple(range(2, x.dim())), dtype=torch.float32).unsqueeze(1)) if rowsum else out


def _square_times(m: torch.Tensor, x: torch.Tensor, out: torch.Tensor, layout: int, trans=False):
    """``out = m @ x`` per image (``m^T @ x`` with ``trans``), ``m (B, C, C)`` float32, rounded to ``x``'s dtype."""
    m = (m.transpose(1, 2) if trans else m).to(x.dtype)
    X, O = _matrices(x, layout), _matrices(out, layout)
    if layout == LAYOUTS["channels_last"]:
        torch.bmm(X, m.transpose(1, 2), out=O)
    else:
        torch.bmm(m, X, out=O)
    return out


def _without_autocast(fn):
    """The products in the operands' dtype even when called under autocast (the eager op entries
    run inside the caller's autocast region; ``out=`` and in-place matmuls ignore it, plain ones not)."""
    @functools.wraps(fn)
    def run(A, *args, **kwargs):
        with torch.autocast(A.device.type, enabled=False):
            return fn(A, *args, **kwargs)

    return run


def _rows_meta(plan, comb, layout, has_bias):
    return dict(BC=plan.BC, BN=plan.BN, COMB=comb, LAYOUT=layout, HAS_BIAS=has_bias, PREC=plan.prec,
                **plan.options)


def _state_and_qkv(A, c, ws, h, c_new, b, bias, layout, plan, meta, in_place):
    """``h', c'`` (into ``h``, ``c_new``) and ``Q, K, V`` in ``h``'s dtype, ``V`` = ``h`` for SA-LSTM.
    LSTM-SA (``ws``: the projections in ``h``'s dtype): ``W h'`` by matmuls first, which ``Q, K, V``
    overwrite (``in_place``) or which are kept and returned (the backward reads them again)."""
    B, C = c.shape[:2]
    N = c[0, 0].numel()
    Q, K = torch.empty_like(h), torch.empty_like(h)
    if ws is None:
        blocked.qkv_rows_kernel[plan.rows_grid](
            A, c, h, A, A, A, A, A, A, A, A, A, Q, K, h, h, c_new, b, C, N,
            GATED=False, WRITE_STATE=True, **meta,
        )
        return Q, K, h, None
    cell_forward_into(A, c, h, c_new, layout, bias)  # the projections read h' of every channel
    V = torch.empty_like(h)
    projected = (Q, K, V) if in_place else tuple(torch.empty_like(h) for _ in range(3))
    for w, p in zip(ws[0::2], projected):
        _weight_times(w, h, p, layout)
    blocked.qkv_rows_kernel[plan.rows_grid](
        A, c, h, *ws, *projected, Q, K, V, h, c_new, b, C, N, GATED=True, WRITE_STATE=False, PROJ=True, **meta,
    )
    return Q, K, V, None if in_place else projected


@_without_autocast
def forward(A, c, proj, scale, comb, layout, out, h, c_new, bias, plan):
    """Non-empty; writes the outputs ``attention_forward`` allocated; returns them and ``P``."""
    b, has_bias = bias_args(bias, A)
    ws = None if proj is None else tuple(p.to(h.dtype) for p in proj)
    Q, K, V, _ = _state_and_qkv(A, c, ws, h, c_new, b, bias, layout, plan, _rows_meta(plan, comb, layout, has_bias),
                                in_place=True)
    P = softmax_of_partials(_outer_partials(Q, K, layout, plan), scale)
    del Q, K
    _square_times(P, V, out, layout)
    return out, h, c_new, P


@_without_autocast
def backward(A, c, proj, P, dout, dh, dc_new, scale, comb, layout, has, bias, plan):
    """Non-empty, ``P`` float32; ``has``: the ``HAS_DH`` / ``HAS_DCN`` launch flags.  Returns
    ``(dA, dc, dprojections or None[, dbias])`` as the blocked path."""
    B, C = c.shape[:2]
    N = c[0, 0].numel()
    gated = proj is not None
    b, has_bias = bias_args(bias, A)
    meta = _rows_meta(plan, comb, layout, has_bias)
    h, scratch = torch.empty_like(c, dtype=A.dtype), torch.empty_like(c, dtype=A.dtype)
    ws = tuple(p.to(h.dtype) for p in proj) if gated else None
    Q, K, V, projected = _state_and_qkv(A, c, ws, h, scratch, b, bias, layout, plan, meta, in_place=False)
    del scratch
    dS = scores_grad_of_partials(_outer_partials(dout, V, layout, plan), P, scale)
    del V
    dQ = _square_times(dS, K, torch.empty_like(h), layout)
    dK = _square_times(dS, Q, torch.empty_like(h), layout, trans=True)
    del Q, K
    dV = _square_times(P, dout, torch.empty_like(h), layout, trans=True)
    dproj = None
    wdq = A  # dummy: never read when not GATED
    if gated:
        # dq, dk, dv (the gradients on the projections) written over the projections; dQ, dK, dV
        # become the gradients on the LSTM-state factors
        dqkv = projected
        blocked.proj_grad_rows_kernel[plan.rows_grid](
            A, c, h, *ws, *projected, dQ, dK, dV, *dqkv, b, C, N, PROJ=True, **meta,
        )
        del projected
        dw, db = zip(*(_outer_partials(d, h, layout, plan, rowsum=True) for d in dqkv))
        dproj = projection_grad_sums(dw, db, proj)
        wdq = _weight_times(ws[0].t(), dqkv[0], torch.empty_like(h), layout)
        for w, d in zip(ws[2::2], dqkv[1:]):
            _weight_times(w.t(), d, wdq, layout, accumulate=True)
        del dqkv
    del h
    dA, dc = torch.empty_like(A), torch.empty_like(c)
    dbias = bias_partials(B * plan.n_tiles, A) if has_bias else dA
    # the weights and dq, dk, dv are never read: PROJ gives sum_j W_j^T dq_j as wdq
    blocked.attention_bwd_rows_kernel[plan.rows_grid](
        A, c, dh, dc_new, dQ, dK, dV, A, A, A, A, A, A, wdq, dA, dc, b, dbias, C, N,
        GATED=gated, PROJ=True, W16=False, HAS_DH=has["HAS_DH"], HAS_DCN=has["HAS_DCN"], **meta,
    )
    return (dA, dc, dproj, dbias.sum(dim=0)) if has_bias else (dA, dc, dproj)
