"""Reading model outputs for the losses of the methods that train (MaskLLM, DSFormer's STF,
the CLI): which models carry their own language-model loss, where the logits are, and the
logit distillation term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["is_causal_lm", "logit_kl", "logits_of"]


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM (class name with ``CausalLM`` / ``LMHead``; DDP unwrapped):
    ``model(**batch, labels=...)`` returns its own next-token loss."""
    name = type(getattr(model, "module", model)).__name__
    return "CausalLM" in name or "LMHead" in name


def logits_of(out, where: str, hint: str) -> torch.Tensor:
    """The logits of a model output: the tensor itself, ``out.logits``, or ``out[0]`` of a
    tuple; otherwise a ``ValueError`` from ``where`` ending in ``hint``."""
    if isinstance(out, torch.Tensor):
        return out
    lg = getattr(out, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"{where}: cannot find logits in the model's output ({type(out).__name__}); {hint}")


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, where: str = "logit_kl"):
    """``KL(softmax(t/T) || softmax(s/T))`` over the last dimension, averaged over every other
    position (float32)."""
    s = student.float().reshape(-1, student.shape[-1])
    t = teacher.float().reshape(-1, teacher.shape[-1])
    if s.shape != t.shape:
        raise ValueError(f"{where}: teacher logits {tuple(teacher.shape)} do not match the student's {tuple(student.shape)}")
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                    reduction="batchmean", log_target=True)
