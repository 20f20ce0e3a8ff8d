"""LPViT: hardware-aware block pruning for vision transformers.

``prune``: label-free calibration gradient -> block scores -> per-layer distortion curves
(101 levels) -> rate-distortion allocation (bisection on the shared slope, optional
analytical or measured hardware term) -> masks applied (pruned blocks zeroed, or
``swap=True``: Linear layers replaced by BlockSparseLinear) -> a report (table, PNG chart).
``finetune``: training with the masks fixed through :mod:`semisparse.train`, with optional
distillation from the dense model."""

from .allocation import LEVELS, Allocation, LayerCurve, allocate, block_scores, distortion_curve
from .cost import MEASURED_LEVELS, measured_cost
from .calibrate import PrunableLayer, calibration_gradients, find_layers, layer_flops
from .finetune import distillation_loss, finetune
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
    "distillation_loss",
    "distortion_curve",
    "finetune",
    "find_layers",
    "layer_flops",
    "mask_gradients",
    "measured_cost",
    "prune",
    "reapply_masks",
]
