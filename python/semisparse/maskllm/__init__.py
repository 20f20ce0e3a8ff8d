"""MaskLLM: learnable N:M masks (Fang et al., "MaskLLM: Learnable Semi-Structured Sparsity
for Large Language Models", NeurIPS 2024), on any PyTorch model.

Every group of ``m`` consecutive input weights of a Linear layer chooses one of the
``C(m, n)`` patterns that keep ``n`` (2:4: 6 candidates). The choice is a categorical
distribution with learnable logits, sampled differentiably with the Gumbel softmax
(the fused op :func:`semisparse.ops.gumbel_nm_masked_weight`); the weights stay frozen and
the logits learn from the task loss. The final mask is the argmax pattern of every group.

    from semisparse import maskllm
    cfg = maskllm.MaskLLMConfig(pattern="2:4", steps=200, prior="sparsegpt")
    result = maskllm.train_masks(model, token_ids, cfg)      # model: layers -> MaskLLMLinear
    maskllm.export(model)                                    # -> SparseLinear (compressed 2:4)

Lower level: :func:`add_masks`, :class:`MaskLLMLinear`, :func:`learned_masks`,
:func:`remove_masks`, :func:`masks_disabled`; per-task masks in 0.67 bits per weight:
:func:`save_task_masks` / :func:`load_task_masks` / :func:`apply_task_masks`.
"""

from .layer import MaskLLMLinear, SamplingState, logits_for_mask, mask_from_logits, pattern_index, prior_logits
from .model import (
    add_masks,
    apply_task_masks,
    changed_fraction,
    export,
    learned_masks,
    load_task_masks,
    mask_layers,
    masks_disabled,
    pack_masks,
    remove_masks,
    sampling_state,
    save_task_masks,
    set_masks,
    unpack_masks,
)
from .schedule import SCHEDULES, Schedule
from .trainer import LOSSES, PRIORS, MaskLLMConfig, MaskLLMResult, memory_per_weight, train_masks

__all__ = [
    "LOSSES",
    "PRIORS",
    "SCHEDULES",
    "MaskLLMConfig",
    "MaskLLMLinear",
    "MaskLLMResult",
    "SamplingState",
    "Schedule",
    "add_masks",
    "apply_task_masks",
    "changed_fraction",
    "export",
    "learned_masks",
    "load_task_masks",
    "logits_for_mask",
    "mask_from_logits",
    "mask_layers",
    "masks_disabled",
    "memory_per_weight",
    "pack_masks",
    "pattern_index",
    "prior_logits",
    "remove_masks",
    "sampling_state",
    "save_task_masks",
    "set_masks",
    "train_masks",
    "unpack_masks",
]
