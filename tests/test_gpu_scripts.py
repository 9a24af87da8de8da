"""The prepared GPU commands still run: ``benchmarks/gpu_check.py`` and ``benchmarks/gpu_tune.py``
with ``--cpu-smoke`` (tiny shapes, Triton interpreter).  A GPU session has minutes; a script that
broke since the last one would waste them."""
import importlib.util
import os
import re
import subprocess
import sys
import types

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
    # the routing table's A/B (every path forced at padded C = 64) and the table ran
    for path in ("single-pass", "channel-blocked", "channel-blocked, matmul products"):
        assert f"C=40 {path} (forced)" in out, path
    assert "SUMMARY" in out
    assert "PASS  module SALSTM2d(linear) B2 T2 Cin3 C8 5x3 state NHWC convs" in out
    assert out.count("PASS  op 64-bit offsets B1 C64 9x7") == 2  # the >2^31 cases' harness, both layouts


def test_gpu_check_wide_only_cpu_smoke():
    """``--wide-only``: parity of both product paths at C > 64 and their non-conv rows."""
    out = _run("gpu_check.py", "--wide-only")
    last = out.strip().splitlines()[-1]
    assert last.startswith("parity: ") and " 0 FAIL" in last and not last.startswith("parity: 0 PASS"), last
    for path in ("triton-dots", "matmul-products"):
        assert f"PASS  op attention LSTM-SA/linear B1 C72 5x3 {path}" in out, path
        assert f"PASS  op attention SA-LSTM/linear B1 C72 5x3 NHWC {path}" in out, path
    assert "triton matmul" in out and "matmul products (forced)" in out and "SUMMARY" in out


def test_gpu_tune_cpu_smoke():
    out = _run("gpu_tune.py", "--no-compile", "--sweep-budget-s", "30", "--extra-ab")
    last = out.strip().splitlines()[-1]
    assert last.startswith("parity: ") and " 0 FAIL" in last and not last.startswith("parity: 0 PASS"), last
    assert "PASS  op cell B1 C40 6x5 NHWC" in out and "PASS  op attention LSTM-SA/linear B1 C40 6x5 NHWC" in out
    # one row per implementation and conv form; on CPU the shipped form is NCHW split ("triton")
    rows = {m.group(1).strip() for m in re.finditer(r"^SA-LSTM 6x5 float32 +(\S.*?\S) +\d+\.\d+ ", out, re.M)}
    tuned = {"triton tuned"} if "new winner" in out else set()  # the sweep changed the tables
    assert rows == {"eager", "triton", "tuned NHWC cat", "tuned NCHW cat", "tuned, conv bias", "tuned, 4-gate t0",
                    "eager, cudnn.bm",
                    "tuned, cudnn.bm", "eager, ch_last"} | tuned, rows
    assert "convs alone" in out and "cat conv Cin=2C" in out
    assert "GPU_LAUNCH = {" in out and "PATH_AT_CP64 = {" in out
    assert "bwd LSTM-SA float32 matmul / dw_apart points: " in out


def test_profile_rows_attribute_device_time():
    """The profile parser on stand-in events: kernels split into ours / conv-like / other, and the
    host operators ranked by the device time of what they launched."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    import torch

    def ev(key, dev, self_t=0.0, total=0.0):
        cuda = torch.autograd.DeviceType.CUDA if dev else torch.autograd.DeviceType.CPU
        return types.SimpleNamespace(key=key, device_type=cuda, self_device_time_total=self_t, device_time_total=total)

    events = [ev("_attention_bwd_kernel", True, 2000.0), ev("sm90_xmma_fprop_implicit_gemm", True, 6000.0),
              ev("elementwise_kernel", True, 2000.0), ev("aten::copy_", False, total=2000.0),
              ev("aten::convolution", False, total=6000.0), ev("cudaLaunchKernel", False, total=10.0),
              ev("LstmAttentionFunction", False, total=2000.0)]  # an op entry (ops.dispatch)
    split, kernels, ops = gpu_check.profile_rows(events, 2, {"_attention_bwd_kernel"})
    assert split == "device time/step 5.000 ms: ours 20%, conv-like 60%, other 20%"
    assert kernels[0] == ("sm90_xmma_fprop_implicit_gemm", 3.0) and len(kernels) == 3
    # runtime calls are not operators
    assert ops == [("aten::convolution", 3.0), ("aten::copy_", 1.0), ("LstmAttentionFunction", 1.0)]


def _gpu_tune():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_tune
    finally:
        sys.path.pop(0)
    return gpu_tune


@pytest.fixture
def fixed_tables(monkeypatch):
    """Launch tables with one direction on each path (not the shipped ones: a sweep may change those)."""
    gpu_tune = _gpu_tune()
    la = gpu_tune.la
    monkeypatch.setattr(la, "GPU_LAUNCH", {
        ("blocked", True, False, True): la.Launch(32, 2, 4, 64),
        ("single", True, True, False): la.Launch(16, 2, 4),
        ("matmul", False, True, True): la.Launch(64, 2, 4, 64, num_stages=2),
    })
    monkeypatch.setattr(la, "PATH_AT_CP64", {(True, False, True): "blocked", (False, True, True): "matmul"})
    return gpu_tune


def test_sweep_tries_pipelining_depths_first(fixed_tables):
    """``gpu_tune``'s sweep order: the shipped launch at depths 1 and 2, for the LSTM-SA backward the
    single-pass launch with the dW sums apart at 4 and 8 warps, then each other path's table or
    heuristics launch (Triton-dots paths at depth 1, the matmul path as set), then the three grids
    once each; the printed table entries read back as the same Launch."""
    gpu_tune = fixed_tables
    la = gpu_tune.la
    for key, path in (((True, False, True), "blocked"), ((True, True, False), "single"),
                      ((False, True, True), "matmul")):
        pts = gpu_tune.candidates(key, smoke=False)
        path0, launch0 = gpu_tune.shipped_setting(key)
        assert path0 == path and launch0 == la.GPU_LAUNCH[(path, *key)]
        assert pts[:2] == [(path0, launch0._replace(num_stages=1)), (path0, launch0._replace(num_stages=2))]
        others = [(p, la.GPU_LAUNCH.get((p, *key)) or la.heuristic_launch(p, *key, 64)) for p in la.PATHS
                  if p != path0]
        others = [(p, lt if p == "matmul" else lt._replace(num_stages=1)) for p, lt in others]
        apart = []
        if key[0] and key[1]:
            single = la.GPU_LAUNCH[("single", *key)]  # (16, 2, 4) in these tables
            apart = [("single", single._replace(dw_apart=True, num_warps=w)) for w in (4, 8)]
        assert pts[2:4 + len(apart)] == apart + others and {p for p, _ in pts[:4 + len(apart)]} == set(la.PATHS)
        grids = [(p, lt) for p in la.PATHS for lt in gpu_tune.grid(p, False, key)]
        assert {p for p, _ in grids} == {"single", "blocked", "matmul"}
        assert any(lt.dw_apart for _, lt in grids) == (key[0] and key[1])  # only the LSTM-SA backward
        assert len(pts) == len(set(pts)) and set(grids) <= set(pts) and len(pts) <= len(grids) + 6
    # the float32 SA-LSTM backward: the single-pass launch sm90_stats --stages compiles (8 warps)
    assert gpu_tune.candidates((True, False, True), False)[2] == ("single", la.Launch(16, 2, 8, num_stages=1))
    for launch in (la.Launch(16, 2, 4), la.Launch(32, 2, 4, 64, "tf32x3"), la.Launch(16, 2, 8, num_stages=1),
                   la.Launch(16, 1, 8, dw_apart=True)):
        assert eval(gpu_tune.launch_literal(launch), {"Launch": la.Launch}) == launch


def test_sweep_results_set_one_path_and_launch_per_direction(fixed_tables):
    """``gpu_tune.apply`` (a sweep's winners) and ``setting`` (one point): each direction ends with
    one path in PATH_AT_CP64 (none for single-pass) and at most one GPU_LAUNCH entry, of that path;
    ``setting`` restores the tables on exit."""
    gpu_tune = fixed_tables
    la = gpu_tune.la

    def entries(key):
        return {p: la.GPU_LAUNCH[(p, *key)] for p in la.PATHS if (p, *key) in la.GPU_LAUNCH}

    key = (True, True, False)  # single-pass with an entry
    before = (dict(la.GPU_LAUNCH), dict(la.PATH_AT_CP64))
    with gpu_tune.setting(key, "matmul", la.Launch(32, 2, 8, 64)):
        assert la.PATH_AT_CP64[key] == "matmul" and entries(key) == {"matmul": la.Launch(32, 2, 8, 64)}
        assert gpu_tune.shipped_setting(key) == ("matmul", la.Launch(32, 2, 8, 64))
    assert (la.GPU_LAUNCH, la.PATH_AT_CP64) == before
    gpu_tune.apply({key: (0.3, "matmul", la.Launch(64, 2, 4, 64))})
    assert la.PATH_AT_CP64[key] == "matmul" and entries(key) == {"matmul": la.Launch(64, 2, 4, 64)}
    gpu_tune.apply({key: (0.3, "blocked", None)})  # the blocked heuristics: routed, no entry
    assert la.PATH_AT_CP64[key] == "blocked" and entries(key) == {}
    gpu_tune.apply({(False, True, True): (0.1, "single", None)})  # back to single-pass: no route
    assert (False, True, True) not in la.PATH_AT_CP64 and entries((False, True, True)) == {}
    assert entries((True, False, True)) == {"blocked": la.Launch(32, 2, 4, 64)}  # untouched


def test_memory_peak_replay_lists_what_is_alive_at_the_peak():
    """``gpu_memory.py``'s trace replay on a stand-in allocator trace: the peak, the blocks alive at
    it (not those freed before or allocated after), and their allocation sites."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_memory
    finally:
        sys.path.pop(0)
    ours = [{"name": "module_case", "filename": "/salstm_kernels/benchmarks/gpu_check.py", "line": 2},
            {"name": "lstm_cell", "filename": "/x/salstm_kernels/ops/lstm_cell.py", "line": 7},
            {"name": "step", "filename": "/x/bench.py", "line": 1}]
    conv = [{"name": "at::native::conv", "filename": "Conv.cpp", "line": 3},
            {"name": "backward", "filename": "/usr/torch/autograd/__init__.py", "line": 9}]
    trace = [dict(action="alloc", addr=1, size=400, frames=ours),      # 400
             dict(action="alloc", addr=2, size=100, frames=conv),      # 500
             dict(action="free_requested", addr=2, size=100),          # 400 (allocated bytes drop here)
             dict(action="free_completed", addr=2, size=100),          # back in the pool: no change
             dict(action="segment_alloc", addr=9, size=5000),          # reserved memory: not counted
             dict(action="alloc", addr=3, size=300, frames=conv),      # 700: the peak
             dict(action="free_completed", addr=1, size=400),          # 300
             dict(action="alloc", addr=4, size=350, frames=ours)]      # 650
    peak, blocks = gpu_memory.live_at_peak(trace)
    assert peak == 700 and [s for s, _ in blocks] == [400, 300]
    assert gpu_memory.allocation_site(blocks[0][1]) == "lstm_cell lstm_cell.py:7"
    assert gpu_memory.allocation_site(blocks[1][1]) == "backward __init__.py:9"
    text = gpu_memory.report(blocks, peak, unit=100, top=1)
    assert "7.0 units" in text and "4.00 u  lstm_cell lstm_cell.py:7" in text and "(1 smaller blocks)" in text


def test_gpu_session_script_names_runnable_commands():
    """``benchmarks/gpu_session.sh`` (the device-tool calls): valid bash, a clear usage error for an
    unknown stage, and every ``python benchmarks/<script> --flag`` it runs names an existing script
    that accepts those flags (a renamed flag would waste a GPU session's minutes)."""
    path = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    res = subprocess.run(["bash", path, "nope"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: bash benchmarks/gpu_session.sh check|tune|full|memory" in res.stderr
    text = open(path).read()
    calls = re.findall(r"^\s*run \S+ \d+ python (benchmarks/\S+\.py)((?: --[\w-]+(?: [\w.,]+)?)*)\s*(?:;;)?$", text, re.M)
    assert len(calls) == 6, calls
    env = dict(os.environ, PYTHONPATH=ROOT)
    for script, args in calls:
        assert os.path.exists(os.path.join(ROOT, script)), script
        helped = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0, helped.stderr[-2000:]
        for flag in re.findall(r"--[\w-]+", args):
            assert flag in helped.stdout, f"{script} does not take {flag}"


def test_gpu_session_script_exits_with_a_failed_commands_status(tmp_path):
    """The stage's exit status is its commands' (it was always 0: the last command was an echo), so
    the device tool's rc shows a failed check.  Stand-ins for ``python`` and ``nvidia-smi`` on PATH:
    every python call exits 3."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python", "echo stand-in python \"$@\"; exit 3"), ("nvidia-smi", "echo NVIDIA stand-in")):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"), REV="test")
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), "memory"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "== exit 3" in res.stdout
    logs = [p.name for p in (tmp_path / "out").iterdir()]
    assert any(n.endswith("-memory-test.log") for n in logs), logs


def test_our_kernel_names_cover_every_kernel_file():
    """The device-time split counts every Triton kernel of the package as ours (the partial-reduction
    kernels of ``attention_partials`` were counted as "other")."""
    pytest.importorskip("triton")
    import triton

    from salstm_kernels.triton import attention_blocked, attention_partials, lstm_attention, lstm_cell

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    names = gpu_check.our_kernel_names()
    for mod in (attention_blocked, attention_partials, lstm_attention, lstm_cell):
        kinds = (triton.runtime.JITFunction, triton.runtime.interpreter.InterpretedFunction)
        jitted = {o.fn.__name__ for o in vars(mod).values() if isinstance(o, kinds)}
        assert jitted and jitted <= names, mod.__name__


def test_gpu_check_widens_only_what_the_same_dtype_spec_misses_too(capsys):
    """``op_parity``'s allowance, as ``verify``'s: each tensor's tolerance becomes the larger of the
    table's and twice the error of the spec run in bfloat16 itself, and a zeroed output still
    fails; the row marks a widened tolerance with ``*``."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    import torch

    from salstm_kernels import reference
    from salstm_kernels.testing import random_projections, scaled_error

    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    A, c = torch.randn(2, 32, 3, 5, generator=g).to(dt), torch.randn(2, 8, 3, 5, generator=g).to(dt)
    up = tuple(torch.randn(2, 8, 3, 5, generator=g).to(dt) for _ in range(3))
    proj = tuple(p.detach() for p in random_projections(8, dt, generator=g))

    def spec(dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (A, c, *proj)]
        outs = list(reference.lstm_attention_ref(leaves[0], leaves[1], 0.3, "linear", tuple(leaves[2:])))
        return outs + list(torch.autograd.grad(outs, leaves, [u.to(dtype) for u in up]))

    refs64, same = spec(torch.float64), spec(dt)
    names = ["out", "h", "c'", "dA", "dc", "dWq", "dbq", "dWk", "dbk", "dWv", "dbv"]
    got = [torch.zeros_like(same[0])] + same[1:]  # a kernel with its output zeroed
    errs = [(n, scaled_error(x, r), i >= 3) for i, (n, x, r) in enumerate(zip(names, got, refs64))]
    widened = gpu_check._with_same_dtype_allowance(errs, dt, A, c, proj, 0.3, "linear", up, refs64)
    for (n, e, b, allowed), x, r in zip(widened, same, refs64):
        assert allowed == gpu_check.same_dtype_allowance(gpu_check.tolerance(dt, b), scaled_error(x, r)), n
    log = gpu_check.ParityLog()
    log.row("zeroed out", dt, widened)
    assert len(log.failures) == 1 and "worst out" in log.failures[0]
    log.row("widened", dt, [("dWq", 0.1, True, 0.2)])
    assert log.n_pass == 1 and "(0.50 of tol*)" in capsys.readouterr().out
