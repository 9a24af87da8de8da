"""``salstm_kernels::lstm_cell``: ConvLSTM gates + state update from the conv output.

Forward: ``h', c' = cell(A + bias, c)``.  Backward recomputes the gates from ``A`` and ``c`` (only
the inputs are saved).  ``bias`` (optional, ``(4C,)``) is the bias of the conv that produced ``A``,
run without it: the kernels add it as they read ``A`` (``providers.FOLDS_BIAS``), which saves the
broadcast add PyTorch runs after a cuDNN conv.  Reference: :func:`salstm_kernels.reference.lstm_cell_ref`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..validation import check_lstm_cell_args, check_lstm_cell_backward_args
from .batching import register_vmap_rule
from .dispatch import call_backward, forward_entry, refuse_double_backward
from .layout import empty_in, layout_of
from .providers import autocast_off, bias_grad, bias_grad_like, bias_kwargs, biased, kernels, plain, state_grads_for


def _lstm_cell(A: Tensor, c: Tensor, backend: str, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``A (B, 4C, H, W)``, ``c (B, C, H, W)`` (, conv ``bias (4C,)``) -> ``(h', c')``, both ``(B, C, H, W)``."""
    check_lstm_cell_args(A, c, bias=bias)
    A, c, bias = plain(A, c, bias)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, bias = biased(prov, A, bias)
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        h, c_new = prov.cell_forward(A, c.contiguous(memory_format=fmt), **bias_kwargs(bias))
    return h.contiguous(memory_format=fmt), c_new.contiguous(memory_format=fmt)


lstm_cell = torch.library.custom_op("salstm_kernels::lstm_cell", mutates_args=())(_lstm_cell)


@lstm_cell.register_fake
def _(A, c, backend, bias=None):
    check_lstm_cell_args(A, c, bias=bias)
    fmt = layout_of(A)
    return empty_in(c.shape, A, fmt), empty_in(c.shape, A, fmt)


def _lstm_cell_backward(
    A: Tensor, c: Tensor, dh: Optional[Tensor], dc_new: Optional[Tensor], backend: str, bias: Optional[Tensor] = None,
    bias_grad_wanted: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`lstm_cell` w.r.t. ``A``, ``c`` (in ``A``'s layout; ``dA`` is also the
    gradient of ``A + bias``) and ``bias`` (``(4C,)`` float32, float64 for float64; empty without a
    bias or with ``bias_grad_wanted`` False); ``dh`` / ``dc_new`` None means no gradient arrived on
    that output."""
    check_lstm_cell_backward_args(A, c, dh, dc_new, bias)
    return _cell_backward(A, c, dh, dc_new, backend, bias, bias_grad_wanted)


def _cell_backward(A, c, dh, dc_new, backend, bias, bias_grad_wanted):
    """:func:`_lstm_cell_backward` without the argument checks: the modules' eager backward calls it
    with the forward's checked inputs and autograd's gradients (shaped as the outputs)."""
    A, c, dh, dc_new, bias = plain(A, c, dh, dc_new, bias)
    fmt = layout_of(A)
    prov = kernels(backend, A.device.type)
    A, folded = biased(prov, A, bias)
    with autocast_off(A):  # the kernels' precision is their own (see providers.autocast_off)
        res = prov.cell_backward(A, c.contiguous(memory_format=fmt), *state_grads_for(prov, c, fmt, dh, dc_new),
                                 **bias_kwargs(folded))
    dA, dc = res[0], res[1]
    return (dA.contiguous(memory_format=fmt), dc.contiguous(memory_format=fmt),
            bias_grad(res, 2, dA, bias, bias_grad_wanted))


lstm_cell_backward = torch.library.custom_op("salstm_kernels::lstm_cell_backward", mutates_args=())(_lstm_cell_backward)


@lstm_cell_backward.register_fake
def _(A, c, dh, dc_new, backend, bias=None, bias_grad_wanted=True):
    check_lstm_cell_backward_args(A, c, dh, dc_new, bias)
    fmt = layout_of(A)
    return empty_in(A.shape, A, fmt), empty_in(c.shape, c, fmt), bias_grad_like(A, bias, bias_grad_wanted)


def _setup_context(ctx, inputs, output):
    A, c, backend, bias = inputs
    ctx.save_for_backward(A, c, bias)
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # no-gradient outputs arrive as None (see lstm_attention.py)


def _backward(ctx, dh, dc_new):
    A, c, bias = ctx.saved_tensors
    wanted = bias is not None and ctx.needs_input_grad[3]
    dA, dc, dbias = call_backward(lstm_cell_backward, _cell_backward, A, c, dh, dc_new, ctx.backend, bias, wanted)
    dbias = dbias.to(bias.dtype) if wanted else None
    return dA, dc, None, dbias


lstm_cell.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(lstm_cell_backward)
register_vmap_rule(lstm_cell, per_image=(0, 1))  # A, c
register_vmap_rule(lstm_cell_backward)
#: What the modules call: ``lstm_cell``'s math without the custom-op dispatch in eager mode
#: (:mod:`.dispatch`).
apply_lstm_cell = forward_entry(lstm_cell, _lstm_cell, _setup_context, _backward)
