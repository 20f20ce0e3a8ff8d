"""DSFormer: dense x semi-structured-sparse factorisation ``W ~ S D`` (see
:class:`semisparse.nn.dense_sparse_linear.DenseSparseLinear`) and its initialisations."""

from ..nn.dense_sparse_linear import (
    DenseSparseLinear,
    dense_sparse_params,
    k_for_compression,
    parse_pattern,
)
from .init import (
    Factorization,
    gram,
    init_data_aware,
    init_svd_alternating,
    relative_error,
)

__all__ = [
    "DenseSparseLinear",
    "Factorization",
    "dense_sparse_params",
    "gram",
    "init_data_aware",
    "init_svd_alternating",
    "k_for_compression",
    "parse_pattern",
    "relative_error",
]
