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
    # 17 kernels x 3 layouts (2 of them GATES=3: the zero-state cell, 3 with PROJ: the matmul path's
    # rows kernels, 1 DW_APART: the single-pass backward with its dW sums apart), the 8 attention
    # kernels with projections once more with float32-operand dots, 5 partial-reduction variants,
    # 4 cell_bwd_plane / _pixels ones
    assert "68 variants" in out, out[-3000:]


def test_blocks_per_sm_follows_the_occupancy_rules():
    """sm90_stats's occupancy column (sm_90: 228 KiB shared memory with 1 KiB reserved per block,
    64K registers in 256-register warp units, 64 warps, 32 blocks per SM)."""
    from salstm_kernels.triton.sm90_stats import blocks_per_sm

    assert blocks_per_sm(163840, 255, 4) == 1  # shared memory bound: 2 x 161 KiB > 228 KiB
    assert blocks_per_sm(61440, 255, 4) == 2  # register bound: 4 warps x 8192 registers x 2 = 64K
    assert blocks_per_sm(0, 32, 4) == 16  # warp bound: 64 warps / 4
    assert blocks_per_sm(0, 16, 1) == 32  # block bound
    assert blocks_per_sm(75 * 1024, 64, 4) == 3  # 3 x 76 KiB fit in 228 KiB, 4 would not


def test_stage_survey_covers_every_tuned_direction():
    """``sm90_stats --stages``: each C = 64 direction of the launch table (the ones routed elsewhere at
    the single-pass heuristics' launch) has both of its single-pass kernels at depths 1, 2, 3."""
    from salstm_kernels.triton import lstm_attention as la
    from salstm_kernels.triton import sm90_stats

    all_rows = list(sm90_stats.stage_variants())
    rows = [r for r in all_rows if not r[0].endswith("dw_apart")]
    directions = {k[1:] for k in la.GPU_LAUNCH} | set(la.PATH_AT_CP64)
    per_dtype = {fp32: len(sm90_stats._dtypes_of(fp32)) for fp32 in (False, True)}
    assert len(rows) == sum(per_dtype[fp32] for _, _, fp32 in directions) * 2 * 3
    # the LSTM-SA backward's dW-apart candidates (the attention_bwd kernel at 4 and 8 warps, 3 depths),
    # unless the table ships dw_apart (then its own rows are those)
    apart = [r for r in all_rows if r[0].endswith("dw_apart")]
    shipped_apart = [k for k, launch in la.GPU_LAUNCH.items() if launch.dw_apart]
    if not shipped_apart:
        assert len(apart) == sum(per_dtype[fp32] for bwd, gated, fp32 in directions if bwd and gated) * 2 * 3
    assert all(r[3]["DW_APART"] and r[1] is la._attention_bwd_kernel for r in apart)
    assert not any(r[3].get("DW_APART") for r in rows)
    assert {r[-1] for r in rows} == {1, 2, 3}
    assert all(r[3].get("HAS_BIAS") for r in rows if "HAS_BIAS" in r[1].arg_names)  # as the modules launch
    assert any(r[0].startswith("attention_bwd_kernel fp32 gated=0 BN=16 warps=8 stages=1") for r in rows)
