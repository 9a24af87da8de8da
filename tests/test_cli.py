"""The ``salstm-kernels`` command: bench writes complete results, verify catches broken backends.

Tiny shapes only.  The Triton interpreter is switched off here (other test modules turn it on), so
these tests time the CPU backends, not interpreted kernels.
"""
import csv
import inspect
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


def _broken_provider(fwd_bias=0.0, grad_scale=1.0, out_scale=1.0, qk_grad_scale=1.0, bfloat16=False):
    """The reference kernels with the attention output shifted or scaled, ``dA`` scaled, and/or the
    gradients of the q and k projections (weights and biases) scaled; ``bfloat16``: it claims that
    dtype too."""
    mod = types.ModuleType("salstm_kernels_test_broken_provider")
    mod.cell_forward = rk.cell_forward

    def cell_backward(A, c, dh, dc_new):
        dA, dc = rk.cell_backward(A, c, dh, dc_new)
        return dA * grad_scale, dc

    def attention_forward(A, c, projections, scale, combination):
        out, h, c_new, P = rk.attention_forward(A, c, projections, scale, combination)
        return out * out_scale + fwd_bias, h, c_new, P

    def attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h=None):
        dA, dc, dproj = rk.attention_backward(A, c, projections, P, dout, dh, dc_new, scale, combination, h)
        if dproj is not None:
            dproj = tuple(g * qk_grad_scale for g in dproj[:4]) + tuple(dproj[4:])
        return dA * grad_scale, dc, dproj

    def cell_zero_state_backward(A, dh, dc_new):
        return (rk.cell_zero_state_backward(A, dh, dc_new)[0] * grad_scale,)

    mod.cell_backward, mod.attention_forward, mod.attention_backward = cell_backward, attention_forward, attention_backward
    mod.cell_zero_state_forward, mod.cell_zero_state_backward = rk.cell_zero_state_forward, cell_zero_state_backward
    # the errors fwd_bias and grad_scale plant are above the float32/float64 tolerances, not bfloat16's
    dtypes = (torch.float32, torch.float64) + ((torch.bfloat16,) if bfloat16 else ())
    mod.supported_dtypes = lambda device_type: dtypes
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
    from salstm_kernels import cpp_extension

    assert f"cpp kernels    {cpp_extension.capability()}\n" in out  # (the row-kernel build, or why none)


def test_bench_quick_writes_json_and_csv_with_every_row(tmp_path, capsys):
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path), "--size", "8", "--threads", "1", "--no-progress"])
    printed = capsys.readouterr().out
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    # exit 1 exactly when a row failed (a torch.compile failure is reported, and counts)
    assert rc == int(any(r["status"] in ("FAIL", "failed") for r in result["rows"])), printed
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


def test_bench_exits_nonzero_when_a_backend_raises(tmp_path, register_broken, capsys):
    """A backend that crashes is a failed row, reported with its error, and the exit status says so."""
    register_broken()

    def raising(*args, **kwargs):
        raise RuntimeError("planted kernel error")

    sys.modules["salstm_kernels_test_broken_provider"].attention_forward = raising
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path), "--size", "6", "--no-compile",
                   "--backends", "broken", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 1
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted(r["design"] for r in failed) == sorted(DESIGN_LABELS)  # each calls the fused attention
    assert all(r["impl"] == "broken" for r in failed)
    assert all("planted kernel error" in r["reason"] for r in failed)
    assert "row(s) FAIL (wrong numbers) or failed (an error)" in printed


def test_bench_table_shows_a_partly_measured_row():
    """A row that failed after some measurements prints what it has (it once crashed the table)."""
    row = bench._row_dict(bench.Row("SA-LSTM", "cpp", "cpp", 8, 8, 2, 4, 4, 2, 1, 5, "float32", params=10,
                                    fwd_gflop=0.1, status="failed", reason="boom", fwd_ms=1.0, fwd_iqr_ms=0.1,
                                    train_ms=2.0, train_iqr_ms=0.2, fwd_peak_mib=3.0))
    table = bench.format_table({"rows": [row]})
    assert "1.000 (0.100)" in table and "3.00 / -" in table and "failed: boom" in table


def test_bench_measures_the_training_peak_from_no_gradients(tmp_path, monkeypatch, capsys):
    """The training step's peak is measured with no gradients alive from the timing runs, as every
    timed step starts (on CUDA the step would free them inside the measurement)."""
    seen = []
    measure = bench.peak_memory

    def spy(fn, device):
        if fn.__name__ == "train":
            state = inspect.getclosurevars(fn).nonlocals
            seen.append(state["x_train"].grad is None and all(p.grad is None for p in state["params"]))
        return measure(fn, device)

    monkeypatch.setattr(bench, "peak_memory", spy)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "--size", "6", "--no-compile",
                     "--backends", "reference", "--no-progress"]) == 0
    capsys.readouterr()
    assert seen and all(seen)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--size", "0"], "positive ints"),
    (["bench", "--size", "abc"], "positive ints"),
    (["bench", "--size", ","], "positive ints"),
    (["bench", "--device", "cpu:1"], "expected cpu, cuda or cuda:N"),
    (["bench", "--batch", "0"], "expected a positive int, got 0"),
    (["bench", "--steps", "x"], "expected a positive int"),
    (["bench", "--kernel-size", "4"], "odd kernel size"),
    (["bench", "--device", "foo"], "expected cpu, cuda or cuda:N"),
    (["bench", "--backends", "nope"], "unknown backend(s) ['nope']"),
    (["verify", "--dtypes", "float8"], "unknown dtype(s) ['float8']"),
    (["verify", "--designs", "Foo"], "unknown design(s) ['Foo']"),
] + ([] if torch.cuda.is_available() else [(["bench", "--device", "cuda"], "CUDA is not available")]))
def test_cli_rejects_bad_values_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith(f"usage: salstm-kernels {argv[0]} "), err  # the subcommand's usage, not the top level's


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


def test_verify_reference_ops_row_runs_the_fused_ops(monkeypatch):
    """The ``reference-ops`` rows check the fused recurrence and custom ops (with the pure-PyTorch
    provider) against the reference module: with that provider broken they fail.  (A row that ran
    the reference module itself would compare it with itself and always pass.)"""
    mod = _broken_provider(fwd_bias=1e-3)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(providers._PROVIDERS, "reference", mod.__name__)
    rows = verify.run_verify("cpu", quick=True, backends=[verify.REFERENCE_OPS], designs=["SALSTM2d(linear)"])
    assert rows and all(not r.parity.ok for r in rows)


@pytest.mark.parametrize("broken", [dict(out_scale=0.0), dict(qk_grad_scale=0.0), dict(qk_grad_scale=-1.0)],
                         ids=["output zeroed", "q/k grads zeroed", "q/k grads negated"])
def test_verify_catches_wrong_tensors_of_small_values(register_broken, broken):
    """LSTM-SA's output (values about 1e-3 to 2e-2) and its q/k projection gradients (1e-8 to 1e-3)
    are small: errors are relative to each tensor's own scale, so zeroing or negating them fails
    every row, bfloat16's too (with the scale floored at 1, many of these rows passed)."""
    register_broken(bfloat16=True, **broken)
    rows = verify.run_verify("cpu", quick=True, backends=["broken"], designs=["LSTMSA2d(linear)", "LSTMSA2d(nonlinear)"])
    assert {r.parity.dtype for r in rows} == {"float32", "float64", "bfloat16"}
    assert all(not r.parity.ok for r in rows)


def _saturated_attention_case():
    """A float32 LSTM-then-SA whose softmax nearly saturates (scale 1, weights x3): its q/k
    projection gradients are ill-conditioned, and float32 PyTorch itself misses their float64
    values by about 1e-3 of their scale (tolerance 1e-4)."""
    torch.manual_seed(5)
    m = verify.DESIGNS["LSTMThenSA2d"](23, [9, 3], 5, "reference")
    m.attention_size = 1
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m, torch.randn(3, 1, 23, 8, 4)


def test_parity_allows_what_the_same_dtype_reference_misses_too():
    """An ill-conditioned tensor passes at up to twice the same-dtype reference's own error (here the
    same-dtype reference is what runs, so any fixed tolerance would fail it), and only that tensor
    gets the allowance: a zeroed output still fails."""
    m, x = _saturated_attention_case()
    res = verify.parity(verify.module_runner(m), m, x, None, seed=5)
    assert res.ok and "attention.q_matrix.weight" in res.same_dtype_reference
    assert res.bwd_tol > verify.tolerance(torch.float32, True) and res.bwd_err > verify.tolerance(torch.float32, True)
    assert "out" not in res.same_dtype_reference

    def zeroed_output(x, state):
        out, states = verify.module_runner(m)(x, state)
        return out * 0, states

    assert not verify.parity(zeroed_output, m, x, None, seed=5).ok
    # and the allowed tensors themselves: zeroed or negated gradients fail (the allowance is capped)
    for scale in (0.0, -1.0):
        hook = m.attention.q_matrix.weight.register_hook(lambda g, s=scale: g * s)
        try:
            assert not verify.parity(verify.module_runner(m), m, x, None, seed=5).ok
        finally:
            hook.remove()
    table = verify.format_table([verify.VerifyRow("LSTMThenSA2d", "saturated", "reference", res)])
    assert "*" in table and "same dtype" in table


def test_same_dtype_allowance_is_capped_and_finite():
    tol = verify.tolerance(torch.float32, True)
    assert verify.same_dtype_allowance(tol, 1e-6) == tol
    assert verify.same_dtype_allowance(tol, 1e-3) == pytest.approx(2e-3)
    assert verify.same_dtype_allowance(tol, 1.3) == verify.SAME_DTYPE_CAP < 1.0  # a zeroed tensor (1.0) fails
    assert verify.same_dtype_allowance(tol, float("inf")) == tol
    assert verify.same_dtype_allowance(tol, float("nan")) == tol


def test_scaled_error_is_relative_to_the_tensors_own_scale():
    from salstm_kernels.testing import scaled_error

    ref = torch.tensor([1e-3, -2e-3, 4e-3], dtype=torch.float64)
    assert scaled_error(ref * (1 + 1e-6), ref) == pytest.approx(1e-6, rel=1e-6)
    assert scaled_error(torch.zeros(3), ref) == pytest.approx(1.0)
    assert scaled_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert scaled_error(torch.tensor([0.0, 1e-30, 0.0]), torch.zeros(3)) == float("inf")


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
