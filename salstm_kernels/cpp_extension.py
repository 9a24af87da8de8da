"""Loader for the optional compiled CPU extension (``salstm_kernels._C``, built by setup.py).

The package works without it: :func:`status` says why it is missing and ``auto`` then uses the
reference backend.
"""
from __future__ import annotations

import functools
import os
from typing import Tuple

SKIP_ENV = "SALSTM_KERNELS_NO_CPP"


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, str]:
    """``(loaded, reason)``: whether the C++ kernels are registered with the dispatcher."""
    if os.environ.get(SKIP_ENV, "0") not in ("", "0"):
        return False, f"disabled by {SKIP_ENV}"
    try:
        from . import _C  # noqa: F401  (registers torch.ops.salstm_kernels_cpp.*)
    except ImportError as e:
        return False, f"C++ extension not built ({e}); build it with `pip install --no-build-isolation -e .`"
    return True, ""


def is_available() -> bool:
    return status()[0]
