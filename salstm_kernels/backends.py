"""Named backends and how one is chosen.

Precedence, first match wins: the module's ``backend=`` argument when it is not ``"auto"``; the
innermost :func:`use_backend` context; the ``SALSTM_KERNELS_BACKEND`` environment variable;
``"auto"``.  ``"auto"`` picks ``triton`` for CUDA tensors, ``cpp`` for CPU tensors when the compiled
extension is loaded, and ``reference`` otherwise.  A backend named explicitly that is unknown or
cannot run on the tensor's device raises :class:`BackendUnavailableError`; it never falls back.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .user_warnings import warn_user

ENV_VAR = "SALSTM_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    #: ``check(device_type) -> (ok, reason)``; ``reason`` says why not when ``ok`` is False.
    check: Callable[[str], Tuple[bool, str]]
    #: ``"auto"`` considers backends in ascending priority order per device.
    auto_devices: Tuple[str, ...] = ()
    #: ``switched_off() -> bool``: the user turned the backend off on purpose, so ``auto`` passes it
    #: over without a fallback note.
    switched_off: Callable[[], bool] = lambda: False


_REGISTRY: Dict[str, Backend] = {}
#: The open :func:`use_backend` contexts, innermost last: ``[token, name]`` pairs.  Process-wide, not
#: per thread, like ``torch.backends`` flags: ``nn.DataParallel`` (the authors' ``train.py`` with
#: several GPUs) runs its replicas in worker threads, which a per-thread choice would not reach.  So
#: "innermost" is the block entered last by any thread: threads that each open their own block
#: see the latest one.
_stack: List[list] = []
_stack_lock = threading.Lock()


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _check_reference(device_type: str) -> Tuple[bool, str]:
    return True, ""


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    """``None`` when Triton imports, else why not.  Imported to find out (once): an install that
    is present but broken would otherwise be reported available and fail in the first forward."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # (any error: a broken install raises more than ImportError)
        return f"triton is installed but does not import ({type(e).__name__}: {e})"
    return None


def _triton_imported_without_interpreter() -> bool:
    """Whether Triton was imported before ``TRITON_INTERPRET=1`` was set: its own ``@triton.jit``
    library functions were then built for the compiler, and an interpreted kernel that calls them
    fails inside Triton ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    try:
        from triton.language import standard
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # (another Triton layout: cannot tell, assume it is fine)
        return False
    return not isinstance(standard.sigmoid, InterpretedFunction)


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_triton(device_type: str) -> Tuple[bool, str]:
    err = triton_import_error()
    if err:
        return False, err
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, ""
    if device_type == "cpu":
        if not triton_interpreter_on():
            return False, "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
        if _triton_imported_without_interpreter():
            return False, ("TRITON_INTERPRET=1 was set after Triton was imported; set it before importing "
                           "salstm_kernels (torch.utils.flop_counter, which it uses, imports Triton)")
        return True, ""
    return False, f"no Triton kernels for device type {device_type!r}"


def _check_cpp(device_type: str) -> Tuple[bool, str]:
    from . import cpp_extension

    if device_type != "cpu":
        return False, "the C++ kernels run on CPU tensors only"
    return cpp_extension.status()


def _cpp_switched_off() -> bool:
    from . import cpp_extension

    return cpp_extension.switched_off()


register_backend(Backend("reference", _check_reference, auto_devices=()))
register_backend(Backend("triton", _check_triton, auto_devices=("cuda",)))
register_backend(Backend("cpp", _check_cpp, auto_devices=("cpu",), switched_off=_cpp_switched_off))


def backend_names() -> List[str]:
    return list(_REGISTRY)


def backend_status(device_type: str) -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for one device type."""
    return {name: b.check(device_type) for name, b in _REGISTRY.items()}


def available_backends(device: "str | torch.device | None" = None) -> List[str]:
    """Backends that can run on ``device`` (default: ``cuda`` if present, else ``cpu``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [name for name, (ok, _) in backend_status(device_type).items() if ok]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend for modules built with ``backend="auto"`` inside the ``with`` block -- in every
    thread of the process (``nn.DataParallel``'s replicas too), as ``torch.backends`` flags are."""
    _validate_name(name)
    entry = [object(), name]
    with _stack_lock:
        _stack.append(entry)
    try:
        yield
    finally:
        with _stack_lock:  # contexts of several threads may close in any order: remove this one
            _stack.remove(entry)


def _validate_name(name: str) -> None:
    if name != "auto" and name not in _REGISTRY:
        env = os.environ.get(ENV_VAR, "").strip()
        source = f" (from the environment variable {ENV_VAR})" if name == env else ""
        raise BackendUnavailableError(
            f"unknown backend {name!r}{source}; expected 'auto' or one of {backend_names()}"
        )


_warned_auto: set = set()


def requested_backend(module_backend: str = "auto") -> str:
    """The name asked for, before resolving ``auto``, following the precedence above."""
    if module_backend != "auto":
        return module_backend
    top = _stack[-1:]  # one read (a slice), safe against another thread closing its block meanwhile
    if top:
        return top[0][1]
    return os.environ.get(ENV_VAR, "").strip() or "auto"


def resolve_backend(module_backend: str, device: torch.device) -> str:
    """The backend that will run for a tensor on ``device``.

    Compile-friendly: under ``torch.compile`` the requested name (module argument, innermost
    :func:`use_backend`, environment) is read while tracing -- dynamo guards on the context stack,
    so entering a different :func:`use_backend` recompiles -- and the registry lookup runs once as a
    trace-time constant (no graph break).  The environment variable is read when a module is first
    traced; set it before compiling.

    Under ``torch.onnx.export`` (either exporter) every module runs ``"reference"``: ONNX has no
    translation of the fused custom ops, and the reference is the math they compute, so the
    exported graph is that math for ONNX runtimes to run with their own kernels.
    """
    if _in_onnx_export():
        return "reference"
    return _resolve_name(requested_backend(module_backend), torch.device(device).type)


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, without importing ``torch.onnx`` (28 ms, at the first
    forward) where it is not imported: then no export can be running."""
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def check_available(name: str, device_type: str) -> None:
    """Raise :class:`BackendUnavailableError` (with the reason) unless backend ``name`` runs on
    ``device_type`` tensors."""
    ok, reason = _REGISTRY[name].check(device_type)
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available for {device_type} tensors: {reason}")


def mark_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` with the package
    (1.1 s, and Triton with it, which then reads ``TRITON_INTERPRET`` for good).  The decorator
    only marks the function (torch 2.6 to 2.13); ``tests/test_compile.py`` traces it with
    ``fullgraph=True``, so a torch that changes this fails there, loudly."""
    fn._dynamo_marked_constant = True
    return fn


@mark_constant_result
def _resolve_name(name: str, device_type: str) -> str:
    """``resolve_backend`` after the precedence rules: a pure function of its two strings."""
    _validate_name(name)
    if name != "auto":
        check_available(name, device_type)
        return name
    for b in _REGISTRY.values():
        if device_type in b.auto_devices:
            ok, reason = b.check(device_type)
            if ok:
                return b.name
            key = (b.name, device_type)
            if key not in _warned_auto and not b.switched_off():
                _warned_auto.add(key)
                warn_user(f"salstm_kernels: backend {b.name!r} unavailable for {device_type} tensors "
                          f"({reason}); 'auto' uses 'reference'", RuntimeWarning)
    return "reference"
