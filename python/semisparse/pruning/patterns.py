"""Sparsity patterns ("2:4", "unstructured:0.5") and the selections built on them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..formats.sparse24 import nm_mask

__all__ = ["SparsityPattern", "parse_pattern", "VALID_PATTERNS", "keep_top_rows", "keep_top_flat"]

VALID_PATTERNS = (
    '"N:M" with integers 0 < N <= M (N weights kept in every group of M consecutive inputs, '
    'e.g. "2:4", "1:4", "4:8"), or "unstructured:<ratio>" with 0 < ratio < 1 (the fraction '
    'of weights pruned, e.g. "unstructured:0.5")'
)

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_UNSTRUCTURED = re.compile(r"^\s*unstructured\s*:\s*(\S+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed pattern: ``n`` kept of every ``m`` along the input dim (N:M), or
    ``ratio``, the fraction pruned (unstructured). Exactly one of the two is set."""

    n: int | None = None
    m: int | None = None
    ratio: float | None = None

    @property
    def structured(self) -> bool:
        """True for N:M."""
        return self.m is not None

    @property
    def sparsity(self) -> float:
        """The fraction of weights pruned."""
        return 1.0 - self.n / self.m if self.structured else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"unstructured:{self.ratio:g}"


def parse_pattern(pattern: str | SparsityPattern) -> SparsityPattern:
    """Parse ``"N:M"`` (``0 < N <= M``; N:M groups run along the input dim) or
    ``"unstructured:<ratio>"`` (``0 < ratio < 1``, the fraction pruned).

    >>> parse_pattern("2:4")
    SparsityPattern(n=2, m=4, ratio=None)
    >>> parse_pattern("unstructured:0.5").sparsity
    0.5

    Anything else raises ``ValueError`` naming the valid forms.
    """
    if isinstance(pattern, SparsityPattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"pattern: expected {VALID_PATTERNS}; got {pattern!r} ({type(pattern).__name__})")
    if (mt := _NM.match(pattern)) is not None:
        n, m = int(mt.group(1)), int(mt.group(2))
        if not 0 < n <= m:
            raise ValueError(f"pattern: expected {VALID_PATTERNS}; got {pattern!r} (N={n}, M={m})")
        return SparsityPattern(n=n, m=m)
    if (mt := _UNSTRUCTURED.match(pattern)) is not None:
        try:
            ratio = float(mt.group(1))
        except ValueError:
            ratio = math.nan
        if not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
            raise ValueError(f"pattern: expected {VALID_PATTERNS}; got {pattern!r} (ratio must be in (0, 1))")
        return SparsityPattern(ratio=ratio)
    raise ValueError(f"pattern: expected {VALID_PATTERNS}; got {pattern!r}")


# ------------------------------------------------------------------ selections
def _ranked_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row of a 2-D tensor by descending score; equal scores keep the
    lower index first and NaN ranks lowest (the same order as ``nm_mask``)."""
    s = scores.detach()
    s = s.float() if s.dtype != torch.float64 else s
    s = torch.where(torch.isnan(s), torch.full((), -math.inf, dtype=s.dtype, device=s.device), s)
    return torch.sort(s, dim=-1, descending=True, stable=True).indices


def keep_top_rows(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Bool keep-mask of a 2-D ``scores``: in every row the ``n_pruned`` lowest scores are
    pruned (ties: the higher index is pruned first)."""
    order = _ranked_desc(scores)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order[:, : scores.shape[1] - n_pruned], True)
    return keep


def keep_top_flat(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    """Bool keep-mask pruning the ``n_pruned`` lowest scores of the whole tensor."""
    return keep_top_rows(scores.reshape(1, -1), n_pruned).reshape(scores.shape)


def n_pruned_of(count: int, ratio: float) -> int:
    """How many of ``count`` weights an unstructured ``ratio`` prunes: round(ratio * count)."""
    return int(round(ratio * count))


def keep_nm(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """N:M keep-mask along the last dim (``nm_mask``: the N highest scores per group of M)."""
    return nm_mask(scores, pattern.n, pattern.m)
