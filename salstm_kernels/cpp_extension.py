"""Loader for the optional compiled CPU extension (``salstm_kernels._C``, built by setup.py).

The package works without it: :func:`status` says why it is missing and ``auto`` then uses the
reference backend.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Tuple

SKIP_ENV = "SALSTM_KERNELS_NO_CPP"


def switched_off() -> bool:
    """Whether ``SALSTM_KERNELS_NO_CPP`` switches the extension off on purpose (``auto`` then uses
    the reference without a fallback note)."""
    return os.environ.get(SKIP_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, str]:
    """``(loaded, reason)``: whether the C++ kernels are registered with the dispatcher."""
    if switched_off():
        return False, f"disabled by {SKIP_ENV}"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.salstm_kernels_cpp.*)
    except ImportError as e:
        return False, f"C++ extension not built ({e}); build it with `pip install --no-build-isolation -e .`"
    cap = os.environ.get(CAPABILITY_ENV, "")
    if cap not in CAPABILITIES:  # the C++ side reads only the exact names, and ignores the rest
        warnings.warn(f"{CAPABILITY_ENV}={cap!r} is ignored: expected one of {CAPABILITIES[1:]}; the row kernels "
                      f"run {_row_kernels()}", RuntimeWarning)
    return True, ""


#: Caps the C++ row kernels' instruction set (read once, by the extension), for comparisons.
CAPABILITY_ENV = "SALSTM_KERNELS_CPU_CAPABILITY"
CAPABILITIES = ("", "default", "avx2", "avx512")


def capability() -> str:
    """The row-kernel build the C++ extension runs (``avx512``, ``avx2``, ``default``), or why none."""
    ok, reason = status()
    return _row_kernels() if ok else f"none ({reason})"


def _row_kernels() -> str:
    """The loaded extension's answer (``status`` asks it too, before its own result is cached)."""
    import torch

    return torch.ops.salstm_kernels_cpp.cpu_capability()


def is_available() -> bool:
    return status()[0]
