"""How the modules call the fused ops: through the registered custom op when something traces or
intercepts the call, and through a plain ``torch.autograd.Function`` running the same forward,
``setup_context`` and backward otherwise.

Why: a Python ``torch.library.custom_op`` call walks the dispatcher into Python several times (the
autograd kernel, a redispatch, the backend kernel, filling in defaults) before it reaches the op's
function.  Measured on CPU (torch 2.13, one thread, cpp provider, tiny shapes so only host work
counts): 16 us a call without autograd and 32 us with, against 2.7 us for the function itself;
an SA-LSTM training step (two forward ops, two backward ops) spent about 0.3 ms there, a third of
the step (``benchmarks/host_overhead.py``).  On a GPU, where steps at 112x112 are host-bound, that
is wall time.

The custom op stays the registered, documented entry (``torch.ops.salstm_kernels.*``, ``opcheck``,
fake kernels, FLOP formulas) and is what runs whenever it has to be seen as one op:

* under ``torch.compile`` / ``torch.export`` (Dynamo records the op; its fake kernel and registered
  autograd trace it) -- :func:`torch.compiler.is_compiling`;
* under any ``TorchDispatchMode`` (``FlopCounterMode`` counts the op by its FLOP formula, fake and
  proxy tensor modes trace it);
* with a tensor subclass among the inputs.

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
    if not EAGER_FUNCTION or torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return True
    return any(isinstance(a, Tensor) and type(a) not in _PLAIN for a in args)


def _with_defaults(fn: Callable) -> Callable:
    """``args -> args`` with the trailing defaults of ``fn``'s signature appended where absent
    (``autograd.Function.apply`` takes positional arguments only)."""
    params = list(inspect.signature(fn).parameters.values())
    n = len(params)
    defaults = tuple(p.default for p in params)

    def fill(args):
        if len(args) == n:
            return args
        if len(args) > n or any(d is inspect.Parameter.empty for d in defaults[len(args):]):
            raise TypeError(f"{fn.__name__}() takes {n} arguments ({sum(d is inspect.Parameter.empty for d in defaults)}"
                            f" required), got {len(args)}")
        return tuple(args) + defaults[len(args):]

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

    def entry(*args):
        args = fill(args)
        if _op_needed(args):
            return op(*args)
        return function.apply(*args)

    entry.__name__ = entry.__qualname__ = f"apply_{forward.__name__.strip('_')}"
    entry.__doc__ = f"``{op._qualname if hasattr(op, '_qualname') else op}`` (see :mod:`{__name__}`)."
    return entry


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
    name = backward_op._qualname if hasattr(backward_op, "_qualname") else str(backward_op)

    def backward(ctx, *grads):
        raise RuntimeError(f"{name}: second derivatives (double backward, create_graph=True) are not "
                           "supported by the fused backends; run the module with backend='reference' for them")

    backward_op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)
