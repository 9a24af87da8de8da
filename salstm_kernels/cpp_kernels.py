"""The ``cpp`` kernel provider: the kernel contract (see :mod:`salstm_kernels.ops.providers`) on the
compiled CPU extension, ``torch.ops.salstm_kernels_cpp.*`` (sources in ``csrc/``).

Same formulas as :mod:`salstm_kernels.ops.reference_kernels`, fused: one pass over ``A`` per pixel
tile computes gates, ``c'``, ``h'``, Q, K (LSTM-SA: the gated projections by BLAS on the tile) and
the partial scores; backward recomputes the gates from ``A`` and ``c``.  float32 and float64 run
natively; bfloat16 / float16 are computed in float32 (``P`` is float32 then, as the contract says).
Results do not depend on the number of threads.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import cpp_extension


def _ops():
    ok, reason = cpp_extension.status()
    if not ok:
        from .backends import BackendUnavailableError

        raise BackendUnavailableError(f"the 'cpp' backend is not available: {reason}")
    return torch.ops.salstm_kernels_cpp


# attention_backward reads the forward's h' for V instead of a pass over A (ops/lstm_attention.py
# saves it for this provider only).
USES_FORWARD_H = True
# cell_backward / attention_backward read dh = None / dc_new = None as zero (no zero tensors).
OPTIONAL_STATE_GRADS = True


def _proj_args(projections: Optional[Sequence[Tensor]]):
    return (None,) * 6 if projections is None else tuple(projections)


def cell_forward(A: Tensor, c: Tensor):
    return _ops().cell_forward(A, c)


def cell_backward(A: Tensor, c: Tensor, dh: Tensor, dc_new: Tensor):
    return _ops().cell_backward(A, c, dh, dc_new)


def cell_zero_state_forward(A: Tensor):
    """The cell from a zero state (h = c = 0): ``A`` (B, 3C, H, W) with the gate rows i, o, g (no
    forget gate); returns ``(h', c')``."""
    return _ops().cell_zero_state_forward(A)


def cell_zero_state_backward(A: Tensor, dh: Optional[Tensor], dc_new: Optional[Tensor]):
    """``(dA,)`` (rows i, o, g) of :func:`cell_zero_state_forward`; ``dh`` / ``dc_new`` = None read
    as zero.  The zero state takes no gradient."""
    return (_ops().cell_zero_state_backward(A, dh, dc_new),)


def attention_forward(A: Tensor, c: Tensor, projections, scale: float, combination: str):
    return _ops().attention_forward(A, c, *_proj_args(projections), float(scale), combination)


def attention_backward(A, c, projections, P, dout, dh, dc_new, scale: float, combination: str, h=None):
    dA, dc, *dproj = _ops().attention_backward(
        A, c, *_proj_args(projections), P, dout, dh, dc_new, float(scale), combination, h
    )
    return dA, dc, (None if projections is None else tuple(dproj))
