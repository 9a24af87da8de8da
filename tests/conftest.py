import importlib.util
import os
import sys

import torch

# tests import the upstream stand-in (tests/upstream_model.py) by name
sys.path.insert(0, os.path.dirname(__file__))

# Without CUDA, the Triton kernels run on CPU tensors under the Triton interpreter.  It is switched
# on for the whole session, before anything imports Triton (it is read when a kernel is decorated),
# so every test that sweeps available_backends("cpu") covers the Triton backend too.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from salstm_kernels.testing import patch_triton_interpreter_once

    patch_triton_interpreter_once()


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def layouts_at_any_size(monkeypatch):
    """Test images are tiny, and below ``recurrence.CHANNELS_LAST_MIN_PIXELS`` the cpp convs would
    always run NCHW.  So tests get the layout ``CHANNELS_LAST_CONVS`` names at every size (and the
    fixtures that vary it), and NCHW at small images where they ask for it (``small_images``)."""
    from salstm_kernels import recurrence

    monkeypatch.setattr(recurrence, "CHANNELS_LAST_MIN_PIXELS", {})


@pytest.fixture
def small_images(monkeypatch):
    """Every image small (see ``layouts_at_any_size``): NCHW convs on every device."""
    from salstm_kernels import recurrence

    monkeypatch.setattr(recurrence, "CHANNELS_LAST_MIN_PIXELS", {"cpu": (2**62, 0), "cuda": (2**62, 0)})
