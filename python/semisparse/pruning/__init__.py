"""One-shot pruning: magnitude, Wanda, SparseGPT.

``prune(model, method, pattern, calib, ...)`` prunes a model in place and returns its
keep-masks; the layer-level algorithms (``magnitude_mask``, ``wanda_mask``,
``sparsegpt_prune``) work on a single ``[out, in]`` weight.
"""

from .api import METHODS, prune
from .calibration import find_blocks
from .magnitude import magnitude_mask
from .patterns import VALID_PATTERNS, SparsityPattern, parse_pattern
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats, wanda_mask

__all__ = [
    "METHODS",
    "VALID_PATTERNS",
    "HessianStats",
    "SparsityPattern",
    "WandaStats",
    "find_blocks",
    "magnitude_mask",
    "parse_pattern",
    "prune",
    "sparsegpt_prune",
    "wanda_mask",
]
