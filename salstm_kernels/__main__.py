"""``python -m salstm_kernels`` is the ``salstm-kernels`` command."""
import sys

from .cli import main

sys.exit(main())
