"""Drop-in replacements for the authors' ``model.py`` classes.

``from salstm_kernels.compat import SALSTM`` replaces ``from model import SALSTM``: same
constructor signatures (including the ``attenion_size`` spelling), same state_dict keys, so released
checkpoints load with ``strict=True``.  Each class is a thin subclass of the new modules, so it runs
on whichever backend is selected.  Upstream quirks kept: the conv always has a bias (``bias`` is
accepted and ignored), the attention scale is ``attention.scale``, set from the constructor's
``attention_size`` and read at every forward (a scale written there later is used, as upstream's).
Differences: the initial state is created on the input's device and dtype (upstream calls
``.cuda()``), and LSTM-SA checks at construction that its projections fit the hidden size.
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor, nn

from .modules import LSTMSA2d, SALSTM2d, SliceFusion2d
from .reference import default_scale

__all__ = ["TransLSTM", "GatedTransLSTM", "TransLSTMLayer", "GatedTransLSTMLayer", "SALSTM", "LSTMSA"]


class _UpstreamAttributes:
    """Upstream's plain attributes of ``TransLSTM`` / ``GatedTransLSTM``, as read-only views of this
    module's configuration: ``input_channels`` (upstream's list ``[input_channels] +
    hidden_channels``), ``hidden_channels`` and ``all_layers`` (the cells), besides ``kernel_size``,
    ``num_layers``, ``bias`` and ``attention.scale`` (writable, read at every forward), which the classes set."""

    @property
    def input_channels(self) -> List[int]:
        return [self.in_channels] + list(self.hidden_list)

    @property
    def hidden_channels(self) -> List[int]:
        return list(self.hidden_list)

    @property
    def all_layers(self) -> List[nn.Module]:
        return [getattr(self, f"cell{layer}") for layer in range(self.num_layers)]

    def scale_for(self, x: Tensor) -> float:
        """``attention.scale`` as it is now: upstream reads that attribute in every forward."""
        return float(self.attention.scale)


class _Scale(nn.Module):
    """Upstream ``TransLSTM.attention``: no parameters (so no state_dict keys), only its ``scale``."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale


class TransLSTM(_UpstreamAttributes, SALSTM2d):
    """Upstream ``TransLSTM`` (SA-LSTM): ``forward(x (B, T, Cin, H, W)) -> (B, C, H, W)``."""

    def __init__(self, input_channels: int, hidden_channels: List[int], kernel_size: int, bias: bool, attention_size: int):
        super().__init__(input_channels, list(hidden_channels), kernel_size, combination="linear", attention_size=attention_size)
        self.bias = bias
        self.attention = _Scale(default_scale(self.attention_size))

    def forward(self, x: Tensor) -> Tensor:  # upstream signature: no state argument
        return super().forward(x)


class GatedTransLSTM(_UpstreamAttributes, LSTMSA2d):
    """Upstream ``GatedTransLSTM`` (LSTM-SA); its projections are ``Linear(input_channels, input_channels)``
    applied to ``h'``, so ``input_channels`` must equal ``hidden_channels[-1]``."""

    def __init__(self, input_channels: int, hidden_channels: List[int], kernel_size: int, bias: bool, attention_size: int):
        hidden = list(hidden_channels)
        if hidden and hidden[-1] != input_channels:
            raise ValueError(
                f"GatedTransLSTM: the attention projections are Linear(input_channels={input_channels}, "
                f"{input_channels}) applied to the last hidden state, which has hidden_channels[-1]={hidden[-1]} "
                "channels; upstream needs them equal"
            )
        super().__init__(input_channels, hidden, kernel_size, combination="linear", attention_size=attention_size)
        self.bias = bias
        self.attention.scale = default_scale(self.attention_size)  # upstream GatedAttention's

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


class _UpstreamLayer(SliceFusion2d):
    net_cls: type = TransLSTM

    def __init__(self, input_channels, hidden_channels, kernel_size, bias, num_classes, attenion_size):
        nn.Module.__init__(self)
        self.forward_net = self.net_cls(input_channels, hidden_channels, kernel_size, bias, attention_size=attenion_size)
        self.reverse_net = self.net_cls(input_channels, hidden_channels, kernel_size, bias, attention_size=attenion_size)
        self.conv = nn.Conv2d(2 * list(hidden_channels)[-1], num_classes, kernel_size=1)


class TransLSTMLayer(_UpstreamLayer):
    """Upstream ``TransLSTMLayer``: ``forward(x1, x2, x3)`` fuses three slices' features."""

    net_cls = TransLSTM


class GatedTransLSTMLayer(_UpstreamLayer):
    """Upstream ``GatedTransLSTMLayer`` (LSTM-SA three-slice fusion)."""

    net_cls = GatedTransLSTM


class _UpstreamModel(nn.Module):
    layer_cls: type = TransLSTMLayer

    def __init__(self, input_channels=64, hidden_channels=(64,), kernel_size=5, bias=True, num_classes=4,
                 attenion_size=224 * 224, encoder: Optional[nn.Module] = None):
        super().__init__()
        self.encoder = encoder
        self.lstmlayer = self.layer_cls(input_channels, list(hidden_channels), kernel_size, bias, num_classes, attenion_size)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
        if self.encoder is None:
            raise RuntimeError(f"{type(self).__name__}: no encoder was given to the constructor (encoder=None)")
        return self.lstmlayer(self.encoder(x1), self.encoder(x2), self.encoder(x3))


class SALSTM(_UpstreamModel):
    """Upstream ``SALSTM``: one shared ``encoder`` applied to three slices, then ``TransLSTMLayer``."""

    layer_cls = TransLSTMLayer


class LSTMSA(_UpstreamModel):
    """Upstream ``LSTMSA``: shared ``encoder``, then ``GatedTransLSTMLayer``."""

    layer_cls = GatedTransLSTMLayer
