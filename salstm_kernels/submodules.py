"""What the modules need of their ``nn.Conv2d`` / ``nn.Linear`` submodules, checked every forward.

The modules never *call* ``cell{l}.conv`` or ``attention.{q,k,v}_matrix``: every backend reads their
``weight`` and ``bias`` and computes the conv (split over time, the forget rows skipped at t = 0)
and the projections itself, as the fused kernels must.  So whatever lives in a submodule's call
would be skipped silently; upstream's ``LSTMCell`` calls ``self.conv(...)``, so its users can have
put something there.  Per kind:

* **Weight reparametrizations that keep the weight in a forward pre-hook** --
  ``torch.nn.utils.weight_norm``, ``spectral_norm`` and ``torch.nn.utils.prune`` -- would leave a
  stale ``weight`` and their ``*_orig`` parameter without a gradient.  Their hooks are run here,
  once per forward, before the weights are read.  Exact for weight norm and pruning (their hooks
  recompute the same weight every call); old-style spectral norm's power iteration (training mode)
  then runs once per forward, where upstream's per-step calls run it once per time step.
  ``torch.nn.utils.parametrize`` / ``parametrizations`` need nothing: ``weight`` is computed on read.
* A **subclass with its own forward** (a weight-standardised conv, a LoRA or quantization-aware
  wrapper) or a **padding mode other than zeros**: refused (``TypeError`` / ``ValueError``).
* **Other forward hooks** (a feature-capturing hook, a summary tool's): a warning that they do not
  run.
* A **conv geometry** other than the one the math has -- a square odd kernel with "same" zero
  padding, stride 1, dilation 1, one group -- or a weight or bias of another shape than the
  layer's channels ask for: refused (``ValueError`` naming the submodule).  The backends would
  each misread it differently (stride and dilation were ignored, a padding of 0 went through
  one backend and crashed another).

The same pass checks every submodule's parameters against ``x`` (device, and dtype unless autocast
is on): a layer or projection left in another dtype was cast silently by the fused backends.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .user_warnings import warn_user
from .validation import check_matches_parameters

#: forward pre-hooks that only recompute a parameter from others (run here, see the module docstring)
WEIGHT_HOOKS = (WeightNorm, SpectralNorm, prune.BasePruningMethod)


def _own_forward(mod: nn.Module, base: type) -> bool:
    cls = type(mod)
    if cls is base:
        return False
    return cls.forward is not base.forward or getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None)


def prepare_submodules(named: Iterable[Tuple[str, nn.Module, type, Tuple[int, int]]], x: Tensor, who: str) -> None:
    """Check each ``(name, module, base, (out, in))`` (``base`` ``nn.Conv2d`` or ``nn.Linear``, and
    the channels its weight must have) and its parameters against ``x`` as the module docstring
    says, and run its weight-recomputing forward pre-hooks."""
    dtype, device = x.dtype, x.device
    for name, mod, base, channels in named:
        if not isinstance(mod, base) or _own_forward(mod, base):
            what = "with its own forward" if isinstance(mod, base) else f"not an nn.{base.__name__}"
            raise TypeError(
                f"{who}: {name} is a {type(mod).__name__} {what}; the module reads {name}.weight and .bias and "
                f"computes the {base.__name__} itself (every backend does), so its forward would be skipped. Use a "
                f"plain nn.{base.__name__}; a weight reparametrization can go through torch.nn.utils.parametrize")
        if base is nn.Conv2d and mod.padding_mode != "zeros":
            raise ValueError(f"{who}: {name}.padding_mode={mod.padding_mode!r} is not supported; the convs pad "
                             "with zeros (padding_mode='zeros')")
        for pname, param in mod._parameters.items():  # (a parametrized weight is not among them)
            if param is not None and (param.dtype != dtype or param.device != device):  # (the common case fast)
                check_matches_parameters(x, param, who, f"{name}.{pname}")
        others = False
        if mod._forward_pre_hooks:  # (the common case fast)
            for hook in list(mod._forward_pre_hooks.values()):
                if isinstance(hook, WEIGHT_HOOKS):
                    hook(mod, ())
                else:
                    others = True
        _check_geometry(mod, base, channels, name, who)  # (after the weight hooks have made the weight)
        if (others or mod._forward_hooks) and not torch.compiler.is_compiling():  # (dynamo cannot trace warn)
            warn_user(f"{who}: the forward hooks registered on {name} do not run: the module reads its "
                      "parameters and computes it without calling it (weight_norm, spectral_norm and prune "
                      "hooks are the exception: they are run)")


def _check_geometry(mod: nn.Module, base: type, channels: Tuple[int, int], name: str, who: str) -> None:
    """The weight and bias shapes, and for a conv the geometry, that every backend computes with."""
    out_ch, in_ch = channels
    shape: Tuple[int, ...] = (out_ch, in_ch)
    if base is nn.Conv2d:  # (attributes set by hand may be ints or lists: compared as pairs)
        k = _pair(mod.kernel_size)[0]
        if _pair(mod.kernel_size) != (k, k) or k % 2 == 0:
            raise ValueError(f"{who}: {name}.kernel_size={mod.kernel_size!r} is not supported; the ConvLSTM conv's "
                             "kernel is square and odd (k, k)")
        for attr in ("stride", "dilation", "groups"):
            value = getattr(mod, attr)
            if (value if attr == "groups" else _pair(value)) not in ((1, 1), 1):
                raise ValueError(f"{who}: {name}.{attr}={value!r} is not supported; the ConvLSTM "
                                 "conv has stride 1, dilation 1 and groups 1")
        same = ((k - 1) // 2,) * 2
        padding = mod.padding
        if not (padding == "same" or (padding == "valid" and k == 1)
                or (not isinstance(padding, str) and _pair(padding) == same)):
            raise ValueError(f"{who}: {name}.padding={padding!r} is not supported; a {k}x{k} kernel needs "
                             f"'same' padding {same}")
        shape += (k, k)
    # plain parameters only: a parametrized tensor would run its parametrization once more here (and
    # weight norm's is made by its hook from the parameters it checks itself)
    params = mod._parameters
    for pname, want in (("weight", shape), ("bias", (out_ch,))):
        t = params.get(pname)
        if t is not None and t.shape != want:
            raise ValueError(f"{who}: {name}.{pname} must have shape {want} for this layer's channels, got "
                             f"{tuple(t.shape)}")
