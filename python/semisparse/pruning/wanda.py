"""Wanda (Sun et al. 2023): prune by ``|W_ij| * ||X_j||_2``, no weight update."""

from __future__ import annotations

import torch

from .patterns import SparsityPattern, keep_nm, keep_top_rows, n_pruned_of

__all__ = ["wanda_mask", "WandaStats"]


class WandaStats:
    """Accumulates ``sum_t x_tj^2`` over the calibration tokens ``t`` of one layer's input
    (float32, or float64 for a float64 layer)."""

    def __init__(self, in_features: int, device, dtype: torch.dtype = torch.float32):
        self.sq = torch.zeros(in_features, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``[tokens, in_features]``."""
        x = x.to(device=self.sq.device, dtype=self.sq.dtype)
        self.sq += x.square().sum(0)
        self.tokens += x.shape[0]

    def column_norms(self) -> torch.Tensor:
        """``||X_j||_2`` for every input feature ``j``."""
        return self.sq.sqrt()


def wanda_mask(weight: torch.Tensor, column_norms: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` weight: score ``S_ij = |W_ij| * ||X_j||_2``.

    N:M: keep the N highest scores in every group of M consecutive inputs of a row.
    Unstructured: in every output row prune the ``round(ratio * in)`` lowest scores (the
    paper compares weights per output, which it found better than per layer for LLMs).
    Ties keep the lower index.
    """
    w = weight.detach()
    norms = column_norms.to(device=w.device)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    scores = w.to(dtype).abs() * norms.to(dtype).unsqueeze(0)
    if pattern.structured:
        return keep_nm(scores, pattern)
    return keep_top_rows(scores, n_pruned_of(scores.shape[1], pattern.ratio))
