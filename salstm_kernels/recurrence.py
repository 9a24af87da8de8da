"""The ConvLSTM recurrence used by every fused backend: the conv does less work here.

``conv(cat(x, h), W) + b == conv(x, W_x) + b + conv(h, W_h)`` with ``W = [W_x | W_h]`` split along
input channels.  So per layer:

* the recurrent part is skipped at ``t = 0`` when the state starts at zero (25% fewer conv FLOPs
  at ``T = 2`` with ``Cin = C``), and so is the forget gate's part of the input conv there (it
  multiplies ``c = 0``): a ``Cin -> 3C`` conv feeds the zero-state cell op, unless ``t = 0`` is the
  attention step (its ``Q`` reads ``f``) -- 31% fewer conv FLOPs at ``T = 2``, and 3 state units of
  ``A`` kept for backward there instead of 4;
* the input part runs as one conv batched over the 4-gate steps when no autograd graph is recorded
  and there are two or more of them (fewer, larger conv calls), and per step otherwise: a batched
  output is one storage, and the step-0 slice saved for backward would keep every step's ``A``
  alive (cpp, SA-LSTM 56x56 fwd+bwd peak RSS growth 44.6 -> 35.5 MB per step, eager 41.4 MB; same
  fwd+bwd speed measured).

The gates and state update go through the fused ``lstm_cell`` op; the last step of the last layer is
left to the caller (it feeds the fused attention op).  Parameters stay the single upstream
``conv.weight`` / ``conv.bias``: the split is a view, so gradients land in the same tensors.

**Conv bias:** where the backend's kernels fold it (``providers.FOLDS_BIAS``: Triton) the convs run
without their bias and the fused ops add it as they read ``A``.  PyTorch adds a cuDNN conv's bias in
a separate broadcast kernel, a read and write of the whole ``(B, 4C, H, W)`` output per conv; the
bias gradient (``dA`` summed) is the same either way.

**Memory kept for backward** is what the math needs: per step ``A`` and the previous ``c``, and the
convs' inputs (and at ``t = 0`` from the zero state the weight rows i, o, g: a ``3C x Cin x k x k``
copy).  The zero initial ``c`` is an expanded scalar (:func:`zero_cell_state`), so the ops
save no state-sized zero tensor; the input conv of an NCHW step takes the step's slice of ``x`` as
a view and saves that, not a contiguous copy (the conv densifies it as it runs).  So, as with any
``nn.Conv2d`` on ``x``, changing ``x`` in place between forward and backward raises autograd's
"modified by an inplace operation" error on those paths.

**State dtype** (the same rule the reference gets from PyTorch's type promotion): the states start
in ``x``'s dtype (or the given state's) and the cell runs in ``promote_types(state, A)``.  Outside
autocast that is just the common dtype.  Under ``torch.autocast`` the convs run in the low
precision, but ``A`` is widened to the state dtype before the cell, so ``h, c`` stay float32 for
float32 inputs -- the cell state is a running sum over time steps and keeps its precision.
Any memory layout (sliced, ``channels_last``, expanded) is accepted.  **Conv layout:** with the
``cpp`` backend on CPU the convs run channels_last (:data:`CHANNELS_LAST_CONVS`: oneDNN's NHWC
kernels are the faster ones there, but not at small images, :data:`CHANNELS_LAST_MIN_PIXELS`; the
``triton`` backend can opt in on CUDA).  The fused ops then run
channels_last end to end (:mod:`salstm_kernels.ops.layout`): they read that ``A`` in place and
return ``h', c'`` and ``dA`` channels_last, which feed the next convs without a layout copy; the
other pairs get contiguous NCHW ``A``.  The module's outputs are then channels_last too (same
values; ``.contiguous()`` if NCHW strides matter downstream).  The recurrent conv's output takes
the input conv's in place (``add_``): one ``(B, 4C, H, W)`` allocation fewer per step.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch import Tensor, nn

from . import ops
from .ops.layout import layout_of, nhwc_images
from .ops.providers import backend_folds_bias

State = Tuple[Tensor, Tensor]


def split_conv_recurrence(
    x: Tensor,
    convs: Sequence[nn.Conv2d],
    state: Optional[Sequence[State]],
    backend: str,
    stop_before_last: bool,
) -> Tuple[List[State], Optional[Tuple[Tensor, Tensor]]]:
    """Run the stacked ConvLSTM over ``x (B, T, Cin, H, W)`` with the fused cell op.

    Returns ``(states, last)``.  With ``stop_before_last`` the last layer's last step is not
    computed: ``last = (A, c_prev, bias)`` is its conv output, previous cell state and the conv bias
    still to add (None when the conv added it; see the module docstring), and ``states[-1]`` holds the
    state *before* that step.  Otherwise ``last`` is ``None`` and ``states`` are final.
    """
    B, T, _, H, W = x.shape
    inputs = list(x.unbind(1))  # layer l's input per step: x, then layer l-1's h'
    states: List[State] = []
    last = None
    n_layers = len(convs)
    fold = backend_folds_bias(backend)
    no_graph = not (torch.is_grad_enabled()
                    and (x.requires_grad or any(p.requires_grad for conv in convs for p in conv.parameters())))
    for layer, conv in enumerate(convs):
        weight, bias = conv.weight, conv.bias
        conv_bias, cell_bias = (None, bias) if fold else (bias, None)
        C = weight.shape[0] // 4
        cin = weight.shape[1] - C
        pad = conv.padding
        cl = channels_last_convs(backend, x.device.type, B * H * W, cin + C, training=not no_graph)
        fmt = torch.channels_last if cl else torch.contiguous_format
        # Views of the one parameter (the backward is one cat into its gradient).  Copying them to
        # contiguous / channels_last measured no faster and the copies are saved for backward; the
        # one copy made is the channels_last input-conv weight (see _input_conv).
        w_x, w_h = torch.split(weight, [cin, C], dim=1)
        w_x_in = _input_conv_weight(w_x, fmt)
        if state is not None:
            h, c = state[layer]
        else:
            h, c = None, zero_cell_state(x, C)
        # From the zero state, t = 0 needs no forget gate (it multiplies c = 0): its conv computes
        # the rows i, o, g only.  Not for the attention step (its Q uses f).
        zero_first = (SKIP_FORGET_AT_ZERO_STATE and h is None
                      and not (stop_before_last and layer == n_layers - 1 and T == 1))
        first = 1 if zero_first else 0  # the first step the 4-gate convs below run
        # batching one step would only copy it (T = 2 from the zero state: the step then takes the
        # per-step convs, the cat form on CUDA)
        batched = no_graph and T - first > 1
        outputs = []
        if batched:  # no graph: one input conv over the 4-gate steps (time-major), slices are blocks
            A_in = F.conv2d(torch.cat(inputs[first:]).contiguous(memory_format=fmt), w_x, conv_bias,
                            padding=pad).split(B)
        for t in range(T):
            if t == 0 and zero_first:
                h, c = _zero_state_step(inputs[0], w_x, bias, C, pad, fmt, fold, c, backend)
                outputs.append(h)
                continue
            if h is not None and not batched and x.device.type in CAT_CONV_DEVICES:
                # one conv over cat(x_t, h): the upstream formulation, used where one Cin+C conv
                # measured faster than two convs and an add.  cat reads x_t in place (a strided
                # slice of x), so each part is copied once; channels_last: cat along the channels
                # of (B, H, W, C) views writes the NHWC buffer directly.
                x_t, h_t = inputs[t], h.to(inputs[t].dtype)
                if cl:
                    xh = torch.cat([x_t.permute(0, 2, 3, 1), h_t.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
                else:
                    xh = torch.cat([x_t, h_t], dim=1)
                A = F.conv2d(xh, weight, conv_bias, padding=pad)
            else:
                if batched:
                    A = A_in[t - first]
                else:
                    A = _input_conv(inputs[t], w_x_in, conv_bias, pad, fmt)
                if h is not None:
                    # In place into the recurrent conv's output (its backward saves only the
                    # conv's inputs): one (B, 4C, H, W) allocation fewer per step.
                    A = F.conv2d(h.to(A.dtype).contiguous(memory_format=fmt), w_h, None, padding=pad).add_(A)
            if not cl:
                A = A.contiguous()
            if stop_before_last and layer == n_layers - 1 and t == T - 1:
                last = (A, c, cell_bias)  # the caller widens A (see module docstring)
                break
            A, c = widen_to_state_dtype(A, c)
            h, c = ops.apply_lstm_cell(A, c, backend, bias_in(cell_bias, A))
            outputs.append(h)
        states.append((h if h is not None else torch.zeros_like(c), c))
        inputs = outputs
    return states, last


def _input_conv_weight(w: Tensor, fmt: torch.memory_format) -> Tensor:
    """An input conv's weight as :func:`_input_conv` takes it: channels_last for channels_last convs
    (one small copy per layer and forward, saved by the convs), else as is."""
    return w.contiguous(memory_format=fmt) if fmt == torch.channels_last else w


def _input_conv(x_t: Tensor, w: Tensor, bias: Optional[Tensor], pad, fmt: torch.memory_format) -> Tensor:
    """``conv(x_t, w) + bias`` for a step's slice ``x_t`` of the input, ``A`` in layout ``fmt``; the
    conv saves ``x_t`` for backward as given -- a view of ``x``, no copy:
    * NCHW: ``x_t`` as is when its images are dense NCHW (the conv densifies the batch stride as it
      runs), else a contiguous copy;
    * channels_last: ``x_t`` as is, with ``w`` channels_last (:func:`_input_conv_weight`): oneDNN
      and cuDNN run a conv channels_last when its weight is, converting the input themselves (a
      temporary, in forward and again in backward) instead of a state-sized NHWC copy of ``x_t``
      kept alive from forward to backward.  cpp, B=2, C=64, 56x56, training step: peak 19.8 ->
      18.8 state units, same time.  Where a backend does not (CUDA float64), ``A`` comes out NCHW
      and the ops follow it."""
    if fmt == torch.channels_last:
        return F.conv2d(x_t, w, bias, padding=pad)
    return F.conv2d(x_t if x_t[0].is_contiguous() else x_t.contiguous(), w, bias, padding=pad)


def _zero_state_step(x_0: Tensor, w_x: Tensor, bias: Optional[Tensor], C: int, pad, fmt, fold: bool, c_zero: Tensor,
                     backend: str) -> State:
    """``t = 0`` from the zero state: the input conv with the weight rows (and bias) of gates i, o, g
    only -- a quarter fewer conv FLOPs there, forward and backward, and a quarter less ``A`` kept
    for backward -- and the fused zero-state cell (``ops.lstm_cell_zero_state``).  The row
    selections are differentiable views and copies of the one parameter, so the forget rows'
    gradient from this step is exactly zero, as in the 4-gate math.

    Where the 4-gate reference multiplies a non-finite value by that zero, it gets NaN and we do
    not, as with the skipped recurrent conv (a NaN in ``W_h`` reaches the reference's ``t = 0``
    through ``conv(0, W_h)``): +-inf in ``x_0`` (the reference's forget rows of the weight gradient
    are ``0 * inf``; the other rows are non-finite in both), a NaN in the forget rows of the weight
    or bias (at ``T = 1`` the reference's output is NaN, ours finite: those rows are never used),
    or a NaN upstream gradient (the forget bias's gradient from ``t = 0``)."""
    w_iog = torch.cat([w_x[:C], w_x[2 * C:]])
    b_iog = None if bias is None else torch.cat([bias[:C], bias[2 * C:]])
    conv_bias, cell_bias = (None, b_iog) if fold else (b_iog, None)
    A = _input_conv(x_0, _input_conv_weight(w_iog, fmt), conv_bias, pad, fmt)
    A, _ = widen_to_state_dtype(A, c_zero)
    return ops.apply_lstm_cell_zero_state(A, backend, bias_in(cell_bias, A))


#: From the zero state (no initial state given), ``t = 0`` runs a conv over the gate rows i, o, g only
#: and the fused zero-state cell (:func:`_zero_state_step`).  Exact; ``False`` runs the 4-gate conv
#: and cell there instead (the A/B ``benchmarks/gpu_tune.py`` measures).
#: cpp on CPU, SA-LSTM B=2, Cin=C=64, T=2, 56x56, 2 threads: see ``benchmarks/RESULTS.md``.
SKIP_FORGET_AT_ZERO_STATE: bool = True

#: Device types whose training steps with a previous state run one conv over ``cat(x_t, h)``
#: instead of the input and recurrent convs apart (same FLOPs; a step without a state -- ``t = 0``
#: with no initial state -- keeps the input-only conv either way).
#: CUDA: one Cin+C conv took 1-20% off each module step against two convs and an add (H200,
#: B=2, C=64, T=2, fwd+bwd, CUDA-graph time; 14-20% in bfloat16; ``benchmarks/RESULTS.md``).
#: Not CPU: there (cpp, 56x56 fwd+bwd, 2 threads) the split measured 3-6% faster.
CAT_CONV_DEVICES: Set[str] = {"cuda"}

#: ``(backend, device type)`` pairs whose convs run channels_last; their fused kernels read that
#: ``A`` in place and write ``h', c'``, ``dA`` channels_last too, so no layout copy is made in
#: either direction.  The other pairs get NCHW.
#: cpp on CPU: oneDNN's NHWC convolutions are faster than its NCHW ones at larger images (56x56,
#: fwd, one thread: 85.8 -> 80.5 ms per module call); small ones run NCHW
#: (:data:`CHANNELS_LAST_MIN_PIXELS`).
#: Triton on CUDA: the kernels read channels_last too (``LAYOUT``), but the pair is not listed.
#: cuDNN's NCHW convs add a transpose each way (``nchwToNhwcKernel`` / ``nhwcToNchwKernel``), and
#: on an H200 a B=2, 64->256, 5x5, 224x224 conv fwd+bwd took 0.694 ms NCHW against 0.509 ms NHWC
#: in bfloat16 (1.257 / 1.038 ms float32).  Whole module steps (B=2, C=64, T=2, 112 and 224,
#: ``benchmarks/RESULTS.md``, third session): NHWC was 3-11% faster in bfloat16, equal (SA-LSTM) or
#: 10-12% slower (LSTM-SA) in float32, and raised peak memory in every case (bfloat16 SA-LSTM 224:
#: 367 against 275 MiB).  Add ``("triton", "cuda")`` to opt in; ``benchmarks/gpu_tune.py`` A/Bs it.
CHANNELS_LAST_CONVS: Set[Tuple[str, str]] = {("cpp", "cpu")}


#: Device types whose channels_last convs (:data:`CHANNELS_LAST_CONVS`) run NCHW at small images:
#: ``(pixels, pixels per input channel in training)``.  A layer's convs run channels_last from
#: ``B * H * W >= pixels``, and in training (an autograd graph recorded) also from ``B * H * W >=
#: pixels per input channel * (Cin + C)``.  Where the weight outweighs the activations, oneDNN's
#: channels_last convs lose: each copies its weight into that layout, and each backward its weight
#: gradient back (one weight-sized copy per conv and direction; NCHW convs make none), so at a
#: U-Net's bottleneck (7x7-14x14, C = 64-256) the cpp module was slower than eager in training.
#: cpp, SA-LSTM, T = 2-3, 2 threads, channels_last against NCHW (``benchmarks/cpu_conv_layout.py``):
#: B=4 C=128 7x7 T=3 train 0.76x -> 1.08x eager, forward 0.78x -> 1.09x; the crossovers: forward
#: about 1024 pixels at C = 32-128, training about 24 pixels per input channel
#: (``benchmarks/RESULTS.md``, fourteenth session).
CHANNELS_LAST_MIN_PIXELS: Dict[str, Tuple[int, int]] = {"cpu": (1024, 24)}


def channels_last_convs(backend: str, device_type: str, pixels: Optional[int] = None,
                        conv_in_channels: int = 0, training: bool = False) -> bool:
    """Whether ``backend``'s recurrence runs a layer's convs (and so its fused ops) channels_last
    there, for ``pixels = B * H * W`` and the layer's ``Cin + C`` (:data:`CHANNELS_LAST_CONVS`,
    :data:`CHANNELS_LAST_MIN_PIXELS`; ``pixels=None``: at any size).  Not inside
    ``torch.func.vmap``: its batched tensors cannot be asked for their layout ("NYI: querying
    is_contiguous inside of vmap").  Symbolic sizes (``torch.compile(dynamic=True)``,
    ``torch.export`` with dynamic dimensions, ``torch.jit.trace``) take the large-image layout:
    comparing them would guard the graph to one side of the threshold, and one graph serves every
    size."""
    if (backend, device_type) not in CHANNELS_LAST_CONVS or _in_vmap():
        return False
    if pixels is None or isinstance(pixels, Tensor) or device_type not in CHANNELS_LAST_MIN_PIXELS:
        return True  # (torch.jit.trace records sizes as 0-dim tensors: one graph for all, as above)
    least, per_channel = CHANNELS_LAST_MIN_PIXELS[device_type]
    # a symbolic size is small only where that holds for every size the graph may see (no guard)
    small = statically_known_true(pixels < least) or (training and statically_known_true(
        pixels < per_channel * conv_in_channels))
    return not small


def _in_vmap() -> bool:
    if torch.compiler.is_compiling():
        return False
    from torch._C._functorch import TransformType, peek_interpreter_stack

    top = peek_interpreter_stack()
    return top is not None and top.key() == TransformType.Vmap


def bias_in(bias: Optional[Tensor], A: Tensor) -> Optional[Tensor]:
    """The folded conv bias in ``A``'s dtype, as the fused ops take it (a float32 parameter under
    autocast or after widening; the cast is differentiable, so its gradient reaches the parameter)."""
    return None if bias is None else bias.to(A.dtype)


def zero_cell_state(x: Tensor, C: int) -> Tensor:
    """The zero initial cell state ``(B, C, H, W)`` in ``x``'s dtype (as ``reference.zero_state``),
    as an expanded scalar: the fused ops save their ``c`` for backward, and this one holds no
    memory there (a dense zero tensor would be one state-sized buffer alive through the whole
    forward and backward); they densify it only while they run."""
    B, _, _, H, W = x.shape
    return x.new_zeros(()).expand(B, C, H, W)


def widen_to_state_dtype(A: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """``A`` and ``c`` in their common (state) dtype and in the layout the fused ops run in
    (:mod:`salstm_kernels.ops.layout`: NCHW-contiguous, or channels_last per image on the cpp path).
    A ``c`` that is one value broadcast and takes no gradient (:func:`zero_cell_state`) stays so:
    the ops take any layout.  (One that takes a gradient is made dense: the gradient of a broadcast
    is per element, which a scalar view would sum away.)"""
    dtype = torch.promote_types(A.dtype, c.dtype)
    A = A.to(dtype)
    if not nhwc_images(A):
        A = A.contiguous()
    if not c.requires_grad and all(s == 0 for s in c.stride()):
        return A, c.as_strided((), ()).to(dtype).expand(c.shape)
    return A, c.to(dtype).contiguous(memory_format=layout_of(A))
