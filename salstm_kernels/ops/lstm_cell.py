"""``salstm_kernels::lstm_cell``: ConvLSTM gates + state update from the conv output.

Forward: ``h', c' = cell(A, c)``.  Backward recomputes the gates from ``A`` and ``c`` (only the
inputs are saved).  Reference: :func:`salstm_kernels.reference.lstm_cell_ref`.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..validation import check_lstm_cell_args
from .providers import kernels


@torch.library.custom_op("salstm_kernels::lstm_cell", mutates_args=())
def lstm_cell(A: Tensor, c: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """``A (B, 4C, H, W)``, ``c (B, C, H, W)`` -> ``(h', c')``, both ``(B, C, H, W)``."""
    check_lstm_cell_args(A, c)
    return kernels(backend).cell_forward(A, c)


@lstm_cell.register_fake
def _(A, c, backend):
    check_lstm_cell_args(A, c)
    return A.new_empty(c.shape), A.new_empty(c.shape)


@torch.library.custom_op("salstm_kernels::lstm_cell_backward", mutates_args=())
def lstm_cell_backward(A: Tensor, c: Tensor, dh: Tensor, dc_new: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """Gradients of :func:`lstm_cell` w.r.t. ``A`` and ``c``."""
    return kernels(backend).cell_backward(A, c, dh, dc_new)


@lstm_cell_backward.register_fake
def _(A, c, dh, dc_new, backend):
    return torch.empty_like(A), torch.empty_like(c)


def _setup_context(ctx, inputs, output):
    A, c, backend = inputs
    ctx.save_for_backward(A, c)
    ctx.backend = backend


def _backward(ctx, dh, dc_new):
    A, c = ctx.saved_tensors
    dh = torch.zeros_like(c) if dh is None else dh.contiguous()
    dc_new = torch.zeros_like(c) if dc_new is None else dc_new.contiguous()
    dA, dc = lstm_cell_backward(A, c, dh, dc_new, ctx.backend)
    return dA, dc, None


lstm_cell.register_autograd(_backward, setup_context=_setup_context)
