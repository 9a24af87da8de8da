"""Parity helpers shared by the test suite and ``salstm-kernels verify``.

The per-dtype tolerance table lives here and only here.  Errors are measured as
``max|x - ref| / max|ref|`` -- relative to the tensor's own scale (its largest element), so a
tensor of small values is held to the same relative precision as any other, and elements much
smaller than the largest do not dominate.  (Until 2026-11-26 the scale was ``max(max|ref|, 1)``: an
absolute error for tensors below 1, which let a whole LSTM-SA output -- values 1e-3 to 2e-2 -- or
its q/k weight gradients be zeroed and still pass; the suite passes the stricter form unchanged.)
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

#: ``(forward, backward)`` tolerance on the scaled max error, per input dtype.  Backward is
#: looser: it chains more roundings (and recomputes gates from a low-precision ``A``).
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (5e-3, 2e-2),
    torch.bfloat16: (3e-2, 6e-2),
}


def tolerance(dtype: torch.dtype, backward: bool = False) -> float:
    return TOLERANCES[dtype][1 if backward else 0]


def scaled_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref| / max|ref|`` in float64; NaN anywhere in ``x`` but not ``ref`` -> inf; an
    all-zero ``ref`` needs an all-zero ``x`` (else inf)."""
    x64, r64 = x.detach().double(), ref.detach().double()
    if x64.shape != r64.shape:
        raise AssertionError(f"shape {tuple(x64.shape)} != reference shape {tuple(r64.shape)}")
    if x64.numel() == 0:
        return 0.0
    if (torch.isnan(x64) != torch.isnan(r64)).any():
        return float("inf")
    finite = torch.isfinite(r64)
    inf = torch.isinf(r64)
    if (x64[inf] != r64[inf]).any():
        return float("inf")
    diff = (x64[finite] - r64[finite]).abs().max().item() if finite.any() else 0.0
    scale = r64[finite].abs().max().item() if finite.any() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, backward: bool = False, name: str = "") -> float:
    """Raise ``AssertionError`` naming ``name`` when ``x`` is off ``ref`` beyond the dtype's tolerance."""
    err = scaled_error(x, ref)
    tol = tolerance(dtype, backward)
    if not err <= tol:
        kind = "grad" if backward else "output"
        raise AssertionError(f"{name or kind}: scaled error {err:.3e} > tolerance {tol:.1e} ({dtype})")
    return err


@contextlib.contextmanager
def nan_allocations():
    """Within the block, fresh ``torch.empty`` / ``empty_like`` floating tensors are NaN-filled, so
    output elements (or partial rows) a kernel never wrote show up as NaN; restored on exit."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of ``t``'s shape filled with NaN, so unwritten elements show up."""
    return torch.full_like(t, float("nan"))


def grads_of(outputs: Sequence[torch.Tensor], inputs: Iterable[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    """``torch.autograd.grad`` that returns zeros for inputs the outputs do not depend on."""
    inputs = list(inputs)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def random_projections(C: int, dtype=torch.float32, device="cpu", generator: Optional[torch.Generator] = None):
    """``(wq, bq, wk, bk, wv, bv)`` like ``nn.Linear(C, C)`` initialisation, requiring grad."""
    bound = 1.0 / C**0.5
    out = []
    for shape in ((C, C), (C,)) * 3:
        t = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        out.append(t.to(device=device, dtype=dtype).requires_grad_(True))
    return tuple(out)


def patch_triton_interpreter_once() -> bool:
    """Make the Triton interpreter patch ``triton.language`` once per kernel launch, not once per
    ``@triton.jit`` helper call as well (a third of the interpreted kernel tests' time went to
    re-patching: ``inspect.getmembers`` of the language modules on every helper call).

    Inside a launch the language its kernel sees is patched already, so a helper's re-patch
    changed nothing; a helper whose module sees a language module not yet patched in this launch
    (``tl.zeros`` sees ``triton.language.core``) still patches it, and so does anything outside a
    launch (a direct call), as before.  A wrong skip fails loudly (an unpatched builtin raises).
    Returns False, changing nothing, when the interpreter lacks the internals this relies on
    (other Triton versions)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if getattr(patch_lang, "once", False):
        return True
    if patch_lang is None or scope_type is None or executor is None:
        return False
    launches = []  # per launch in flight: the language modules (ids) patched in it so far
    launch = executor.__call__

    def launch_once(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    def once(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if launches and langs and langs <= launches[-1]:
            return scope_type()  # patched in this launch already
        if launches:
            launches[-1] |= langs
        return patch_lang(fn)

    once.once = True
    executor.__call__ = launch_once
    interpreter._patch_lang = once
    return True
