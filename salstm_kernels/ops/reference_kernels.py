"""The kernel contract (see ``providers.py``) written out in plain PyTorch, backward by hand.

It is the ``*_ref`` beside the fused providers: the same formulas the Triton and C++ kernels
implement (float32 math, gates recomputed from ``A`` and ``c``), slow and easy to check.  It also
lets the op plumbing (registration, fake kernels, autograd, torch.compile) be tested without any
compiled kernel.  Tests check it against autograd of :mod:`salstm_kernels.reference`.
"""
from __future__ import annotations

import torch

from .. import reference


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs (so gradcheck works)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t):
    return t.to(acc_dtype(t.dtype))


def _state(A, c):
    """Gates and new states in the accumulation dtype from ``A (B, 4C, ...)`` and ``c``."""
    i, f, o, g = reference.lstm_gates(_acc(A))
    c_new = f * _acc(c) + i * g
    tc = torch.tanh(c_new)
    return i, f, o, g, c_new, tc, o * tc


def _cell_grads(A, c, dh, dc_new, df=None, dg=None):
    """``dA, dc`` given the total gradients on ``h'`` and ``c'`` (and extra ones on ``f``, ``g``)."""
    i, f, o, g, c_new, tc, h = _state(A, c)
    dct = dc_new + dh * o * (1 - tc * tc)
    dAi = dct * g * i * (1 - i)
    dAf = (dct * _acc(c) + (0 if df is None else df)) * f * (1 - f)
    dAo = dh * tc * o * (1 - o)
    dAg = (dct * i + (0 if dg is None else dg)) * (1 - g * g)
    return torch.cat([dAi, dAf, dAo, dAg], dim=1).to(A.dtype), (dct * f).to(c.dtype)


def cell_forward(A, c):
    _, _, _, _, c_new, _, h = _state(A, c)
    return h.to(A.dtype), c_new.to(A.dtype)


def cell_backward(A, c, dh, dc_new):
    return _cell_grads(A, c, _acc(dh), _acc(dc_new))


def _as_4_gates(A):
    """A zero-state ``A (B, 3C, ...)`` (rows i, o, g) as the 4-gate cell's ``A`` and ``c``: a zero
    forget row and a zero ``c`` (the forget gate only multiplies ``c``, so any row would do)."""
    C = A.shape[1] // 3
    zeros = torch.zeros_like(A[:, :C])
    return torch.cat([A[:, :C], zeros, A[:, C:]], dim=1), zeros


def cell_zero_state_forward(A):
    return cell_forward(*_as_4_gates(A))


def cell_zero_state_backward(A, dh, dc_new):
    dA, _ = cell_backward(*_as_4_gates(A), dh, dc_new)
    C = A.shape[1] // 3
    return (torch.cat([dA[:, :C], dA[:, 2 * C:]], dim=1),)


def _flat(t):
    return t.reshape(t.shape[0], t.shape[1], -1)


def _qkv(f, g, c_new, h, projections, combination):
    """Q, K, V (float32, (B, C, N)) plus what backward needs: factors and projections."""
    fq, fk, fv = reference.qkv_factors(f, g, c_new, h, combination)
    if projections is None:
        return fq, fk, fv, None
    wq, bq, wk, bk, wv, bv = (p.to(f.dtype) for p in projections)
    qkv = tuple(reference.channel_projection(h, w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    if fq is None:
        return qkv[0], qkv[1], qkv[2], qkv
    return fq * qkv[0], fk * qkv[1], fv * qkv[2], qkv


def attention_forward(A, c, projections, scale, combination):
    i, f, o, g, c_new, tc, h = _state(A, c)
    Q, K, V, _ = _qkv(f, g, c_new, h, projections, combination)
    S = torch.bmm(_flat(Q), _flat(K).transpose(1, 2)) * scale
    P = torch.softmax(S, dim=-1)
    out = torch.bmm(P, _flat(V)).view(h.shape)
    return out.to(A.dtype), h.to(A.dtype), c_new.to(A.dtype), P


def attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h_saved=None):
    # h_saved (the forward's h') is accepted for the contract and not used: recomputed below.
    i, f, o, g, c_new, tc, h = _state(A, c)
    Q, K, V, qkv = _qkv(f, g, c_new, h, projections, combination)
    dO = _flat(dout.to(P.dtype))
    dV = torch.bmm(P.transpose(1, 2), dO).view(h.shape)
    dP = torch.bmm(dO, _flat(V).transpose(1, 2))
    dS = P * (dP - (dP * P).sum(-1, keepdim=True)) * scale
    dQ = torch.bmm(dS, _flat(K)).view(h.shape)
    dK = torch.bmm(dS.transpose(1, 2), _flat(Q)).view(h.shape)

    dh_total = dh.to(P.dtype).clone()
    dc_total = dc_new.to(P.dtype).clone()
    df = torch.zeros_like(f)
    dg = torch.zeros_like(g)
    dproj = None
    if qkv is not None:
        q, k, v = qkv
        fq, fk, fv = reference.qkv_factors(f, g, c_new, h, combination)
        if fq is None:
            dq, dk, dv = dQ, dK, dV
            dfq = dfk = dfv = None
        else:
            dq, dk, dv = dQ * fq, dK * fk, dV * fv
            dfq, dfk, dfv = dQ * q, dK * k, dV * v
        dproj = []
        for (w, _), dy in zip(((projections[0], 0), (projections[2], 0), (projections[4], 0)), (dq, dk, dv)):
            dproj.append(torch.einsum("bon,bcn->oc", _flat(dy), _flat(h)).to(w.dtype))
            dproj.append(_flat(dy).sum((0, 2)).to(w.dtype))
            dh_total += reference.channel_projection(dy, w.to(dy.dtype).t(), None)
        dproj = tuple(dproj)
    else:
        dfq, dfk, dfv = dQ, dK, dV
    if dfq is not None:
        if combination == "linear":
            df += dfq / 2
            dc_total += dfq / 2
            dg += dfk / 2
            dh_total += dfk / 2
        else:  # nonlinear: relu(f * c'), relu(g * h')
            mq = (f * c_new > 0).to(f.dtype)
            mk = (g * h > 0).to(f.dtype)
            df += dfq * mq * c_new
            dc_total += dfq * mq * f
            dg += dfk * mk * h
            dh_total += dfk * mk * g
        dh_total += dfv  # V factor is h'
    dA, dc = _cell_grads(A, c, dh_total, dc_total, df, dg)
    return dA, dc, dproj
