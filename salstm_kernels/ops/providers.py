"""Kernel providers: what computes a fused op for a given backend name.

A provider is a module with six functions (the *kernel contract*).  Tensors are contiguous NCHW,
or, when ``A`` is channels_last per image, every ``(B, C, H, W)`` tensor is channels_last (see
:mod:`.layout`; the op layer converts inputs and outputs to that layout, so a provider that only
computes NCHW still gives correct results, with copies; the ``cpp`` provider runs it natively):

``cell_forward(A, c) -> (h, c_new)``
    ``A (B, 4C, H, W)`` conv output (gate order i, f, o, g), ``c (B, C, H, W)``; outputs ``(B, C, H, W)``.
``cell_backward(A, c, dh, dc_new) -> (dA, dc)``
    gate activations recomputed from ``A`` and ``c`` (nothing else saved).
``cell_zero_state_forward(A) -> (h, c_new)``, ``cell_zero_state_backward(A, dh, dc_new) -> (dA,)``
    the cell from a zero state (:mod:`.lstm_cell_zero_state`): ``A (B, 3C, H, W)`` holds gate rows
    i, o, g only (the forget gate multiplies the zero ``c``); no ``c`` in, no ``dc`` out.
``attention_forward(A, c, projections, scale, combination) -> (out, h, c_new, P)``
    last step: cell + QKV formation + channel attention.  ``projections`` is ``None`` (SA-LSTM) or
    ``(wq, bq, wk, bk, wv, bv)`` with ``w (C, C)``, ``b (C,)`` (LSTM-SA, separated baseline).
    ``combination`` is "linear", "nonlinear" or "none" (projections only).  ``P (B, C, C)``
    is the softmax of the scaled scores, saved for backward.
``OPTIONAL_STATE_GRADS`` (optional attribute, default False)
    when True, the backward functions accept ``None`` for ``dh`` / ``dc_new`` (no gradient arrived
    on that output) and read it as zero without a zero tensor; otherwise the op layer passes zeros.
``FOLDS_BIAS`` (optional attribute, default False)
    when True, every function above takes a trailing ``bias=None``: the bias of the conv that
    produced ``A`` (one value per row of ``A``), which then ran without it; the kernels add it as
    they load ``A`` (no separate pass over ``A``).  Given a bias, the backward functions return its
    gradient as one more trailing element (float32, one per row of ``A``: ``dA`` summed over batch
    and pixels, e.g. from sums the kernels take as they write ``dA``).
    Otherwise the op layer adds the bias to ``A`` first (:func:`biased`) and sums ``dA``.
``supported_dtypes(device_type) -> tuple of torch.dtype`` (optional; default: all four float types)
    the input dtypes the provider computes; others raise a clear ``TypeError``.
``attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h=None)``
    ``-> (dA, dc, dprojections or None)``; ``dh, dc_new`` are the gradients arriving on the returned
    states, honoured in addition to ``dout``.  ``h`` is the forward's ``h'`` (saved by autograd, as
    it is an output anyway) when the provider sets ``USES_FORWARD_H = True``, else ``None``; the
    ``cpp`` provider uses it for ``V`` and skips a pass over ``A``.

Outputs have ``A``'s dtype; accumulation and the softmax are float32 (float64 for float64 inputs,
so gradcheck can run; ``P`` then is float64 too).
"""
from __future__ import annotations

import contextlib
import importlib
from types import ModuleType
from typing import Optional, Set, Tuple

import torch

from ..backends import check_available, mark_constant_result

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_PROVIDERS = {
    "reference": "salstm_kernels.ops.reference_kernels",
    "triton": "salstm_kernels.triton",
    "cpp": "salstm_kernels.cpp_kernels",
}


#: ``(backend, device type)`` pairs whose availability check passed (see :func:`kernels`).
_RUNS_ON: Set[Tuple[str, str]] = set()


def kernels(backend: str, device_type: Optional[str] = None) -> ModuleType:
    """The provider module of ``backend``; with ``device_type`` (the op bodies pass their input's),
    first the check that it runs there (:func:`salstm_kernels.backends.check_available`): a graph
    exported with one backend can be run where that backend is missing, e.g. a Triton graph on a
    CPU without the interpreter, which Triton itself answers with "0 active drivers"."""
    try:
        path = _PROVIDERS[backend]
    except KeyError:
        raise ValueError(f"no fused kernels for backend {backend!r}; expected one of {list(_PROVIDERS)}") from None
    if device_type is not None and (backend, device_type) not in _RUNS_ON:
        check_available(backend, device_type)
        _RUNS_ON.add((backend, device_type))  # (a backend that ran stays available: checked once)
    return importlib.import_module(path)


def state_grads_for(provider: ModuleType, like: torch.Tensor, fmt: torch.memory_format, *grads):
    """``grads`` (each a tensor or None) as ``provider``'s backward takes them: in layout ``fmt``, and
    None replaced by zeros unless the provider reads None as zero (``OPTIONAL_STATE_GRADS``)."""
    keep_none = getattr(provider, "OPTIONAL_STATE_GRADS", False)
    return tuple((None if keep_none else torch.zeros_like(like, memory_format=fmt)) if g is None
                 else g.contiguous(memory_format=fmt) for g in grads)


def bias_kwargs(bias) -> dict:
    """The trailing ``bias`` argument of a folding provider's functions (none when there is no bias)."""
    return {} if bias is None else {"bias": bias}


def folds_bias(provider: ModuleType) -> bool:
    return getattr(provider, "FOLDS_BIAS", False)


@mark_constant_result
def backend_folds_bias(backend: str) -> bool:
    """Whether ``backend``'s kernels fold the conv bias (a constant to ``torch.compile``, which
    cannot trace the provider import)."""
    return folds_bias(kernels(backend))


def plain(*tensors):
    """The tensors as plain ``torch.Tensor`` where they are ``__torch_function__`` subclasses (MONAI's
    ``MetaTensor``): the kernels compute on data, and such a subclass would run its Python override
    on every torch call inside them (and Triton's interpreter cannot copy one).  ``None`` and
    ``__torch_dispatch__`` subclasses (fake and functional tensors) are left as they are; the caller
    of the op still gets its subclass back from the subclass's own ``__torch_function__``."""
    return tuple(t if t is None or type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)
                 or type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__ else t.as_subclass(torch.Tensor)
                 for t in tensors)


def autocast_off(A: torch.Tensor):
    """A context that turns autocast off for ``A``'s device while a provider computes (else nothing).

    The ops' contract is their own precision: outputs in ``A``'s dtype, accumulation and the
    softmax in float32.  Under ``torch.autocast`` the torch calls inside a provider (the reference
    provider's ``bmm``s, the Triton matmul path's cuBLAS products) would run in the autocast dtype:
    lower precision than the C++ and Triton kernels compute, a 16-bit ``P`` where float32 is
    promised, and a backward outside the autocast block (the usual AMP pattern) then met mixed
    dtypes and raised."""
    device_type = A.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def biased(provider: ModuleType, A: torch.Tensor, bias):
    """``(A, bias)`` as ``provider`` takes them: unchanged where it folds the bias, else ``A + bias``
    (in ``A``'s layout) and no bias."""
    if bias is None or folds_bias(provider):
        return A, bias
    return A + bias.view(1, -1, *([1] * (A.dim() - 2))), None


def bias_grad(result, n: int, dA: torch.Tensor, bias, wanted: bool = True) -> torch.Tensor:
    """The bias gradient a backward op returns, ``(A.shape[1],)`` float32 (float64 for float64 ``dA``):
    what a folding provider's backward returned after its ``n`` usual outputs, or ``dA`` summed
    over batch and pixels where it returned nothing there (a provider that does not fold the bias);
    empty without a bias or when not ``wanted`` (no pass over ``dA`` then)."""
    if bias is None or not wanted:
        return bias_grad_like(dA, None)
    if len(result) > n:
        return result[n]
    return dA.sum(dim=[0, *range(2, dA.dim())], dtype=_accumulation_dtype(dA))


def bias_grad_like(A: torch.Tensor, bias, wanted: bool = True) -> torch.Tensor:
    """:func:`bias_grad`'s result as the fake kernels promise it: one per row of ``A``, or empty."""
    # a size tuple: tensor subclasses (MONAI's MetaTensor) reject a bare int there
    return A.new_empty((0 if bias is None or not wanted else A.shape[1],), dtype=_accumulation_dtype(A))


def _accumulation_dtype(A: torch.Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def supported_dtypes(backend: str, device_type: str) -> Tuple[torch.dtype, ...]:
    """Input dtypes the ``backend``'s kernels compute on ``device_type``."""
    claim = getattr(kernels(backend), "supported_dtypes", None)
    return tuple(claim(device_type)) if claim is not None else FLOAT_DTYPES
