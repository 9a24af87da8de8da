"""FLOP formulas for the fused ops, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

Custom ops are opaque to the counter (it sees the op, not the kernels inside), so without these a
fused module would report only its convolutions.  Like the counter's own formulas these count the
matrix products (2 FLOPs per multiply-add) and leave pointwise work out; backward counts the products
the gradients need, not what a kernel recomputes (gates, ``V``, projections) to save memory.
With ``N = H W``, one ``C x C x N`` product per image is ``2 B C^2 N``:

* ``lstm_attention``: ``S = Q K^T`` and ``P V`` (2 products), plus the three projections
  ``W h' + b`` for LSTM-SA (5 in all) -- the same count as the eager reference's matmuls;
* ``lstm_attention_backward``: ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``, ``dK = dS^T Q``
  (4), plus per projection its weight and input gradient (6 more);
* ``lstm_cell``, ``lstm_cell_zero_state`` and their backwards: pointwise only, 0.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula


def _product(c_shape) -> int:
    B, C = c_shape[0], c_shape[1]
    N = 1
    for s in c_shape[2:]:
        N *= s
    return 2 * B * C * C * N


@register_flop_formula(torch.ops.salstm_kernels.lstm_attention)
def _attention_flops(A, c, wq, *args, out_shape=None, **kwargs) -> int:
    return (2 + (3 if wq is not None else 0)) * _product(c)


@register_flop_formula(torch.ops.salstm_kernels.lstm_attention_backward)
def _attention_backward_flops(A, c, wq, *args, out_shape=None, **kwargs) -> int:
    return (4 + (6 if wq is not None else 0)) * _product(c)
