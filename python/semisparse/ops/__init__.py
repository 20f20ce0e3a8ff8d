"""The op boundary. Importing this package defines every ``semisparse::`` op schema,
its fake kernel, autograd formula and pure-torch reference, then loads the native
libraries that register CPU/CUDA kernels under the same names."""

from . import gumbel, sparse24  # noqa: F401  (defines the schemas first)
from .._native import load as _load

_load()

from .gumbel import gumbel_nm_mask, gumbel_nm_masked_weight  # noqa: E402
from .sparse24 import sparse24_compress, sparse24_decompress, sparse24_linear  # noqa: E402

__all__ = [
    "gumbel",
    "gumbel_nm_mask",
    "gumbel_nm_masked_weight",
    "sparse24",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_linear",
]
