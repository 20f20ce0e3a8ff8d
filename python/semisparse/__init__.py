"""semisparse: semi-structured (2:4) and block sparsity for PyTorch transformers."""

from . import ops  # defines the op schemas and loads the native libraries
from ._native import cpu_isa, set_cpu_isa
from ._native import status as native_status
from .formats import Sparse24, nm_mask
from .nn import SparseLinear
from .sparsify import SparsifyReport, sparsify

__version__ = "0.1.0"

__all__ = [
    "Sparse24",
    "SparseLinear",
    "SparsifyReport",
    "cpu_isa",
    "native_status",
    "nm_mask",
    "ops",
    "set_cpu_isa",
    "sparsify",
    "__version__",
]
