"""How the modules call the fused ops: through the registered custom op when something traces or
intercepts the call, and through a plain ``torch.autograd.Function`` running the same forward,
``setup_context`` and backward otherwise.

Why: a Python ``torch.library.custom_op`` call walks the dispatcher into Python several times (the
autograd kernel, a redispatch, the backend kernel, filling in defaults) before it reaches the op's
function, and its autograd node wraps the backward the same way.  Measured on CPU (torch 2.13, one
thread, cpp provider, tiny shapes so only host work counts): a forward call 16 us without autograd
and 32 us with, against 2.7 us for the function itself; a whole SA-LSTM training step (two forward
and two backward ops) 0.25-0.3 ms faster through the entries, a quarter of it
(``benchmarks/host_overhead.py``).  On a GPU, where steps at 112x112 are host-bound, that is wall
time.

The custom op stays the registered, documented entry (``torch.ops.salstm_kernels.*``, ``opcheck``,
fake kernels, FLOP formulas) and is what runs whenever it has to be seen as one op:

* under ``torch.compile`` / ``torch.export`` (Dynamo records the op; its fake kernel and registered
  autograd trace it) -- :func:`torch.compiler.is_compiling`;
* under any ``TorchDispatchMode`` (``FlopCounterMode`` counts the op by its FLOP formula, fake and
  proxy tensor modes trace it);
* under ``torch.jit.trace`` (the trace records the op, so ``torch.jit.save`` can export it) and
  ``torch.func`` transforms (``vmap`` runs the op's vmap rule, :mod:`.batching`; ``torch.func.grad`` / ``vjp``
  / ``jacrev`` and forward-mode AD raise a clear error where they would differentiate the op, see
  :func:`_refuse_autodiff_transforms`);
* with a tensor subclass or a meta tensor among the inputs (the fake kernel gives the shapes).

Both paths run the same functions, so they agree bitwise (``tests/test_dispatch.py``).  A backward
recorded for a double backward (``create_graph=True``) goes through the backward custom op, whose
autograd formula raises (:func:`refuse_double_backward`): second derivatives need the reference
backend.
:data:`EAGER_FUNCTION` ``False`` sends every call through the custom op (the A/B of
``benchmarks/host_overhead.py``).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

#: Eager calls run the ops through a plain ``autograd.Function`` (see the module docstring).
EAGER_FUNCTION: bool = True

_PLAIN = (Tensor, torch.nn.Parameter)


def _op_needed(args) -> bool:
    """Whether this call must go through the registered custom op (see the module docstring)."""
    if (not EAGER_FUNCTION or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or torch.jit.is_tracing() or torch._C._functorch.peek_interpreter_stack() is not None):
        return True
    return any(isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta) for a in args)


def _op_name(op) -> str:
    """``salstm_kernels::name`` of a custom op, for messages."""
    return op._qualname if hasattr(op, "_qualname") else str(op)


def _with_defaults(fn: Callable) -> Callable:
    """``(args, kwargs) -> args``: every argument of ``fn``'s signature positionally, defaults filled
    in (``autograd.Function.apply`` takes positional arguments only)."""
    sig = inspect.signature(fn)
    n = len(sig.parameters)
    defaults = tuple(p.default for p in sig.parameters.values())

    def fill(args, kwargs):
        if len(args) == n and not kwargs:
            return args
        if not kwargs and len(args) < n and all(d is not inspect.Parameter.empty for d in defaults[len(args):]):
            return tuple(args) + defaults[len(args):]
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{fn.__name__.strip('_')}(): {e}") from None
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    return fill


def forward_entry(op, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """A callable taking ``op``'s arguments positionally: ``op(*args)`` where the custom op is
    needed, else ``forward`` / ``setup_context`` / ``backward`` (the functions the custom op is
    defined and registered with) as one ``autograd.Function``."""
    fill = _with_defaults(forward)

    def fn_forward(ctx, *args):
        out = forward(*args)
        setup_context(ctx, args, out)
        return out

    name = "".join(w.capitalize() for w in forward.__name__.strip("_").split("_")) + "Function"
    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(fn_forward), "backward": staticmethod(backward),
    })

    def entry(*args, **kwargs):
        args = fill(args, kwargs)
        _refuse_autodiff_transforms(op, args)
        if _op_needed(args):
            return op(*args)
        return function.apply(*args)

    entry.__name__ = entry.__qualname__ = f"apply_{forward.__name__.strip('_')}"
    entry.__doc__ = f"``{_op_name(op)}`` (see :mod:`{__name__}`)."
    return entry


def _refuse_autodiff_transforms(op, args) -> None:
    """A clear error where the op would be differentiated by a transform it has no rule for:

    * forward-mode AD -- ``torch.func.jvp`` / ``jacfwd`` / ``hessian``, ``torch.autograd.forward_ad``
      -- with a tangent on an argument: a custom op without a forward-mode formula gets all-zero
      tangents from ``torch.func.jvp``, silently (torch 2.11 and 2.13);
    * ``torch.func.grad`` / ``vjp`` / ``jacrev`` with grad mode on and an argument the transform
      tracks: the custom op's autograd has no functorch rule, and torch's own message (an
      ``autograd.Function`` "must override the setup_context staticmethod") names neither the op
      nor what to do.

    Decided per call from the arguments (before functorch unwraps them), so a transform around a
    frozen module it does not differentiate, or a dual level open in another thread, runs as
    before.  The bare custom ops (``torch.ops.salstm_kernels.*``) skip this: under ``torch.func.jvp``
    PyTorch gives them zero tangents."""
    if torch.compiler.is_compiling():
        return  # (dynamo cannot trace the functorch stack; a compiled graph runs no transform here)
    stack = torch._C._functorch.peek_interpreter_stack() is not None
    forward_ad = getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    if not (stack or forward_ad):
        return
    tensors = [a for a in args if isinstance(a, Tensor)]
    # (inside a transform every intermediate is wrapped; one the transform differentiates requires grad)
    jvp = forward_ad and any(torch.autograd.forward_ad.unpack_dual(a).tangent is not None for a in tensors)
    tracked = stack and torch.is_grad_enabled() and any(
        torch._C._functorch.is_gradtrackingtensor(a) and a.requires_grad for a in tensors)
    name = _op_name(op)
    if jvp:
        raise RuntimeError(f"{name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is "
                           "not supported by the fused backends; run the module with backend='reference' for it")
    if tracked:
        raise RuntimeError(f"{name}: torch.func.grad / vjp / jacrev are not supported by the fused backends; "
                           "use torch.autograd.grad or .backward(), or run the module with backend='reference'")


def call_backward(op, backward_fn: Callable, *args):
    """A backward op inside a backward formula: the custom op where it is needed (a traced or
    intercepted backward) and where the backward itself is being recorded (``create_graph=True``:
    the recorded op then stops a double backward that reaches it with the error of
    :func:`refuse_double_backward` -- the function's kernels are invisible to autograd and would
    give a silently wrong second derivative), else its function directly."""
    return op(*args) if torch.is_grad_enabled() or _op_needed(args) else backward_fn(*args)


def refuse_double_backward(backward_op) -> None:
    """Register an autograd formula for a backward op that raises a clear error: a double backward
    (``create_graph=True``, e.g. a gradient penalty) through the fused ops is not supported."""
    name = _op_name(backward_op)

    def backward(ctx, *grads):
        raise RuntimeError(f"{name}: second derivatives (double backward, create_graph=True) are not "
                           "supported by the fused backends; run the module with backend='reference' for them")

    backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
