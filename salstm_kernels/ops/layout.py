"""Memory layout of the fused ops' tensors: it follows ``A``.

``A (B, 4C, H, W)`` is either NCHW-contiguous or channels_last per image (the 4C gate values of a
pixel contiguous, any batch stride: what a channels_last conv writes, or one step's slice of a
time-major one).  The ``(B, C, H, W)`` tensors an op returns (``h'``, ``c'``, ``out``, ``dc``) and
``dA`` are in that layout, on every backend, and the fake kernels promise the same strides; the
``(B, C, H, W)`` inputs are brought to it at the op boundary (no copy when they already are).  The
``cpp`` recurrence runs channels_last end to end this way (so can the ``triton`` one on CUDA, opt-in:
``recurrence.CHANNELS_LAST_CONVS``); the ``cpp`` and ``triton`` kernels read such an ``A`` in place.
"""
from __future__ import annotations

import torch
from torch import Tensor


def nhwc_images(A: Tensor) -> bool:
    """``A`` is channels_last per image and not NCHW-contiguous (any batch stride)."""
    _, C4, H, W = A.shape
    return (not A.is_contiguous() and A.stride(1) == 1 and (W == 1 or A.stride(3) == C4)
            and (H == 1 or A.stride(2) == W * C4))


def layout_of(A: Tensor) -> torch.memory_format:
    """The memory format of the op's ``(B, C, H, W)`` tensors and ``dA`` for this ``A``."""
    return torch.channels_last if nhwc_images(A) else torch.contiguous_format


def empty_in(shape, like: Tensor, fmt: torch.memory_format, dtype=None) -> Tensor:
    """An empty tensor of ``shape`` on ``like``'s device in layout ``fmt`` (for fake kernels)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)
