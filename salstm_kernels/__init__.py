"""Fast, exact SA-LSTM and LSTM-SA modules (Ji, Ye, Ma, IEEE TIP 2024).

New code uses :class:`SALSTM2d` / :class:`LSTMSA2d`; the authors' training scripts swap
``from model import ...`` for ``from salstm_kernels.compat import ...``.
"""
from . import cpp_extension  # noqa: F401  (its status() is documented; the extension loads on first use)
from .backends import (  # noqa: F401
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)
from .modules import (  # noqa: F401
    ConvLSTM2d,
    LSTMSA2d,
    LSTMThenSA2d,
    SALSTM2d,
    SAOnly2d,
    SliceFusion2d,
)

__version__ = "0.1.0"

__all__ = [
    "SALSTM2d",
    "LSTMSA2d",
    "LSTMThenSA2d",
    "ConvLSTM2d",
    "SAOnly2d",
    "SliceFusion2d",
    "available_backends",
    "backend_status",
    "use_backend",
    "BackendUnavailableError",
]
