"""Checks at the public boundary: clear errors that name the argument, expected and actual values.

Policies decided here (and tested in ``tests/test_robustness.py``):

* **Empty batch.** ``B = 0`` is valid for the modules on every backend: the output is an empty
  ``(0, C, H, W)`` tensor (the modules run the reference math for it, so no kernel ever sees an
  empty launch).  Zero time steps or an empty ``H x W`` are errors.  The fused *ops* reject empty
  tensors with a clear error (:func:`check_lstm_cell_args`, :func:`check_lstm_attention_args`).
* **Dtypes.** Outside autocast, ``x``, the states and the parameters share one floating dtype.
  Under ``torch.autocast`` ``x`` may differ from the parameters (autocast casts the convs); the
  states must still have ``x``'s dtype.
* **Devices.** ``x``, the states and the parameters are on one device.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` when it is a positive integer of any integral type (``numpy.int64``
    too: upstream passes constructor values straight to ``nn.Conv2d``, which takes them); not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_kernel_size(kernel_size) -> int:
    """``kernel_size`` as an ``int``: positive and odd."""
    if isinstance(kernel_size, bool) or not (isinstance(kernel_size, numbers.Integral) and kernel_size > 0
                                             and kernel_size % 2 == 1):
        raise ValueError(
            f"kernel_size must be a positive odd int (the 'same' padding (k-1)//2 needs odd), got {kernel_size!r}"
        )
    return int(kernel_size)


def check_attention_size(attention_size) -> Optional[float]:
    """``attention_size``: None (meaning ``H*W`` at run time) or a positive finite number -- upstream
    only takes ``math.sqrt`` of it, so a float (or a numpy number) is as good as an int there."""
    if attention_size is None:
        return None
    if (isinstance(attention_size, bool) or not isinstance(attention_size, numbers.Real)
            or not math.isfinite(attention_size) or attention_size <= 0):
        raise ValueError(f"attention_size must be a positive number or None (meaning H*W), got {attention_size!r}")
    return int(attention_size) if isinstance(attention_size, numbers.Integral) else float(attention_size)


def check_input(x, in_channels: int, who: str) -> Tensor:
    """``x`` as ``(B, T, Cin, H, W)``; a 4-D ``(B, Cin, H, W)`` is taken as ``T = 1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    given = tuple(x.shape)  # the messages name the shape as passed, not the 4-D input's 5-D view
    if x.dim() == 4:
        x = x.unsqueeze(1)
    if x.dim() != 5:
        raise ValueError(
            f"{who}: x must be (B, T, {in_channels}, H, W) or (B, {in_channels}, H, W), "
            f"got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if x.shape[2] != in_channels:
        raise ValueError(f"{who}: x has {x.shape[2]} channels, expected in_channels={in_channels} (x shape {given})")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: x must be a floating tensor (one of {[str(d) for d in _FLOAT_DTYPES]}), got dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{who}: x has T=0 time steps (shape {given}); need at least one")
    if x.shape[3] == 0 or x.shape[4] == 0:
        raise ValueError(f"{who}: x has an empty H x W = {x.shape[3]} x {x.shape[4]} (shape {given}); need H, W >= 1")
    return x


def check_matches_parameters(x: Tensor, param: Optional[Tensor], who: str, name: str) -> None:
    """``x`` on the device of the module's parameter ``name``; same dtype too, unless autocast is on
    for that device."""
    if param is None:
        return
    what = f"the module's parameter {name} is"
    if x.device != param.device:
        raise ValueError(
            f"{who}: x is on {x.device} but {what} on {param.device}; "
            f"move one of them (e.g. module.to({str(x.device)!r}))"
        )
    if x.dtype == param.dtype:
        return
    if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, param.dtype):
        return  # autocast casts both for the convs and matmuls
    raise TypeError(
        f"{who}: x has dtype {x.dtype} but {what} {param.dtype}; cast one "
        f"(e.g. module.to({x.dtype}) or x.to({param.dtype})) or run under torch.autocast"
    )


def check_state(state, x: Tensor, hidden: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
    """``state``: one ``(h, c)`` per layer, each ``(B, C_l, H, W)`` with ``x``'s device and dtype."""
    if isinstance(state, Tensor) or not isinstance(state, (list, tuple)):
        raise TypeError(f"state must be a list of (h, c) pairs, one per layer, got {type(state).__name__}")
    state = list(state)
    if len(state) != len(hidden):
        raise ValueError(f"state must hold one (h, c) per layer: expected {len(hidden)}, got {len(state)}")
    B, _, _, H, W = x.shape
    for layer, (pair, C) in enumerate(zip(state, hidden)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"state[{layer}] must be a (h, c) pair, got {type(pair).__name__}")
        for name, t in zip(("h", "c"), pair):
            expected = (B, C, H, W)
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                raise ValueError(
                    f"state[{layer}] {name} must have shape (B, C, H, W) = {expected} to match x {tuple(x.shape)} "
                    f"and hidden_channels[{layer}]={C}, got {_shape(t)}"
                )
            if t.device != x.device:
                raise ValueError(f"state[{layer}] {name} is on {t.device}, expected x's device {x.device}")
            if t.dtype != x.dtype:
                raise TypeError(f"state[{layer}] {name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
    return [(h, c) for h, c in state]


# --------------------------------------------------------------------------------------------
# Fused ops (``salstm_kernels::lstm_cell`` / ``lstm_attention``)
# --------------------------------------------------------------------------------------------
def _check_tensor(op: str, name: str, t, expected: Tuple[int, ...], ref: Optional[Tensor], ref_name: str):
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be floating, got dtype {t.dtype}")
    if ref is not None:
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {ref_name}'s device {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {ref_name}'s dtype {ref.dtype}")


def check_lstm_cell_args(A, c, op: str = "lstm_cell", bias=None) -> None:
    """``A (B, 4C, H, W)`` and ``c (B, C, H, W)``: 4-D, same dtype and device, non-empty; the conv
    ``bias`` None or ``(4C,)`` with ``A``'s dtype and device."""
    if not isinstance(c, Tensor):
        raise TypeError(f"{op}: c must be a torch.Tensor, got {type(c).__name__}")
    if not isinstance(A, Tensor):
        raise TypeError(f"{op}: A must be a torch.Tensor, got {type(A).__name__}")
    if c.dim() != 4:
        raise ValueError(f"{op}: c must be 4-D (B, C, H, W), got {c.dim()}-D shape {tuple(c.shape)}")
    if A.dim() != 4:
        raise ValueError(f"{op}: A must be 4-D (B, 4C, H, W), got {A.dim()}-D shape {tuple(A.shape)}")
    if c.numel() == 0:
        raise ValueError(
            f"{op}: empty tensors are not supported by the fused ops (c shape {tuple(c.shape)}); "
            "the modules handle B=0 themselves"
        )
    B, C, H, W = c.shape
    if tuple(A.shape) != (B, 4 * C, H, W):  # (either may be the wrong one: say what it is measured by)
        raise ValueError(f"{op}: A must have shape (B, 4C, H, W) = {(B, 4 * C, H, W)} to match c of shape "
                         f"(B, C, H, W) = {tuple(c.shape)}, got {tuple(A.shape)}")
    _check_tensor(op, "A", A, tuple(A.shape), None, "")  # (its type and dtype; the shape is checked above)
    _check_tensor(op, "c", c, (B, C, H, W), A, "A")
    if bias is not None:
        _check_tensor(op, "bias", bias, (4 * C,), A, "A")


def check_lstm_cell_zero_state_args(A, bias=None, op: str = "lstm_cell_zero_state") -> None:
    """``A (B, 3C, H, W)`` (gate rows i, o, g), non-empty, floating; the conv ``bias`` None or
    ``(3C,)`` with ``A``'s dtype and device."""
    if not isinstance(A, Tensor):
        raise TypeError(f"{op}: A must be a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 4:
        raise ValueError(f"{op}: A must be 4-D (B, 3C, H, W) (gate rows i, o, g), got {A.dim()}-D shape "
                         f"{tuple(A.shape)}")
    if A.shape[1] % 3 != 0 or A.shape[1] == 0:
        raise ValueError(f"{op}: A must be (B, 3C, H, W) (gate rows i, o, g): its {A.shape[1]} channels are "
                         f"not a positive multiple of 3 (shape {tuple(A.shape)})")
    if A.numel() == 0:
        raise ValueError(f"{op}: empty tensors are not supported by the fused ops (A shape {tuple(A.shape)}); "
                         "the modules handle B=0 themselves")
    _check_tensor(op, "A", A, tuple(A.shape), None, "")
    if bias is not None:
        _check_tensor(op, "bias", bias, (A.shape[1],), A, "A")


def check_lstm_attention_args(A, c, wq=None, bq=None, wk=None, bk=None, wv=None, bv=None,
                              scale: Optional[float] = 1.0, combination: str = "linear", bias=None,
                              op: str = "lstm_attention") -> None:
    """Boundary checks of ``lstm_attention(A, c, wq, bq, wk, bk, wv, bv, scale, combination, backend)``.

    ``A (B, 4C, H, W)``, ``c (B, C, H, W)`` (same dtype and device, non-empty); the projections all
    given (``w (C, C)``, ``b (C,)``, with ``A``'s device and dtype) or all ``None``;
    ``combination`` "linear" / "nonlinear" / "none" (the last needs projections); ``scale`` finite,
    or None (``1/sqrt(H*W)``).
    """
    check_lstm_cell_args(A, c, op, bias)
    from .reference import COMBINATIONS

    if combination not in COMBINATIONS:
        raise ValueError(f"{op}: combination must be one of {COMBINATIONS}, got {combination!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale
                              or scale in (float("inf"), float("-inf"))):
        raise ValueError(f"{op}: scale must be a finite float or None (1/sqrt(H*W)), got {scale!r}")
    names = ("wq", "bq", "wk", "bk", "wv", "bv")
    proj = (wq, bq, wk, bk, wv, bv)
    given = [p is not None for p in proj]
    if not any(given):
        if combination == "none":
            raise ValueError(f"{op}: combination='none' needs the projections wq, bq, wk, bk, wv, bv")
        return
    if not all(given):
        missing = [n for n, g in zip(names, given) if not g]
        raise ValueError(f"{op}: projections must be all given or all None; missing {missing}")
    C = c.shape[1]
    for name, p in zip(names, proj):
        expected = (C, C) if name.startswith("w") else (C,)
        if not isinstance(p, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != expected:
            raise ValueError(f"{op}: {name} must have shape {expected} (C={C} from c), got {tuple(p.shape)}")
        if p.device != A.device:
            raise ValueError(f"{op}: {name} is on {p.device}, expected A's device {A.device}")
        if p.dtype != A.dtype:
            raise TypeError(f"{op}: {name} has dtype {p.dtype}, expected A's dtype {A.dtype}")


# --------------------------------------------------------------------------------------------
# Backward ops (``salstm_kernels::*_backward``): called by hand or traced, their arguments are
# checked like the forward's (a wrong-shaped gradient would make a kernel read out of bounds).
# The modules' eager backward skips these: its arguments are the forward's checked inputs and
# the gradients autograd hands over, shaped as the outputs.
# --------------------------------------------------------------------------------------------
def _check_state_grads(op: str, state_shape, A: Tensor, **grads) -> None:
    """Each given gradient (None: none arrived) shaped as the state, with ``A``'s dtype and device."""
    for name, g in grads.items():
        if g is not None:
            _check_tensor(op, name, g, tuple(state_shape), A, "A")


def check_lstm_cell_backward_args(A, c, dh, dc_new, bias=None) -> None:
    """``lstm_cell_backward``: the forward's ``A, c, bias`` and ``dh, dc_new`` None or shaped as ``c``."""
    op = "lstm_cell_backward"
    check_lstm_cell_args(A, c, op, bias)
    _check_state_grads(op, c.shape, A, dh=dh, dc_new=dc_new)


def check_lstm_cell_zero_state_backward_args(A, dh, dc_new, bias=None) -> None:
    """``lstm_cell_zero_state_backward``: the forward's ``A (B, 3C, H, W), bias`` and ``dh, dc_new``
    None or ``(B, C, H, W)``."""
    op = "lstm_cell_zero_state_backward"
    check_lstm_cell_zero_state_args(A, bias, op)
    B, C3, H, W = A.shape
    _check_state_grads(op, (B, C3 // 3, H, W), A, dh=dh, dc_new=dc_new)


def check_lstm_attention_backward_args(A, c, wq, bq, wk, bk, wv, bv, P, dout, dh, dc_new, scale, combination,
                                       h=None, bias=None) -> None:
    """``lstm_attention_backward``: the forward's arguments; ``P (B, C, C)`` as the forward returned
    it (float32, float64 for float64 ``A``); ``dout`` shaped as ``c``, ``dh, dc_new`` and the
    forward's ``h`` None or shaped as ``c``, all in ``A``'s dtype."""
    op = "lstm_attention_backward"
    check_lstm_attention_args(A, c, wq, bq, wk, bk, wv, bv, scale, combination, bias, op)
    B, C = c.shape[:2]
    _check_state_grads(op, c.shape, A, dh=dh, dc_new=dc_new, h=h)
    _check_tensor(op, "dout", dout, tuple(c.shape), A, "A")
    _check_tensor(op, "P", P, (B, C, C), None, "")
    p_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    if P.dtype != p_dtype or P.device != A.device:
        raise TypeError(f"{op}: P must be the forward's softmax, {p_dtype} on {A.device}, got {P.dtype} on {P.device}")
