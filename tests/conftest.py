import os
import sys
from pathlib import Path

import torch

# Let the tests import helpers.py beside them.
sys.path.insert(0, str(Path(__file__).parent))

# Without CUDA the Triton kernels run in Triton's interpreter. `triton.jit` picks the mode when a
# kernel is defined, so the kernels are imported here, with the variable set, before any test
# (some unset it to check the error without a GPU) can be the first to import them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from spikeinfer.kernels import attention, backend, bernoulli, neuron_scan, spike_linear  # noqa: F401
    except ImportError:  # Triton not installed: the Triton tests skip themselves
        pass
