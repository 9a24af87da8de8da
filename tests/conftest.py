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
