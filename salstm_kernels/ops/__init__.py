"""Fused ops registered with ``torch.library`` (one file per op: definition, fake kernel, autograd).

Each op takes a ``backend`` string naming the kernel provider that computes it ("triton", "cpp",
or "reference" -- the pure-PyTorch provider used to test the op plumbing itself).  One fake kernel
and one autograd registration per op serve every provider and device.  The modules call the
``apply_*`` entries: the same functions without the custom-op dispatch in eager mode, the custom op
where it must be seen as one (:mod:`.dispatch`).
"""
from .lstm_attention import apply_lstm_attention, lstm_attention, lstm_attention_backward  # noqa: F401
from .lstm_cell import apply_lstm_cell, lstm_cell, lstm_cell_backward  # noqa: F401
from .lstm_cell_zero_state import (  # noqa: F401
    apply_lstm_cell_zero_state, lstm_cell_zero_state, lstm_cell_zero_state_backward,
)
from . import flops  # noqa: F401,E402  (FLOP formulas for FlopCounterMode)
