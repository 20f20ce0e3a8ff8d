from .block_attention import BlockSparseAttention
from .block_sparse_linear import BlockSparseLinear
from .dense_sparse_linear import DenseSparseLinear
from .sparse_linear import SparseLinear

__all__ = ["BlockSparseAttention", "BlockSparseLinear", "DenseSparseLinear", "SparseLinear"]
