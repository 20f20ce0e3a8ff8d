"""Magnitude pruning: keep the largest |W|."""

from __future__ import annotations

import torch

from .patterns import SparsityPattern, keep_nm, keep_top_flat, n_pruned_of

__all__ = ["magnitude_mask"]


def magnitude_mask(weight: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep-mask of a ``[out, in]`` weight by magnitude.

    N:M: the N largest ``|W|`` in every group of M consecutive inputs of a row
    (``nm_mask(|W|, N, M)``). Unstructured: the ``round(ratio * numel)`` smallest ``|W|`` of
    the whole layer are pruned (the usual per-layer magnitude baseline).
    """
    scores = weight.detach().abs()
    if pattern.structured:
        return keep_nm(scores, pattern)
    return keep_top_flat(scores, n_pruned_of(scores.numel(), pattern.ratio))
