"""LPViT: hardware-aware block pruning for vision transformers (work in progress: the
allocation math; the model-level prune, swapping to BlockSparseLinear and the CLI come next)."""

from .allocation import LEVELS, Allocation, LayerCurve, allocate, block_scores, distortion_curve

__all__ = ["LEVELS", "Allocation", "LayerCurve", "allocate", "block_scores", "distortion_curve"]
