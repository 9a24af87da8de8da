"""Backend selection: registry, precedence, clear errors, no silent fallback."""
import os

import pytest
import torch

import salstm_kernels as sk
from salstm_kernels import backends


def test_reference_always_available_and_status_explains_the_rest():
    assert "reference" in sk.available_backends("cpu")
    status = sk.backend_status("cpu")
    assert set(status) >= {"reference", "triton", "cpp"}
    for name, (ok, reason) in status.items():
        assert ok == (name in sk.available_backends("cpu"))
        assert ok or reason, f"{name} unavailable without a reason"


def test_unknown_backend_raises_everywhere(monkeypatch):
    with pytest.raises(sk.BackendUnavailableError, match="unknown backend 'bogus'"):
        with sk.use_backend("bogus"):
            pass
    m = sk.SALSTM2d(3, 4, 3, backend="bogus")
    with pytest.raises(sk.BackendUnavailableError, match="bogus"):
        m(torch.randn(1, 3, 5, 5))
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(sk.BackendUnavailableError, match="bogus"):
        sk.SALSTM2d(3, 4, 3)(torch.randn(1, 3, 5, 5))


def test_unavailable_backend_never_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # triton on CPU tensors needs the interpreter; cuda-only kernels are not a CPU fallback
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        sk.SALSTM2d(3, 4, 3, backend="triton")(torch.randn(1, 3, 5, 5))


def test_bare_op_with_an_unavailable_backend_raises_clearly(monkeypatch):
    """A graph keeps the backend it was traced with (``torch.export`` on a GPU, run on a CPU): the
    op says which backend is missing and why, where Triton said "0 active drivers"."""
    from salstm_kernels.ops import providers

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(providers, "_RUNS_ON", set(), raising=False)  # (checked once per backend and device)
    A, c = torch.randn(2, 12, 3, 4), torch.randn(2, 3, 3, 4)
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu tensors: CPU tensors need"):
        torch.ops.salstm_kernels.lstm_cell(A, c, "triton")
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        torch.ops.salstm_kernels.lstm_cell_zero_state(torch.randn(2, 9, 3, 4), "triton")
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        torch.ops.salstm_kernels.lstm_attention(A, c, *(None,) * 6, 0.5, "linear", "triton")
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        torch.ops.salstm_kernels.lstm_cell_backward(A, c, c, c, "triton")
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        torch.ops.salstm_kernels.lstm_cell_zero_state_backward(torch.randn(2, 9, 3, 4), c, c, "triton")
    P = torch.softmax(torch.randn(2, 3, 3), -1)
    with pytest.raises(sk.BackendUnavailableError, match="'triton' is not available for cpu"):
        torch.ops.salstm_kernels.lstm_attention_backward(A, c, *(None,) * 6, P, c, c, c, 0.5, "linear", "triton")


def test_precedence_module_arg_then_context_then_env(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "bogus-env")
    assert backends.requested_backend("auto") == "bogus-env"
    with sk.use_backend("reference"):
        assert backends.requested_backend("auto") == "reference"
        assert backends.requested_backend("cpp") == "cpp"
        with sk.use_backend("triton"):
            assert backends.requested_backend("auto") == "triton"
        assert backends.resolve_backend("auto", dev) == "reference"
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.requested_backend("auto") == "auto"


def test_use_backend_reaches_other_threads():
    """``nn.DataParallel`` runs its replicas in worker threads: a ``use_backend`` block holds there
    too, and contexts closed out of order (two threads) leave the right one open."""
    import threading

    seen = []
    worker = lambda: seen.append(backends.requested_backend("auto"))  # noqa: E731
    with sk.use_backend("reference"):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
    assert seen == ["reference"]
    outer, inner = sk.use_backend("reference"), sk.use_backend("cpp")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # another thread's block ends first
    assert backends.requested_backend("auto") == "cpp"
    inner.__exit__(None, None, None)
    assert backends.requested_backend("auto") == (os.environ.get(backends.ENV_VAR, "").strip() or "auto")


def test_auto_picks_cpp_on_cpu_only_when_loaded():
    from salstm_kernels import cpp_extension

    expected = "cpp" if cpp_extension.is_available() else "reference"
    assert backends.resolve_backend("auto", torch.device("cpu")) == expected


def test_unknown_backend_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "CPP")
    with pytest.raises(sk.BackendUnavailableError, match=f"unknown backend 'CPP' \\(from the environment variable {backends.ENV_VAR}\\)"):
        sk.SALSTM2d(3, 4, 3)(torch.randn(1, 3, 5, 5))
    monkeypatch.setenv(backends.ENV_VAR, "cpp")
    with pytest.raises(sk.BackendUnavailableError) as e:  # a module argument's typo is not the variable's
        sk.SALSTM2d(3, 4, 3, backend="CPP")(torch.randn(1, 3, 5, 5))
    assert "environment variable" not in str(e.value)


def test_a_triton_that_does_not_import_is_unavailable(monkeypatch):
    """``find_spec`` alone reported a broken install available; the first forward then raised a raw
    ImportError (and ``auto`` on CUDA would pick it)."""
    import importlib.util
    import sys

    spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else spec(name, *a))
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    backends.triton_import_error.cache_clear()
    try:
        ok, reason = backends.backend_status("cuda")["triton"]
        assert not ok and reason.startswith("triton is installed but does not import (ModuleNotFoundError"), reason
        with pytest.raises(sk.BackendUnavailableError, match="does not import"):
            backends.resolve_backend("triton", torch.device("cpu"))
    finally:
        backends.triton_import_error.cache_clear()


def _run(code, **env):
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_import_is_light_and_exposes_the_extension_status():
    """``import salstm_kernels`` does not import ``torch._dynamo`` (1.1 s, and Triton with it, whose
    interpreter switch is read at its import), and ``salstm_kernels.cpp_extension.status()``, which
    the README documents, works right after it."""
    out = _run("import sys, salstm_kernels as sk; print('torch._dynamo' in sys.modules, sk.cpp_extension.status()[0] in (True, False))")
    assert out.split() == ["False", "True"], out


def test_interpreter_switched_on_after_triton_was_imported_is_refused_with_the_reason():
    """``TRITON_INTERPRET=1`` set after Triton is imported: Triton's own jit functions were built for
    the compiler, and a kernel failed inside Triton ("Cannot call @triton.jit'd outside of the scope
    of a kernel") though the backend was reported available."""
    pytest.importorskip("triton")
    out = _run("import os, triton, salstm_kernels as sk; os.environ['TRITON_INTERPRET'] = '1';"
               "print(sk.backend_status('cpu')['triton'])")
    assert "False" in out and "was set after Triton was imported" in out, out
    out = _run("import salstm_kernels as sk; print(sk.backend_status('cpu')['triton'])", TRITON_INTERPRET="1")
    assert out.strip() == "(True, '')", out
    # a Triton whose layout this check does not know: assume the interpreter is fine, as before
    out = _run("import sys, salstm_kernels as sk; sys.modules['triton.runtime.interpreter'] = None;"
               "print(sk.backends._triton_imported_without_interpreter(), sk.backend_status('cpu')['triton'])",
               TRITON_INTERPRET="1")
    assert out.strip() == "False (True, '')", out


def test_warnings_point_at_the_callers_line(monkeypatch):
    """The hook warning and ``auto``'s fallback note name the line that called the module (a fixed
    stacklevel named torch's module.py or one of ours); a C++ extension switched off on purpose
    (``SALSTM_KERNELS_NO_CPP``) gets no fallback note."""
    import warnings

    from salstm_kernels import cpp_extension

    m = sk.SALSTM2d(3, 4, 3)
    m.cell0.conv.register_forward_hook(lambda *a: None)
    x = torch.randn(1, 3, 4, 4)
    for reason, noted in (("C++ extension not built (test)", True), ("disabled by SALSTM_KERNELS_NO_CPP", False)):
        monkeypatch.setattr(cpp_extension, "status", lambda: (False, reason))
        monkeypatch.setenv(cpp_extension.SKIP_ENV, "0" if noted else "1")
        monkeypatch.setattr(backends, "_warned_auto", set())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            m(x)
            m(x)
        assert {w.filename for w in seen} == {__file__}, [(w.filename, str(w.message)) for w in seen]
        assert sum("'auto' uses 'reference'" in str(w.message) for w in seen) == int(noted)  # once a process
        assert any("do not run" in str(w.message) for w in seen)


def test_a_misspelt_cpu_capability_warns(monkeypatch):
    """The C++ side reads ``SALSTM_KERNELS_CPU_CAPABILITY`` by exact name and ignored any other value
    (``AVX2``) silently."""
    from salstm_kernels import cpp_extension

    if not cpp_extension.is_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setenv(cpp_extension.CAPABILITY_ENV, "AVX2")
    with pytest.warns(RuntimeWarning, match=f"{cpp_extension.CAPABILITY_ENV}='AVX2' is ignored"):
        assert cpp_extension.status.__wrapped__() == (True, "")
    monkeypatch.setenv(cpp_extension.CAPABILITY_ENV, "avx2")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp_extension.status.__wrapped__() == (True, "")
