"""LPViT: hardware-aware block pruning for vision transformers (issue 5, in progress).

Done: the allocation math (block scores, distortion curves, bisection on the shared slope,
the analytical power term), ``prune`` (masks applied by zeroing the pruned blocks, or
``swap=True``: Linear layers replaced by BlockSparseLinear), the report table and PNG
chart. Next: the measured hardware cost, fine-tuning through ``semisparse.train`` and the
CLI."""

from .allocation import LEVELS, Allocation, LayerCurve, allocate, block_scores, distortion_curve
from .calibrate import PrunableLayer, calibration_gradients, find_layers, layer_flops
from .prune import ALLOCATIONS, POWER, LayerReport, LPViTReport, mask_gradients, prune, reapply_masks

__all__ = [
    "ALLOCATIONS",
    "LEVELS",
    "POWER",
    "Allocation",
    "LPViTReport",
    "LayerCurve",
    "LayerReport",
    "PrunableLayer",
    "allocate",
    "block_scores",
    "calibration_gradients",
    "distortion_curve",
    "find_layers",
    "layer_flops",
    "mask_gradients",
    "prune",
    "reapply_masks",
]
