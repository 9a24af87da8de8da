"""The executable specification: pure-PyTorch SA-LSTM / LSTM-SA math.

Every fast backend is tested against the functions here, forward and backward.  They follow the
authors' published code (see DESIGN.md section 1), not a re-derivation of the paper:

* the ConvLSTM gate order inside the conv output ``A`` is ``i, f, o, g``;
* the attention is over *channels*: tokens are the ``C`` channels, features the ``N = H*W`` pixels;
* the attention scale is an explicit argument (upstream fixes it from ``attention_size``).

Shapes: ``B`` batch, ``T`` steps, ``Cin`` input channels, ``C`` hidden channels, ``H x W`` pixels.
Nothing here is fused or clever: the point is that a reader can check it against the paper.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
State = Tuple[Tensor, Tensor]

#: QKV formations of paper eq. 4.  "none" is the separated LSTM-then-SA baseline: the learned
#: projections are used as they are (only meaningful together with projections).
COMBINATIONS = ("linear", "nonlinear", "none")


def default_scale(attention_size) -> float:
    """Upstream's attention scale, ``1 / sqrt(attention_size)``: ``1 / math.sqrt`` of a number.

    A size that is traced (``H*W`` of the input, for ``attention_size=None``) stays traced, so the
    graph is not tied to one image size:

    * ``torch.compile(dynamic=True)`` / ``torch.export`` (a ``SymInt``): a symbolic float,
      ``sym_float(n) ** -0.5`` (``torch.onnx.export`` has no translation for ``sym_sqrt``);
    * ``torch.jit.trace`` and the TorchScript-based ``torch.onnx.export`` (sizes are 0-dim tensors
      there): a 0-dim float64 tensor on the CPU, which scales a tensor exactly as the Python float
      does; ``math.sqrt`` would record it as a constant of the example's size.
    """
    if isinstance(attention_size, torch.SymInt):
        return torch.sym_float(attention_size) ** -0.5
    if isinstance(attention_size, Tensor):
        return 1.0 / attention_size.to(torch.float64).sqrt()
    return 1.0 / math.sqrt(attention_size)


# --------------------------------------------------------------------------------------------
# ConvLSTM
# --------------------------------------------------------------------------------------------
def lstm_gates(A: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gate activations from the conv output ``A: (B, 4C, ...)`` in upstream order i, f, o, g."""
    Ai, Af, Ao, Ag = torch.chunk(A, 4, dim=1)
    return torch.sigmoid(Ai), torch.sigmoid(Af), torch.sigmoid(Ao), torch.tanh(Ag)


def lstm_cell_ref(A: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
    """State update from the conv output: ``A (B, 4C, H, W)``, ``c (B, C, H, W)`` -> ``h', c'``.

    This is the contract of the fused ``lstm_cell`` op (the conv stays outside it).
    """
    i, f, o, g = lstm_gates(A)
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def convlstm_cell(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor):
    """One ConvLSTM step as upstream writes it: ``A = conv2d(cat(x, h))``.

    ``x (B, Cin, H, W)``, ``h, c (B, C, H, W)``, ``weight (4C, Cin + C, k, k)``, ``bias (4C)``.
    Returns ``h', c', (i, f, o, g)``.
    """
    k = weight.shape[-1]
    A = F.conv2d(torch.cat([x, h], dim=1), weight, bias, stride=1, padding=(k - 1) // 2)
    i, f, o, g = lstm_gates(A)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return h_new, c_new, (i, f, o, g)


def zero_state(x: Tensor, hidden_channels: Sequence[int]) -> List[State]:
    """Zero ``(h, c)`` per layer on ``x``'s device and dtype (upstream hard-codes ``.cuda()``)."""
    B, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    return [(x.new_zeros(B, C, H, W), x.new_zeros(B, C, H, W)) for C in hidden_channels]


def convlstm_ref(
    x: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    state: Optional[Sequence[State]] = None,
):
    """Stacked ConvLSTM over ``x (B, T, Cin, H, W)``, step-major as upstream.

    Layer ``l``'s input is layer ``l-1``'s ``h'``.  Returns ``(gates, states)`` where ``gates`` are the
    ``(i, f, o, g)`` of the last layer's last step and ``states`` the final ``(h, c)`` per layer.
    """
    hidden = [w.shape[0] // 4 for w in weights]
    states = list(state) if state is not None else zero_state(x, hidden)
    gates = None
    for t in range(x.shape[1]):
        inp = x[:, t]
        for layer, (w, b) in enumerate(zip(weights, biases)):
            h, c = states[layer]
            h, c, gates = convlstm_cell(inp, h, c, w, b)
            states[layer] = (h, c)
            inp = h
    return gates, states


# --------------------------------------------------------------------------------------------
# QKV formation and channel attention
# --------------------------------------------------------------------------------------------
def qkv_factors(f: Tensor, g: Tensor, c: Tensor, h: Tensor, combination: str):
    """The LSTM-state terms of paper eq. 4 (``f, g`` gates, ``c, h`` the new states).

    linear:    ((f + c) / 2, (g + h) / 2, h)
    nonlinear: (relu(f * c), relu(g * h), h)
    none:      (None, None, None) -- no LSTM gating (separated baseline)
    """
    if combination == "linear":
        return (f + c) / 2, (g + h) / 2, h
    if combination == "nonlinear":
        return torch.relu(f * c), torch.relu(g * h), h
    if combination == "none":
        return None, None, None
    raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")


def channel_projection(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-pixel ``Linear`` over the channel axis: ``x (B, C, ...)``, ``weight (C_out, C)``."""
    y = torch.einsum("oc,bc...->bo...", weight, x)
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * (x.dim() - 2)))
    return y


def channel_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Self-attention whose tokens are channels: ``q, k, v (B, C, *spatial)``.

    ``S = (Q K^T) * scale`` over flattened pixels, ``P = softmax(S, -1)``, ``O = P V``.
    Returns ``O`` with ``v``'s shape.
    """
    Q, K, V = q.flatten(2), k.flatten(2), v.flatten(2)
    S = torch.bmm(Q, K.transpose(1, 2)) * scale
    P = torch.softmax(S, dim=-1)
    return torch.bmm(P, V).view(v.shape)


def lstm_attention_ref(
    A: Tensor,
    c: Tensor,
    scale: float,
    combination: str = "linear",
    projections: Optional[Sequence[Optional[Tensor]]] = None,
):
    """Last step: cell update, QKV formation and channel attention from the conv output.

    ``A (B, 4C, H, W)``, ``c (B, C, H, W)``.  ``projections`` is ``(wq, bq, wk, bk, wv, bv)`` with
    ``w (C, C)``, ``b (C)`` for LSTM-SA and the separated baseline, ``None`` for SA-LSTM.
    Returns ``(out, h', c')``.  This is the contract of the fused ``lstm_attention`` op.
    """
    i, f, o, g = lstm_gates(A)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    return _attend(f, g, c_new, h_new, scale, combination, projections), h_new, c_new


def _attend(f, g, c, h, scale, combination, projections):
    fq, fk, fv = qkv_factors(f, g, c, h, combination)
    if projections is None:
        if combination == "none":
            raise ValueError("combination='none' needs learned projections")
        return channel_attention(fq, fk, fv, scale)
    wq, bq, wk, bk, wv, bv = projections
    q, k, v = (channel_projection(h, w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    if fq is not None:
        q, k, v = fq * q, fk * k, fv * v
    return channel_attention(q, k, v, scale)


# --------------------------------------------------------------------------------------------
# Whole modules (functional form)
# --------------------------------------------------------------------------------------------
def salstm_ref(x, weights, biases, scale, combination="linear", state=None):
    """SA-LSTM (upstream ``TransLSTM``): ``x (B, T, Cin, H, W)`` -> ``(out (B, C, H, W), states)``."""
    (i, f, o, g), states = convlstm_ref(x, weights, biases, state)
    h, c = states[-1]
    return _attend(f, g, c, h, scale, combination, None), states


def lstmsa_ref(x, weights, biases, projections, scale, combination="linear", state=None):
    """LSTM-SA (upstream ``GatedTransLSTM``): LSTM states gate learned projections of ``h'``."""
    (i, f, o, g), states = convlstm_ref(x, weights, biases, state)
    h, c = states[-1]
    return _attend(f, g, c, h, scale, combination, projections), states


def lstm_then_sa_ref(x, weights, biases, projections, scale, state=None):
    """Separated baseline (paper Fig. 2a): ConvLSTM, then standard SA over ``h'`` with own Q/K/V."""
    return lstmsa_ref(x, weights, biases, projections, scale, "none", state)


def sa_only_ref(x, projections, scale):
    """SA-only baseline: channel attention on ``x (B, C, H, W)`` with learned Q/K/V projections."""
    wq, bq, wk, bk, wv, bv = projections
    q, k, v = (channel_projection(x, w, b) for w, b in ((wq, bq), (wk, bk), (wv, bv)))
    return channel_attention(q, k, v, scale)
