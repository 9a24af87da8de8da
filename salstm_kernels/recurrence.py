"""The ConvLSTM recurrence used by every fused backend: the conv does less work here.

``conv(cat(x, h), W) + b == conv(x, W_x) + b + conv(h, W_h)`` with ``W = [W_x | W_h]`` split along
input channels.  So per layer:

* the input part runs once for all ``T`` steps as one batched conv (better GEMM shapes);
* the recurrent part runs per step, and is skipped at ``t = 0`` when the state starts at zero
  (25% fewer conv FLOPs at ``T = 2`` with ``Cin = C``);
* layers run one after another over the whole sequence (layer ``l`` at step ``t`` only needs
  layer ``l-1`` at step ``t``), so the next layer's input conv is batched too.

The gates and state update go through the fused ``lstm_cell`` op; the last step of the last layer is
left to the caller (it feeds the fused attention op).  Parameters stay the single upstream
``conv.weight`` / ``conv.bias``: the split is a view, so gradients land in the same tensors.

**State dtype** (the same rule the reference gets from PyTorch's type promotion): the states start
in ``x``'s dtype (or the given state's) and the cell runs in ``promote_types(state, A)``.  Outside
autocast that is just the common dtype.  Under ``torch.autocast`` the convs run in the low
precision, but ``A`` is widened to the state dtype before the cell, so ``h, c`` stay float32 for
float32 inputs -- the cell state is a running sum over time steps and keeps its precision.
Any memory layout (sliced, ``channels_last``, expanded) is accepted; the ops get contiguous NCHW.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

State = Tuple[Tensor, Tensor]


def split_conv_recurrence(
    x: Tensor,
    convs: Sequence[nn.Conv2d],
    state: Optional[Sequence[State]],
    backend: str,
    stop_before_last: bool,
) -> Tuple[List[State], Optional[Tuple[Tensor, Tensor]]]:
    """Run the stacked ConvLSTM over ``x (B, T, Cin, H, W)`` with the fused cell op.

    Returns ``(states, last)``.  With ``stop_before_last`` the last layer's last step is not
    computed: ``last = (A, c_prev)`` is its conv output and previous cell state, and ``states[-1]``
    holds the state *before* that step.  Otherwise ``last`` is ``None`` and ``states`` are final.
    """
    B, T, _, H, W = x.shape
    seq = x
    states: List[State] = []
    last = None
    n_layers = len(convs)
    for layer, conv in enumerate(convs):
        weight, bias = conv.weight, conv.bias
        C = weight.shape[0] // 4
        cin = weight.shape[1] - C
        pad = conv.padding
        w_x, w_h = weight[:, :cin], weight[:, cin:]
        A_in = F.conv2d(seq.reshape(B * T, cin, H, W), w_x, bias, padding=pad).reshape(B, T, 4 * C, H, W)
        if state is not None:
            h, c = state[layer]
        else:
            h, c = None, x.new_zeros(B, C, H, W)  # x's dtype, as reference.zero_state
        outputs = []
        for t in range(T):
            A = A_in[:, t]
            if h is not None:
                A = A + F.conv2d(h.to(A.dtype), w_h, None, padding=pad)
            if stop_before_last and layer == n_layers - 1 and t == T - 1:
                last = (A.contiguous(), c.contiguous())  # the caller widens A (see module docstring)
                break
            A, c = _widen(A, c)
            h, c = ops.lstm_cell(A, c, backend)
            outputs.append(h)
        states.append((h if h is not None else torch.zeros_like(c), c))
        if layer < n_layers - 1:
            seq = torch.stack(outputs, dim=1)
    return states, last


def _widen(A: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """``A`` and ``c`` in their common (state) dtype, contiguous NCHW, as the fused ops want them."""
    dtype = torch.promote_types(A.dtype, c.dtype)
    return A.to(dtype).contiguous(), c.to(dtype).contiguous()
