"""``salstm_kernels::lstm_attention``: last step of SA-LSTM / LSTM-SA in one op.

From the conv output ``A`` and the previous cell state ``c``: gates, ``c'``, ``h'``, the QKV of
paper eq. 4 (gating learned per-pixel projections of ``h'`` for LSTM-SA), and channel attention
``softmax(Q K^T * scale) V``; ``scale`` None means ``1/sqrt(H*W)`` of ``A``, taken from its shape
when the op runs (what the modules pass for ``attention_size=None``: a float argument is a
constant in a traced graph, so a number computed from ``H*W`` would tie the graph to one image
size); ``bias`` (optional) is the bias of the conv that produced ``A``, folded in as in
:mod:`.lstm_cell`.  Returns ``(out, h', c', P)``; ``P (B, C, C)`` float32 is the softmax,
kept for backward (it is tiny: C x C per image).  Reference:
:func:`salstm_kernels.reference.lstm_attention_ref`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference import default_scale
from ..validation import check_lstm_attention_args, check_lstm_attention_backward_args
from .batching import register_vmap_rule
from .dispatch import call_backward, forward_entry, refuse_double_backward
from .layout import empty_in, layout_of
from .lstm_cell import _cell_backward, lstm_cell_backward
from .providers import autocast_off, bias_grad, bias_grad_like, bias_kwargs, biased, kernels, plain, state_grads_for

_PROJ_NAMES = ("wq", "bq", "wk", "bk", "wv", "bv")


def _projections(wq, bq, wk, bk, wv, bv):
    proj = (wq, bq, wk, bk, wv, bv)
    given = [p is not None for p in proj]
    if not any(given):
        return None
    if not all(given):
        missing = [n for n, g in zip(_PROJ_NAMES, given) if not g]
        raise ValueError(f"lstm_attention: projections must be all given or all None; missing {missing}")
    return proj


def _resolved_scale(scale: Optional[float], A: Tensor) -> float:
    """``scale``, or ``1/sqrt(H*W)`` of ``A`` for None (see the module docstring)."""
    return default_scale(A.shape[-2] * A.shape[-1]) if scale is None else scale


def _lstm_attention(
    A: Tensor,
    c: Tensor,
    wq: Optional[Tensor],
    bq: Optional[Tensor],
    wk: Optional[Tensor],
    bk: Optional[Tensor],
    wv: Optional[Tensor],
    bv: Optional[Tensor],
    scale: Optional[float],
    combination: str,
    backend: str,
    bias: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``A (B, 4C, H, W)``, ``c (B, C, H, W)``, projections ``(C, C)`` / ``(C,)`` or None, conv ``bias (4C,)`` or None."""
    proj = _projections(wq, bq, wk, bk, wv, bv)
    check_lstm_attention_args(A, c, wq, bq, wk, bk, wv, bv, scale, combination, bias)
    A, c, bias = plain(A, c, bias)
    proj = None if proj is None else plain(*proj)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, bias = biased(prov, A, bias)
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        out, h, c_new, P = prov.attention_forward(A, c.contiguous(memory_format=fmt), proj, _resolved_scale(scale, A),
                                                  combination, **bias_kwargs(bias))
    return (*(t.contiguous(memory_format=fmt) for t in (out, h, c_new)), P)


lstm_attention = torch.library.custom_op("salstm_kernels::lstm_attention", mutates_args=())(_lstm_attention)


@lstm_attention.register_fake
def _(A, c, wq, bq, wk, bk, wv, bv, scale, combination, backend, bias=None):
    _projections(wq, bq, wk, bk, wv, bv)
    check_lstm_attention_args(A, c, wq, bq, wk, bk, wv, bv, scale, combination, bias)
    B, C = c.shape[:2]
    fmt = layout_of(A)
    return (empty_in(c.shape, A, fmt), empty_in(c.shape, A, fmt), empty_in(c.shape, A, fmt),
            A.new_empty((B, C, C), dtype=torch.float64 if A.dtype == torch.float64 else torch.float32))


def _lstm_attention_backward(
    A: Tensor,
    c: Tensor,
    wq: Optional[Tensor],
    bq: Optional[Tensor],
    wk: Optional[Tensor],
    bk: Optional[Tensor],
    wv: Optional[Tensor],
    bv: Optional[Tensor],
    P: Tensor,
    dout: Tensor,
    dh: Optional[Tensor],
    dc_new: Optional[Tensor],
    scale: Optional[float],
    combination: str,
    backend: str,
    h: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    bias_grad_wanted: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. ``A, c``, the six projection tensors (empty tensors when absent) and the
    conv ``bias`` (``(4C,)`` float32, float64 for float64; empty without a bias or with
    ``bias_grad_wanted`` False).  ``h``: the forward's ``h'``, which a
    provider may use instead of recomputing it; ``dh`` / ``dc_new`` None: no gradient arrived on
    that output."""
    check_lstm_attention_backward_args(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination, h, bias)
    return _attention_backward(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination, backend, h, bias,
                               bias_grad_wanted)


def _attention_backward(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination, backend, h, bias,
                        bias_grad_wanted):
    """:func:`_lstm_attention_backward` without the argument checks (the modules' eager backward;
    see :func:`salstm_kernels.ops.lstm_cell._cell_backward`)."""
    A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, h, bias = plain(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new,
                                                                        h, bias)
    proj = _projections(wq, bq, wk, bk, wv, bv)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, folded = biased(prov, A, bias)
    c, dout = c.contiguous(memory_format=fmt), dout.contiguous(memory_format=fmt)
    dh, dc_new = state_grads_for(prov, c, fmt, dh, dc_new)
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        res = prov.attention_backward(A, c, proj, P, dout, dh, dc_new, _resolved_scale(scale, A), combination, h,
                                      **bias_kwargs(folded))
    dA, dc, dproj = res[:3]
    # contiguous, as the fake kernel says (a provider's sum could follow a transposed weight's strides)
    dproj = tuple(A.new_empty((0,)) for _ in range(6)) if dproj is None else tuple(g.contiguous() for g in dproj)
    return (dA.contiguous(memory_format=fmt), dc.contiguous(memory_format=fmt), *dproj,
            bias_grad(res, 3, dA, bias, bias_grad_wanted))


lstm_attention_backward = torch.library.custom_op("salstm_kernels::lstm_attention_backward", mutates_args=())(
    _lstm_attention_backward)


@lstm_attention_backward.register_fake
def _(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination, backend, h=None, bias=None,
      bias_grad_wanted=True):
    check_lstm_attention_backward_args(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination, h, bias)
    proj = (wq, bq, wk, bk, wv, bv)
    # contiguous whatever the weight's strides (a transposed weight): the real op's gradients are
    dproj = [A.new_empty((0,)) if p is None else torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in proj]
    fmt = layout_of(A)
    return (empty_in(A.shape, A, fmt), empty_in(c.shape, c, fmt), *dproj, bias_grad_like(A, bias, bias_grad_wanted))


def _setup_context(ctx, inputs, output):
    A, c, wq, bq, wk, bk, wv, bv, scale, combination, backend, bias = inputs
    # P, and h' for providers that read it in backward (an output, but saving it keeps it alive).
    h = output[1] if getattr(kernels(backend), "USES_FORWARD_H", False) else None
    ctx.save_for_backward(A, c, wq, bq, wk, bk, wv, bv, output[3], h, bias)
    # P is returned to be saved, not to be differentiated: the backward has no term for a gradient
    # on it, so a loss on P must not get a silent zero (it gets autograd's "does not require grad")
    ctx.mark_non_differentiable(output[3])
    if not any(t is not None and t.requires_grad for t in (A, c, bias)):
        # h', c' depend on A, c and the bias only: with none of them requiring grad (frozen convs,
        # trainable projections) they do not either, as in the reference -- else a loss on them
        # would backpropagate a silent zero instead of raising
        ctx.mark_non_differentiable(output[1], output[2])
    ctx.scale, ctx.combination, ctx.backend = scale, combination, backend
    # Outputs that got no gradient arrive as None (not as zero tensors, which the engine would
    # allocate and the op would then convert to A's layout): the cpp provider reads None as zero.
    ctx.set_materialize_grads(False)
    ctx.gated = wq is not None


def _backward(ctx, dout, dh, dc_new, dP):
    A, c, wq, bq, wk, bk, wv, bv, P, h, bias = ctx.saved_tensors
    wanted = bias is not None and ctx.needs_input_grad[11]
    if dout is None:
        # no gradient on the attention output (a loss on the returned states only): the cell's
        # backward alone, and no projection gradients -- None as in the reference, not zeros (an
        # optimizer's weight decay skips a None gradient, not a zero one)
        dA, dc, dbias = call_backward(lstm_cell_backward, _cell_backward, A, c, dh, dc_new, ctx.backend, bias, wanted)
        return (dA, dc, *(None,) * 6, None, None, None, dbias.to(bias.dtype) if wanted else None)
    grads = call_backward(
        lstm_attention_backward, _attention_backward,
        A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, ctx.scale, ctx.combination, ctx.backend, h, bias, wanted
    )
    dA, dc = grads[0], grads[1]
    dproj = tuple(grads[2:8]) if ctx.gated else (None,) * 6
    dbias = grads[8].to(bias.dtype) if wanted else None
    return (dA, dc, *dproj, None, None, None, dbias)


lstm_attention.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(lstm_attention_backward)
register_vmap_rule(lstm_attention, per_image=(0, 1))  # A, c
register_vmap_rule(lstm_attention_backward)
#: What the modules call (:mod:`.dispatch`).
apply_lstm_attention = forward_entry(lstm_attention, _lstm_attention, _setup_context, _backward)
