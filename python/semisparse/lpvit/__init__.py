"""LPViT: hardware-aware block pruning for vision transformers (issue 5, in progress).

Done: the allocation math (block scores, distortion curves, bisection on the shared slope,
the analytical power term), ``prune`` (masks applied by zeroing the pruned blocks, or
``swap=True``: Linear layers replaced by BlockSparseLinear), the report table and PNG
chart. The hardware term: analytical or measured (our kernel's time per layer shape).
Next: fine-tuning through ``semisparse.train`` and the CLI."""

from .allocation import LEVELS, Allocation, LayerCurve, allocate, block_scores, distortion_curve
from .cost import MEASURED_LEVELS, measured_cost
from .calibrate import PrunableLayer, calibration_gradients, find_layers, layer_flops
from .prune import ALLOCATIONS, POWER, LayerReport, LPViTReport, mask_gradients, prune, reapply_masks

__all__ = [
    "ALLOCATIONS",
    "LEVELS",
    "MEASURED_LEVELS",
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
    "measured_cost",
    "prune",
    "reapply_masks",
]
