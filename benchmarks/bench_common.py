"""What the pytest-benchmark suites share: the device, the backends to time, and synchronised calls."""
import torch

from salstm_kernels import available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Triton under the CPU interpreter is for correctness only, so it is not timed.
BACKENDS = [b for b in available_backends(DEVICE) if not (DEVICE == "cpu" and b == "triton")]


def synced(fn):
    """``fn`` followed by a CUDA synchronize, so a timing covers the kernels, not their launch."""
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
