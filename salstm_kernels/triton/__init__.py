"""Triton kernel provider for the fused ops (see :mod:`salstm_kernels.ops.providers`).

One file per op, each holding its kernels and launch code (Liger-Kernel layout):

* :mod:`.lstm_cell` -- ConvLSTM gates + state update, and its backward;
* :mod:`.lstm_attention` -- cell + QKV formation + channel attention (SA-LSTM, LSTM-SA and the
  separated baseline), and its backward.

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set
before Triton is first imported).  NCHW or channels_last tensors, read and written in place (the
kernels' ``LAYOUT``, :data:`.lstm_cell.LAYOUTS`).  Supports float32 / float16 / bfloat16 (float32 math); float64
raises ``TypeError`` (use the ``reference`` backend for gradcheck).  Triton is imported only here.
"""
import torch

from .lstm_attention import attention_backward, attention_forward
from .lstm_cell import cell_backward, cell_forward, cell_zero_state_backward, cell_zero_state_forward

__all__ = ["cell_forward", "cell_backward", "cell_zero_state_forward", "cell_zero_state_backward", "attention_forward", "attention_backward", "supported_dtypes"]

# The backward kernels read dh = None / dc_new = None as zero (masked loads): no zero tensors.
OPTIONAL_STATE_GRADS = True
# The kernels add a conv bias given to the ops as they load A (providers.py, FOLDS_BIAS).
FOLDS_BIAS = True


def supported_dtypes(device_type: str):
    return (torch.float32, torch.float16, torch.bfloat16)
