"""DSFormer: dense x semi-structured-sparse factorisation ``W ~ S D`` (see
:class:`semisparse.nn.dense_sparse_linear.DenseSparseLinear`), its initialisations, whole-model :func:`factorize` (and the :func:`lowrank` baseline), and STF
training (:func:`train_stf`, :func:`export`)."""

from ..nn.dense_sparse_linear import (
    DenseSparseLinear,
    dense_sparse_params,
    k_for_compression,
    parse_pattern,
)
from .factorize import (
    FactorizeReport,
    LayerFactorization,
    LowRankLinear,
    collect_grams,
    factorize,
    lowrank,
    lowrank_rank,
)
from .init import (
    Factorization,
    gram,
    init_data_aware,
    init_svd_alternating,
    relative_error,
)
from .stf import dense_sparse_layers, export, freeze_masks, stf_loss, train_stf

__all__ = [
    "DenseSparseLinear",
    "Factorization",
    "FactorizeReport",
    "LayerFactorization",
    "LowRankLinear",
    "collect_grams",
    "dense_sparse_layers",
    "dense_sparse_params",
    "export",
    "factorize",
    "freeze_masks",
    "gram",
    "init_data_aware",
    "init_svd_alternating",
    "k_for_compression",
    "lowrank",
    "lowrank_rank",
    "parse_pattern",
    "relative_error",
    "stf_loss",
    "train_stf",
]
