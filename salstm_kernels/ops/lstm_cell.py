"""``salstm_kernels::lstm_cell``: ConvLSTM gates + state update from the conv output.

Forward: ``h', c' = cell(A, c)``.  Backward recomputes the gates from ``A`` and ``c`` (only the
inputs are saved).  Reference: :func:`salstm_kernels.reference.lstm_cell_ref`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..validation import check_lstm_cell_args
from .layout import empty_in, layout_of
from .providers import kernels, state_grads_for


@torch.library.custom_op("salstm_kernels::lstm_cell", mutates_args=())
def lstm_cell(A: Tensor, c: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """``A (B, 4C, H, W)``, ``c (B, C, H, W)`` -> ``(h', c')``, both ``(B, C, H, W)``."""
    check_lstm_cell_args(A, c)
    fmt = layout_of(A)
    h, c_new = kernels(backend).cell_forward(A, c.contiguous(memory_format=fmt))
    return h.contiguous(memory_format=fmt), c_new.contiguous(memory_format=fmt)


@lstm_cell.register_fake
def _(A, c, backend):
    check_lstm_cell_args(A, c)
    fmt = layout_of(A)
    return empty_in(c.shape, A, fmt), empty_in(c.shape, A, fmt)


@torch.library.custom_op("salstm_kernels::lstm_cell_backward", mutates_args=())
def lstm_cell_backward(
    A: Tensor, c: Tensor, dh: Optional[Tensor], dc_new: Optional[Tensor], backend: str
) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`lstm_cell` w.r.t. ``A`` and ``c`` (in ``A``'s layout); ``dh`` / ``dc_new``
    None means no gradient arrived on that output."""
    fmt = layout_of(A)
    prov = kernels(backend)
    dA, dc = prov.cell_backward(A, c.contiguous(memory_format=fmt), *state_grads_for(prov, c, fmt, dh, dc_new))
    return dA.contiguous(memory_format=fmt), dc.contiguous(memory_format=fmt)


@lstm_cell_backward.register_fake
def _(A, c, dh, dc_new, backend):
    fmt = layout_of(A)
    return empty_in(A.shape, A, fmt), empty_in(c.shape, c, fmt)


def _setup_context(ctx, inputs, output):
    A, c, backend = inputs
    ctx.save_for_backward(A, c)
    ctx.backend = backend
    ctx.set_materialize_grads(False)  # no-gradient outputs arrive as None (see lstm_attention.py)


def _backward(ctx, dh, dc_new):
    A, c = ctx.saved_tensors
    dA, dc = lstm_cell_backward(A, c, dh, dc_new, ctx.backend)
    return dA, dc, None


lstm_cell.register_autograd(_backward, setup_context=_setup_context)
