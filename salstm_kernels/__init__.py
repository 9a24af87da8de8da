"""Fast, exact SA-LSTM and LSTM-SA modules (Ji, Ye, Ma, IEEE TIP 2024)."""
from .backends import (  # noqa: F401
    BackendUnavailableError,
    available_backends,
    backend_status,
    use_backend,
)

__version__ = "0.1.0"
