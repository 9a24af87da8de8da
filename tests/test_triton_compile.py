"""Every Triton kernel compiles for sm_90 (H100 / H200) in every ``LAYOUT``, without a GPU.

The interpreter runs kernel bodies as Python, so it accepts code the compiler rejects (one such
case: a ``@triton.jit`` helper whose return statements had different types in constexpr branches
the compiler drops -- the interpreter ran it, the compiler refused it).  A GPU session has minutes;
this finds such errors in CI.  It runs ``sm90_stats --each-kernel`` in a subprocess: this test
process has the interpreter switched on (``conftest.py``), which replaces the compiler.
"""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_for_sm90():
    from salstm_kernels.triton.sm90_stats import _PTXAS

    if not os.path.exists(_PTXAS):
        pytest.skip(f"no ptxas in this Triton install ({_PTXAS})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    res = subprocess.run([sys.executable, "-m", "salstm_kernels.triton.sm90_stats", "--each-kernel"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    # 13 kernels x 3 layouts (2 of them GATES=3: the zero-state cell), 4 cell_bwd_plane / _pixels ones
    assert "43 variants" in out, out[-3000:]
