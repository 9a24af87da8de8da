"""Checks at the public boundary: clear errors that name the argument, expected and actual values."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_kernel_size(kernel_size) -> None:
    if not (isinstance(kernel_size, int) and kernel_size > 0 and kernel_size % 2 == 1):
        raise ValueError(
            f"kernel_size must be a positive odd int (the 'same' padding (k-1)//2 needs odd), got {kernel_size!r}"
        )


def check_input(x, in_channels: int, who: str) -> Tensor:
    """``x`` as ``(B, T, Cin, H, W)``; a 4-D ``(B, Cin, H, W)`` is taken as ``T = 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        x = x.unsqueeze(1)
    if x.dim() != 5:
        raise ValueError(f"{who}: x must be (B, T, {in_channels}, H, W) or (B, {in_channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[2] != in_channels:
        raise ValueError(f"{who}: x has {x.shape[2]} channels, expected in_channels={in_channels} (x shape {tuple(x.shape)})")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: x must be a floating tensor, got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{who}: x has T=0 time steps (shape {tuple(x.shape)}); need at least one")
    return x


def check_state(state, x: Tensor, hidden: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
    """``state``: one ``(h, c)`` per layer, each ``(B, C_l, H, W)`` on ``x``'s device."""
    state = list(state)
    if len(state) != len(hidden):
        raise ValueError(f"state must hold one (h, c) per layer: expected {len(hidden)}, got {len(state)}")
    B, _, _, H, W = x.shape
    for layer, (pair, C) in enumerate(zip(state, hidden)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"state[{layer}] must be a (h, c) pair")
        for name, t in zip(("h", "c"), pair):
            expected = (B, C, H, W)
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state[{layer}] {name} must have shape {expected}, got {got}")
            if t.device != x.device:
                raise ValueError(f"state[{layer}] {name} is on {t.device}, x on {x.device}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"state[{layer}] {name} must be floating, got {t.dtype}")
    return [(h, c) for h, c in state]
