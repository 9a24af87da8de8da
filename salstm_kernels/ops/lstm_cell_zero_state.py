"""``salstm_kernels::lstm_cell_zero_state``: the ConvLSTM cell step from a zero state.

When the previous state is zero (the first step with no initial state), ``c' = f * 0 + i * g``:
the forget gate drops out, so the conv that feeds the step need only compute the three gate rows
``i, o, g`` -- a quarter fewer FLOPs for that conv, forward and backward, and a quarter less
``A`` kept for backward.  Exact: the same ``h', c'`` and ``dA`` rows as
:func:`salstm_kernels.ops.lstm_cell` with any finite or infinite ``f`` row and ``c = 0`` (``f`` is
a sigmoid, in ``[0, 1]``).  A NaN ``f`` pre-activation (from a NaN in the conv's forget rows, or
a non-finite input) would make the 4-gate cell's ``c'`` NaN through ``NaN * 0``; here the forget
rows are never computed, as the recurrent conv at ``t = 0`` is not (see ``recurrence.py``).

Forward: ``A (B, 3C, H, W)`` (gate rows i, o, g) -> ``(h', c')``.  ``bias`` (optional, ``(3C,)``)
is the bias of the conv that produced ``A``, run without it (as in :mod:`.lstm_cell`).  Backward
recomputes the gates from ``A`` (only ``A`` is saved) and returns ``dA``; the zero state takes no
gradient.  Reference: :func:`salstm_kernels.ops.reference_kernels.cell_zero_state_forward`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..validation import check_lstm_cell_zero_state_args, check_lstm_cell_zero_state_backward_args
from .batching import register_vmap_rule
from .dispatch import call_backward, forward_entry, refuse_double_backward
from .layout import empty_in, layout_of
from .providers import autocast_off, bias_grad, bias_grad_like, bias_kwargs, biased, kernels, plain, state_grads_for


def _state_shape(A: Tensor):
    B, C3, H, W = A.shape
    return (B, C3 // 3, H, W)


def _lstm_cell_zero_state(A: Tensor, backend: str, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``A (B, 3C, H, W)`` (gate rows i, o, g; conv ``bias (3C,)``) -> ``(h', c')``, both ``(B, C, H, W)``."""
    check_lstm_cell_zero_state_args(A, bias)
    A, bias = plain(A, bias)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, bias = biased(prov, A, bias)
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        h, c_new = prov.cell_zero_state_forward(A, **bias_kwargs(bias))
    return h.contiguous(memory_format=fmt), c_new.contiguous(memory_format=fmt)


lstm_cell_zero_state = torch.library.custom_op("salstm_kernels::lstm_cell_zero_state", mutates_args=())(
    _lstm_cell_zero_state)


@lstm_cell_zero_state.register_fake
def _(A, backend, bias=None):
    check_lstm_cell_zero_state_args(A, bias)
    fmt = layout_of(A)
    return empty_in(_state_shape(A), A, fmt), empty_in(_state_shape(A), A, fmt)


def _lstm_cell_zero_state_backward(
    A: Tensor, dh: Optional[Tensor], dc_new: Optional[Tensor], backend: str, bias: Optional[Tensor] = None,
    bias_grad_wanted: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`lstm_cell_zero_state` w.r.t. ``A`` (in ``A``'s layout; also the gradient
    of ``A + bias``) and ``bias`` (``(3C,)`` float32, float64 for float64; empty without a bias or
    with ``bias_grad_wanted`` False); ``dh`` / ``dc_new`` None means no gradient on that output."""
    check_lstm_cell_zero_state_backward_args(A, dh, dc_new, bias)
    return _cell_zero_state_backward(A, dh, dc_new, backend, bias, bias_grad_wanted)


def _cell_zero_state_backward(A, dh, dc_new, backend, bias, bias_grad_wanted):
    """:func:`_lstm_cell_zero_state_backward` without the argument checks (the modules' eager backward;
    see :func:`salstm_kernels.ops.lstm_cell._cell_backward`)."""
    A, dh, dc_new, bias = plain(A, dh, dc_new, bias)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, folded = biased(prov, A, bias)
    like = A[:, : A.shape[1] // 3]  # shape of the state, for zeros where the provider wants them
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        res = prov.cell_zero_state_backward(A, *state_grads_for(prov, like, fmt, dh, dc_new), **bias_kwargs(folded))
    dA = res[0]
    return dA.contiguous(memory_format=fmt), bias_grad(res, 1, dA, bias, bias_grad_wanted)


lstm_cell_zero_state_backward = torch.library.custom_op(
    "salstm_kernels::lstm_cell_zero_state_backward", mutates_args=())(_lstm_cell_zero_state_backward)


@lstm_cell_zero_state_backward.register_fake
def _(A, dh, dc_new, backend, bias=None, bias_grad_wanted=True):
    check_lstm_cell_zero_state_backward_args(A, dh, dc_new, bias)
    return empty_in(A.shape, A, layout_of(A)), bias_grad_like(A, bias, bias_grad_wanted)


def _setup_context(ctx, inputs, output):
    A, backend, bias = inputs
    ctx.save_for_backward(A, bias)
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # no-gradient outputs arrive as None (see lstm_attention.py)


def _backward(ctx, dh, dc_new):
    A, bias = ctx.saved_tensors
    wanted = bias is not None and ctx.needs_input_grad[2]
    dA, dbias = call_backward(lstm_cell_zero_state_backward, _cell_zero_state_backward,
                              A, dh, dc_new, ctx.backend, bias, wanted)
    return dA, None, (dbias.to(bias.dtype) if wanted else None)


lstm_cell_zero_state.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(lstm_cell_zero_state_backward)
register_vmap_rule(lstm_cell_zero_state, per_image=(0,))  # A
register_vmap_rule(lstm_cell_zero_state_backward)
#: What the modules call (:mod:`.dispatch`).
apply_lstm_cell_zero_state = forward_entry(lstm_cell_zero_state, _lstm_cell_zero_state, _setup_context, _backward)
