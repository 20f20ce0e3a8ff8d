"""The op boundary. Importing this package defines every ``semisparse::`` op schema,
its fake kernel, autograd formula and pure-torch reference, then loads the native
libraries that register CPU/CUDA kernels under the same names."""

from . import block_attention, bsr, gumbel, sparse24  # noqa: F401  (defines the schemas first)
from .._native import load as _load

_load()

from .block_attention import BlockMasks, block_sparse_attention  # noqa: E402
from .bsr import bsr_linear, bsr_linear_grad_input, bsr_linear_grad_values  # noqa: E402
from .gumbel import gumbel_nm_mask, gumbel_nm_masked_weight  # noqa: E402
from .sparse24 import sparse24_compress, sparse24_decompress, sparse24_linear  # noqa: E402

__all__ = [
    "BlockMasks",
    "block_attention",
    "block_sparse_attention",
    "bsr",
    "bsr_linear",
    "bsr_linear_grad_input",
    "bsr_linear_grad_values",
    "gumbel",
    "gumbel_nm_mask",
    "gumbel_nm_masked_weight",
    "sparse24",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_linear",
]
