"""Warnings that point at the user's line: the first caller outside this package and outside
``torch.nn``'s module-call machinery (a fixed ``stacklevel`` named ``module.py`` or one of ours,
depending on how deep the call was)."""
from __future__ import annotations

import os
import sys
import warnings

import torch

_SKIP_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
              os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "nn", "modules") + os.sep)


def warn_user(message: str, category: type = UserWarning) -> None:
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIP_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
