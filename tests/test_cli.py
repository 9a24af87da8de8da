"""The ``salstm-kernels`` command: bench writes complete results, verify catches broken backends.

Tiny shapes only.  The Triton interpreter is switched off here (other test modules turn it on), so
these tests time the CPU backends, not interpreted kernels.
"""
import csv
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from salstm_kernels import backends, bench, cli, verify
from salstm_kernels.ops import providers
from salstm_kernels.ops import reference_kernels as rk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN_LABELS = [label for label, _ in bench.DESIGNS]


@pytest.fixture(autouse=True)
def _no_triton_interpreter_one_thread(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # tiny shapes gain nothing from threads, and on a shared 2-core machine OpenMP waits are costly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _broken_provider(fwd_bias=0.0, grad_scale=1.0):
    """The reference kernels with the attention output shifted and/or ``dA`` scaled."""
    mod = types.ModuleType("salstm_kernels_test_broken_provider")
    mod.cell_forward = rk.cell_forward

    def cell_backward(A, c, dh, dc_new):
        dA, dc = rk.cell_backward(A, c, dh, dc_new)
        return dA * grad_scale, dc

    def attention_forward(A, c, projections, scale, combination):
        out, h, c_new, P = rk.attention_forward(A, c, projections, scale, combination)
        return out + fwd_bias, h, c_new, P

    def attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h=None):
        dA, dc, dproj = rk.attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h)
        return dA * grad_scale, dc, dproj

    def cell_zero_state_backward(A, dh, dc_new):
        return (rk.cell_zero_state_backward(A, dh, dc_new)[0] * grad_scale,)

    mod.cell_backward, mod.attention_forward, mod.attention_backward = cell_backward, attention_forward, attention_backward
    mod.cell_zero_state_forward, mod.cell_zero_state_backward = rk.cell_zero_state_forward, cell_zero_state_backward
    # the errors it plants are above the float32/float64 tolerances, not bfloat16's
    mod.supported_dtypes = lambda device_type: (torch.float32, torch.float64)
    return mod


@pytest.fixture
def register_broken(monkeypatch):
    """Register backend ``broken`` (available on every device) computed by a deliberately wrong provider."""

    def register(**kwargs):
        mod = _broken_provider(**kwargs)
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(providers._PROVIDERS, "broken", mod.__name__)
        monkeypatch.setitem(backends._REGISTRY, "broken", backends.Backend("broken", lambda device_type: (True, "")))

    return register


def test_python_m_help():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "salstm_kernels", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("bench", "verify", "info"):
        assert cmd in res.stdout


def test_info_lists_every_backend_and_why(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    cpu_section = out.split("backends for cpu tensors")[1].split("backends for cuda")[0]
    for name, (ok, reason) in backends.backend_status("cpu").items():
        line = next(line for line in cpu_section.splitlines() if line.strip().startswith(name))
        assert ("available" in line) if ok else (reason in line)


def test_bench_quick_writes_json_and_csv_with_every_row(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path), "--size", "8", "--threads", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    impls = [impl for impl, _ in bench.implementations(bench.BenchConfig.defaults("cpu", quick=True))]
    assert impls[:2] == ["eager", "compile"]
    rows = result["rows"]
    assert sorted((r["design"], r["impl"]) for r in rows) == sorted((d, i) for d in DESIGN_LABELS for i in impls)
    for r in rows:
        assert r["size"] == "8x8" and r["params"] > 0 and r["fwd_gflop"] > 0
        if r["impl"] == "compile" and r["status"] == "failed":
            assert r["reason"]  # a compile failure is reported, not raised
            continue
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and r["train_ms"] > 0 and r["train_peak_mib"] >= 0 and r["speedup_fwd"] > 0
    eager = [r for r in rows if r["impl"] == "eager"]
    assert all(r["speedup_fwd"] == 1.0 for r in eager)
    meta = result["meta"]
    for key in ("device_name", "torch", "python", "command", "git_commit", "timing", "memory"):
        assert key in meta
    with open(tmp_path / "bench.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["design"], r["impl"]) for r in csv_rows] == [(r["design"], r["impl"]) for r in rows]
    assert all(r["torch"] == torch.__version__ and r["device_name"] for r in csv_rows)
    if bench.importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench.png").stat().st_size > 0
    for label in DESIGN_LABELS:
        assert label in printed


def test_bench_does_not_time_a_backend_that_fails_the_gate(tmp_path, register_broken, capsys):
    register_broken(fwd_bias=1e-2)
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path), "--size", "6", "--no-compile",
                   "--backends", "broken", "--no-progress"])
    assert rc == 1
    capsys.readouterr()
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    broken = [r for r in rows if r["impl"] == "broken"]
    assert len(broken) == 3
    for r in broken:
        assert r["status"] == "FAIL" and r["fwd_ms"] is None and r["speedup_fwd"] is None
        assert r["fwd_err"] > 1e-3


def test_verify_quick_passes(capsys):
    rc = cli.main(["verify", "--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert verify.REFERENCE_OPS in out
    for name in backends.available_backends("cpu"):
        if name != "reference":
            assert name in out  # every available fused backend is verified


def test_verify_fails_on_a_broken_backend(register_broken, capsys):
    register_broken(fwd_bias=1e-3)
    rc = cli.main(["verify", "--quick", "--designs", "SALSTM2d(linear),ConvLSTM2d"])
    out = capsys.readouterr().out
    assert rc == 1
    broken = [line for line in out.splitlines() if line.startswith("broken")]
    # the wrong attention output fails SA-LSTM; ConvLSTM2d never calls the attention kernel
    assert broken and all(("FAIL" in line) == ("SALSTM2d" in line) for line in broken)


def test_verify_checks_gradients_not_just_outputs(register_broken):
    register_broken(grad_scale=1.01)
    rows = verify.run_verify("cpu", quick=True, backends=["broken"], designs=["LSTMSA2d(linear)"])
    assert rows and all(not r.parity.ok for r in rows)
    assert all(r.parity.fwd_err <= r.parity.fwd_tol < r.parity.bwd_tol < r.parity.bwd_err for r in rows)


def test_parity_runs_the_backend_with_full_float32_convs():
    """cuDNN TF32 is off while the backend runs (a float32 comparison must measure this package,
    not cuDNN's per-shape TF32 choice), and the user's setting is back afterwards."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # torch's per-operator flag
        flags, name, settings, off = conv, "fp32_precision", ("tf32", "ieee"), "ieee"
    else:
        flags, name, settings, off = torch.backends.cudnn, "allow_tf32", (True, False), False
    seen = []
    m = verify.DESIGNS["SALSTM2d(linear)"](3, [4], 3, "reference")
    x = torch.randn(1, 2, 3, 5, 4)

    def run(x, state):
        seen.append(getattr(flags, name))
        return m(x, state, return_state=True)

    kept = getattr(flags, name)
    try:
        for user_setting in settings:
            setattr(flags, name, user_setting)
            assert verify.parity(run, m, x).ok
            assert getattr(flags, name) == user_setting
    finally:
        setattr(flags, name, kept)
    assert seen == [off, off]
