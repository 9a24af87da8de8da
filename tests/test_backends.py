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
