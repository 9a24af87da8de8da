"""``nn.Module`` front ends: SALSTM2d, LSTMSA2d, the baselines, and the three-slice fusion layer.

Parameter names follow the authors' code (``cell{l}.conv``, ``attention.{q,k,v}_matrix``), so the
upstream-compatible classes in :mod:`salstm_kernels.compat` are thin subclasses and checkpoints move
freely between the two APIs.  Each forward resolves a backend (see :mod:`salstm_kernels.backends`):
``reference`` runs :mod:`salstm_kernels.reference` as written; the fused backends run the split-conv
recurrence (:mod:`salstm_kernels.recurrence`) and the fused ops.
"""
from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops, reference
from .backends import resolve_backend
from .recurrence import bias_in, split_conv_recurrence, widen_to_state_dtype
from .submodules import prepare_submodules
from .validation import check_attention_size, check_input, check_kernel_size, check_state, positive_int

State = Tuple[Tensor, Tensor]


class ConvLSTMCellConv(nn.Module):
    """Holds one layer's conv, named ``conv`` as upstream's ``LSTMCell`` (state_dict ``cell{l}.conv.*``)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, 1, (kernel_size - 1) // 2)


class ChannelProjections(nn.Module):
    """Learned per-pixel Q/K/V projections over channels, named as upstream's ``GatedAttention``."""

    def __init__(self, channels: int):
        super().__init__()
        self.q_matrix = nn.Linear(channels, channels)
        self.k_matrix = nn.Linear(channels, channels)
        self.v_matrix = nn.Linear(channels, channels)

    def tensors(self, dtype: Optional[torch.dtype] = None):
        """``(wq, bq, wk, bk, wv, bv)``, cast to ``dtype`` (autograd flows back to the parameters); a
        projection without a bias (``bias=None`` set by a user) gets zeros, which the fused ops take."""
        out = []
        for lin in (self.q_matrix, self.k_matrix, self.v_matrix):
            weight = lin.weight
            out += [weight, weight.new_zeros(weight.shape[0]) if lin.bias is None else lin.bias]
        return tuple(t if dtype is None else t.to(dtype) for t in out)

    def submodules(self, prefix: str, C: int):
        """``(name, module, base class, weight channels)`` of the projections over ``C`` channels,
        for :func:`prepare_submodules`."""
        return [(f"{prefix}{n}", getattr(self, n), nn.Linear, (C, C)) for n in ("q_matrix", "k_matrix", "v_matrix")]


def _saveable(t: Tensor) -> Tensor:
    """``t``, or a copy of it where it is an inference tensor (which autograd cannot save)."""
    return t.clone() if t.is_inference() else t


def _as_list(hidden_channels: Union[int, Sequence[int]]) -> List[int]:
    single = isinstance(hidden_channels, numbers.Integral)  # bool too: positive_int rejects it
    try:
        hidden = [hidden_channels] if single else list(hidden_channels)
        if not hidden:
            raise ValueError
        return [positive_int(h, "hidden_channels") for h in hidden]
    except (TypeError, ValueError):
        raise ValueError(f"hidden_channels must be a positive int or a non-empty list of them, got {hidden_channels!r}") from None


def _refuse_torchscript(self):
    """``torch.jit.script`` calls this first (``__prepare_scriptable__``): the forward uses Python
    that TorchScript cannot compile, and its own error names a type annotation, not the way out."""
    raise RuntimeError(f"{type(self).__name__} cannot be compiled by torch.jit.script; use torch.jit.trace, "
                       "torch.export or torch.compile (they keep batch and image size dynamic: see the README)")


class ConvLSTM2d(nn.Module):
    """Stacked ConvLSTM ("LSTM only" baseline); the base of every module here.

    Args:
        in_channels: channels of each input step.
        hidden_channels: an int, or a list for stacked layers.
        kernel_size: odd conv kernel size ("same" padding).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpp"``.

    ``forward(x, state=None, return_state=False)``: ``x (B, T, Cin, H, W)`` or ``(B, Cin, H, W)``
    (taken as ``T = 1``); ``state`` an optional list of initial ``(h, c)`` per layer, each
    ``(B, C_l, H, W)`` with ``x``'s dtype.  Returns ``(B, C, H, W)``, plus the final ``(h, c)`` of every
    layer when ``return_state``.  Any memory layout works.  ``B = 0`` gives an empty output.

    Under ``torch.autocast`` the convs and attention matmuls run in the autocast dtype while the
    recurrent states keep ``x``'s dtype (PyTorch's type promotion of the reference math; every
    backend follows it), so the attention output has the autocast dtype and ``h, c`` e.g. float32.
    """

    combination: Optional[str] = None

    def __init__(self, in_channels: int, hidden_channels: Union[int, Sequence[int]], kernel_size: int = 5, backend: str = "auto"):
        super().__init__()
        kernel_size = check_kernel_size(kernel_size)
        in_channels = positive_int(in_channels, "in_channels")
        hidden = _as_list(hidden_channels)
        self.in_channels = in_channels
        self.hidden_list = hidden
        self.kernel_size = kernel_size
        self.backend = backend
        for layer, (cin, ch) in enumerate(zip([in_channels] + hidden[:-1], hidden)):
            setattr(self, f"cell{layer}", ConvLSTMCellConv(cin, ch, kernel_size))

    @property
    def num_layers(self) -> int:
        return len(self.hidden_list)

    @property
    def out_channels(self) -> int:
        return self.hidden_list[-1]

    def convs(self) -> List[nn.Conv2d]:
        return [getattr(self, f"cell{layer}").conv for layer in range(self.num_layers)]

    def extra_repr(self) -> str:
        s = f"in_channels={self.in_channels}, hidden_channels={self.hidden_list}, kernel_size={self.kernel_size}"
        if self.combination is not None:
            s += f", combination={self.combination!r}"
        return s + f", backend={self.backend!r}"

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: Optional[Sequence[State]] = None, return_state: bool = False):
        who = type(self).__name__
        x = check_input(x, self.in_channels, who)
        prepare_submodules(self._submodules(), x, who)
        if state is not None:
            state = check_state(state, x, self.hidden_list)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # (dynamo cannot trace is_inference)
            # tensors made under torch.inference_mode (a frozen encoder's features) cannot be saved
            # for backward, and the fused recurrence saves x's step slices and the state as given
            x = _saveable(x)
            state = None if state is None else [(_saveable(h), _saveable(c)) for h, c in state]
        backend = resolve_backend(self.backend, x.device)
        if x.shape[0] == 0:
            out, states = self._forward_empty(x, state)
        elif backend == "reference":
            out, states = self._forward_reference(x, state)
        else:
            out, states = self._forward_fused(x, state, backend)
        return (out, states) if return_state else out

    def _submodules(self):
        ins = [self.in_channels] + self.hidden_list[:-1]
        return [(f"cell{layer}.conv", conv, nn.Conv2d, (4 * C, cin + C))
                for layer, (conv, cin, C) in enumerate(zip(self.convs(), ins, self.hidden_list))]

    def _weights(self):
        convs = self.convs()
        return [c.weight for c in convs], [c.bias for c in convs]

    def _forward_reference(self, x, state):
        _, states = reference.convlstm_ref(x, *self._weights(), state)
        return states[-1][0], states

    def _forward_empty(self, x, state):
        """``B = 0``: one zero sample appended to the empty batch runs through the reference math and
        is sliced off again -- empty outputs with the same dtypes and autograd links as any other
        batch, identical on every backend, and no kernel ever sees an empty tensor."""
        pad = lambda t: torch.cat([t, t.new_zeros((1,) + tuple(t.shape[1:]))])  # noqa: E731
        state1 = None if state is None else [(pad(h), pad(c)) for h, c in state]
        out, states = self._forward_reference(pad(x), state1)
        return out[:0], [(h[:0], c[:0]) for h, c in states]

    def _forward_fused(self, x, state, backend):
        if x.shape[0] == 0:  # B = 0: no empty kernel launches
            return self._forward_empty(x, state)
        states, _ = split_conv_recurrence(x, self.convs(), state, backend, stop_before_last=False)
        return states[-1][0], states


class _AttentionMixin:
    """Shared pieces of the modules that end in channel attention."""

    def _init_attention(self, combination: str, allowed: Tuple[str, ...], attention_size: Optional[int]):
        if combination not in allowed:
            raise ValueError(f"combination must be one of {allowed}, got {combination!r}")
        self.combination = combination
        self.attention_size = check_attention_size(attention_size)

    def scale_for(self, x: Tensor) -> float:
        """``1/sqrt(attention_size)``; ``attention_size=None`` means the runtime ``N = H*W``."""
        size = self.attention_size if self.attention_size is not None else x.shape[-1] * x.shape[-2]
        return reference.default_scale(size)

    def _op_scale(self, x: Tensor) -> Optional[float]:
        """The fused op's ``scale``: None for the runtime ``1/sqrt(H*W)``, which the op then takes
        from ``A``'s shape.  A custom op's float argument is a constant in a traced graph, so passing
        the number would specialize a ``torch.compile(dynamic=True)`` / ``torch.export`` graph to one
        image size (a recompile per ``H*W``)."""
        return None if self.attention_size is None else self.scale_for(x)

    def _projection_tensors(self, dtype=None):
        return None

    def _forward_reference(self, x, state):
        (i, f, o, g), states = reference.convlstm_ref(x, *self._weights(), state)
        h, c = states[-1]
        out = reference._attend(f, g, c, h, self.scale_for(x), self.combination, self._projection_tensors())
        return out, states

    def _forward_fused(self, x, state, backend):
        if x.shape[0] == 0:  # B = 0: no empty kernel launches
            return self._forward_empty(x, state)
        states, (A, c, bias) = split_conv_recurrence(x, self.convs(), state, backend, stop_before_last=True)
        out_dtype = A.dtype  # the attention matmuls' dtype (the autocast dtype under autocast)
        A, c = widen_to_state_dtype(A, c)  # the cell runs in the state dtype
        proj = self._projection_tensors(A.dtype) or (None,) * 6
        out, h, c_new, _ = ops.apply_lstm_attention(A, c, *proj, self._op_scale(x), self.combination, backend,
                                                    bias_in(bias, A))
        states[-1] = (h, c_new)
        return out.to(out_dtype), states


class SALSTM2d(_AttentionMixin, ConvLSTM2d):
    """SA-LSTM (paper Fig. 3a): channel self-attention whose Q, K, V are LSTM states (eq. 4).

    Same arguments as :class:`ConvLSTM2d`, plus ``combination`` ("linear", the published one, or
    "nonlinear") and ``attention_size`` (the scale is ``1/sqrt(attention_size)``; ``None`` means
    ``H*W`` of the input).  Output ``(B, C, H, W)`` with ``C = hidden_channels[-1]``.
    """

    def __init__(self, in_channels, hidden_channels, kernel_size=5, combination="linear", attention_size=None, backend="auto"):
        super().__init__(in_channels, hidden_channels, kernel_size, backend)
        self._init_attention(combination, ("linear", "nonlinear"), attention_size)


class _ProjectedAttention(_AttentionMixin, ConvLSTM2d):
    def __init__(self, in_channels, hidden_channels, kernel_size, combination, allowed, attention_size, backend):
        super().__init__(in_channels, hidden_channels, kernel_size, backend)
        self._init_attention(combination, allowed, attention_size)
        self.attention = ChannelProjections(self.out_channels)

    def _projection_tensors(self, dtype=None):
        return self.attention.tensors(dtype)

    def _submodules(self):
        return super()._submodules() + self.attention.submodules("attention.", self.hidden_list[-1])


class LSTMSA2d(_ProjectedAttention):
    """LSTM-SA (paper Fig. 3b): LSTM states gate learned per-pixel projections of ``h'``.

    ``Q = ((f + c')/2) * (W_q h' + b_q)``, ``K = ((g + h')/2) * (W_k h' + b_k)``,
    ``V = h' * (W_v h' + b_v)`` (linear combination), then channel attention.
    Arguments as :class:`SALSTM2d`.
    """

    def __init__(self, in_channels, hidden_channels, kernel_size=5, combination="linear", attention_size=None, backend="auto"):
        super().__init__(in_channels, hidden_channels, kernel_size, combination, ("linear", "nonlinear"), attention_size, backend)


class LSTMThenSA2d(_ProjectedAttention):
    """Separated baseline (paper Fig. 2a): ConvLSTM, then standard channel SA over ``h'`` with its own
    learned ``Q = W_q h'``, ``K = W_k h'``, ``V = W_v h'``."""

    def __init__(self, in_channels, hidden_channels, kernel_size=5, attention_size=None, backend="auto"):
        super().__init__(in_channels, hidden_channels, kernel_size, "none", ("none",), attention_size, backend)


class SAOnly2d(_AttentionMixin, nn.Module):
    """SA-only baseline: channel self-attention on ``x (B, C, H, W)`` with learned Q/K/V (reference math)."""

    def __init__(self, in_channels: int, attention_size: Optional[int] = None):
        nn.Module.__init__(self)
        self._init_attention("none", ("none",), attention_size)
        self.in_channels = in_channels = positive_int(in_channels, "in_channels")
        self.attention = ChannelProjections(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"SAOnly2d: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SAOnly2d: x must be (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        prepare_submodules(self.attention.submodules("attention.", self.in_channels), x, "SAOnly2d")
        return reference.sa_only_ref(x, self.attention.tensors(), self.scale_for(x))


ConvLSTM2d.__prepare_scriptable__ = SAOnly2d.__prepare_scriptable__ = _refuse_torchscript


class SliceFusion2d(nn.Module):
    """Bidirectional three-slice fusion (paper Fig. 4b; upstream ``TransLSTMLayer``).

    ``y = conv1x1(cat(net_fwd(stack(x1, x2)), net_rev(stack(x3, x2))))`` with ``x2`` the centre
    slice's features, each ``(B, Cin, H, W)``; output ``(B, num_classes, H, W)``.
    ``module_cls`` is :class:`SALSTM2d`, :class:`LSTMSA2d`, :class:`LSTMThenSA2d` or :class:`ConvLSTM2d`;
    ``**kwargs`` go to it.
    """

    def __init__(self, module_cls, in_channels, hidden_channels, num_classes, kernel_size=5, **kwargs):
        super().__init__()
        self.forward_net = module_cls(in_channels, hidden_channels, kernel_size, **kwargs)
        self.reverse_net = module_cls(in_channels, hidden_channels, kernel_size, **kwargs)
        self.conv = nn.Conv2d(2 * self.forward_net.out_channels, num_classes, kernel_size=1)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
        cin = self.forward_net.in_channels
        for name, t in (("x1", x1), ("x2", x2), ("x3", x3)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{type(self).__name__}: {name} must be a torch.Tensor, got {type(t).__name__}")
            # each slice is one time step: an unbatched (Cin, H, W) slice would stack into a 4-D x
            # that the nets read as (B, Cin, H, W) -- wrong numbers when Cin happens to be 2
            if t.dim() != 4 or t.shape[1] != cin:
                raise ValueError(f"{type(self).__name__}: {name} must be (B, {cin}, H, W) (one slice's features), "
                                 f"got shape {tuple(t.shape)}")
            if t.shape != x2.shape or t.dtype != x2.dtype or t.device != x2.device:
                raise ValueError(
                    f"{type(self).__name__}: x1, x2, x3 must share shape, dtype and device; {name} is "
                    f"{tuple(t.shape)} {t.dtype} on {t.device}, x2 is {tuple(x2.shape)} {x2.dtype} on {x2.device}"
                )
        y_fwd = self.forward_net(torch.stack([x1, x2], dim=1))
        y_rev = self.reverse_net(torch.stack([x3, x2], dim=1))
        return self.conv(torch.cat([y_fwd, y_rev], dim=1))
