"""The prepared GPU commands still run: ``benchmarks/gpu_check.py`` and ``benchmarks/gpu_tune.py``
with ``--cpu-smoke`` (tiny shapes, Triton interpreter).  A GPU session has minutes; a script that
broke since the last one would waste them."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--cpu-smoke", *args],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
    return out


def test_gpu_check_cpu_smoke():
    out = _run("gpu_check.py", "--no-compile")
    last = out.strip().splitlines()[-1]
    assert last.startswith("parity: ") and " 0 FAIL" in last and not last.startswith("parity: 0 PASS"), last
    assert "triton blocked" in out and "SUMMARY" in out  # the forced-blocked A/B and the table ran


def test_gpu_tune_cpu_smoke():
    out = _run("gpu_tune.py", "--no-compile", "--sweep-budget-s", "30")
    last = out.strip().splitlines()[-1]
    assert last.startswith("parity: ") and " 0 FAIL" in last and not last.startswith("parity: 0 PASS"), last
    for impl in ("eager", "triton current", "triton tuned", "tuned, cat conv", "tuned, cudnn.bm"):
        assert impl in out, impl
    assert "GPU_LAUNCH = {" in out and "BLOCKED_AT_CP64 = " in out
