from .block_attention import BlockSparseAttention
from .block_sparse_linear import BlockSparseLinear
from .sparse_linear import SparseLinear

__all__ = ["BlockSparseAttention", "BlockSparseLinear", "SparseLinear"]
