"""Fine-tuning a block-pruned model with its masks fixed, through :mod:`semisparse.train`.

The pruned blocks stay exactly zero: layers still dense (pruned in place) get gradient
hooks that zero the pruned blocks' gradients, so AdamW never moves them (zero gradient,
zero moments, decoupled decay of a zero weight is zero; the tests check the blocks stay
exactly zero through training and resume); layers swapped to :class:`~semisparse.nn.BlockSparseLinear` hold
only their kept blocks, so nothing else is needed for them.

The default loss is cross-entropy on the labels, optionally mixed with knowledge
distillation from a teacher (usually the dense model before pruning)::

    loss = (1 - distill) * CE(student, labels) + distill * T^2 * KL(softmax(t/T) || softmax(s/T))

With ``distill=1`` no labels are needed. Or pass your own ``loss_fn(model, batch, info)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..train import TrainConfig, TrainResult, train
from .calibrate import _inputs, _output_tensor
from .prune import LPViTReport, mask_gradients

__all__ = ["finetune", "distillation_loss"]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
                      distill: float = 0.0, temperature: float = 1.0) -> torch.Tensor:
    """``(1 - distill) * CE(student, labels) + distill * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
    averaged over the rows (every dimension but the last). A term with weight 0 is not computed
    (its input may be ``None``)."""
    if not (0.0 <= distill <= 1.0):
        raise ValueError(f"distill must be in [0, 1], got {distill!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    s = student.float().reshape(-1, student.shape[-1])
    loss = s.new_zeros(())
    if distill < 1.0:
        if labels is None:
            raise ValueError("lpvit.finetune: the batch has no labels; pass distill=1.0 with a teacher, or a loss_fn")
        loss = loss + (1.0 - distill) * F.cross_entropy(s, labels.reshape(-1).long())
    if distill > 0.0:
        if teacher is None:
            raise ValueError("lpvit.finetune: distill > 0 needs a teacher model")
        t = teacher.float().reshape(-1, teacher.shape[-1])
        if t.shape != s.shape:
            raise ValueError(f"lpvit.finetune: teacher logits {tuple(teacher.shape)} do not match the "
                             f"student's {tuple(student.shape)}")
        kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      reduction="batchmean", log_target=True)
        loss = loss + distill * temperature**2 * kl
    return loss


def _split(batch, label_key: str):
    """(model inputs, labels or None) of a batch: a dict (labels under ``label_key``), an
    ``(inputs, labels)`` pair, or inputs alone."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != label_key}
        return inputs, batch.get(label_key)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


def _call(model: nn.Module, inputs) -> torch.Tensor:
    args, kwargs = _inputs(inputs)
    return _output_tensor(model(*args, **kwargs))


def finetune(model: nn.Module, data, config: TrainConfig, *, report: LPViTReport | None = None,
             loss_fn=None, teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 1.0,
             label_key: str = "labels", eval_fn=None, callbacks: Sequence = (), **train_kwargs) -> TrainResult:
    """Fine-tune a model pruned by :func:`semisparse.lpvit.prune` with its block masks fixed.

    Args:
        model: the pruned model (pruned in place, or with ``swap=True``).
        data: batches for :func:`semisparse.train.train` (a sequence or ``index -> batch``):
            dicts of model inputs with the labels under ``label_key``, ``(inputs, labels)``
            pairs, or inputs alone (then ``distill=1``).
        config: the :class:`~semisparse.train.TrainConfig` (steps, lr, checkpoints, DDP, ...).
        report: the :class:`LPViTReport` of the pruning; its masks are held fixed on the
            layers that were not swapped. ``None``: every layer must already be a
            BlockSparseLinear (nothing to hold), else an error.
        loss_fn: your own ``(model, batch, info) -> loss | (loss, metrics)``; replaces the
            default cross-entropy / distillation loss.
        teacher: the model to distil from (kept in eval mode, never trained).
        distill: weight of the distillation term in [0, 1]; ``temperature`` its T.
        train_kwargs: passed on to :func:`semisparse.train.train` (``params``,
            ``extra_state``, ``ddp_kwargs``...).

    Returns the :class:`~semisparse.train.TrainResult`; the model is trained in place.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"lpvit.finetune: config must be a semisparse.train.TrainConfig, got {type(config).__name__}")
    if report is not None and not isinstance(report, LPViTReport):
        raise TypeError(f"lpvit.finetune: report must be the LPViTReport of lpvit.prune, got {type(report).__name__}")
    if not (isinstance(distill, (int, float)) and 0.0 <= distill <= 1.0):
        raise ValueError(f"lpvit.finetune: distill must be in [0, 1], got {distill!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"lpvit.finetune: temperature must be > 0, got {temperature!r}")
    if distill > 0 and teacher is None and loss_fn is None:
        raise ValueError("lpvit.finetune: distill > 0 needs a teacher model (e.g. a copy of the dense model)")
    if config.distributed == "fsdp2" and report is not None and _dense_masked(report):
        raise ValueError("lpvit.finetune: masks on dense layers cannot be held under FSDP2 (sharded "
                         "weights); swap the layers to BlockSparseLinear (lpvit.prune(..., swap=True)) or use DDP")
    if report is None:
        from ..nn import BlockSparseLinear

        if not any(isinstance(m, BlockSparseLinear) for m in model.modules()):
            raise ValueError("lpvit.finetune: pass report= (the LPViTReport of lpvit.prune) so the pruned "
                             "blocks stay zero; the model has no BlockSparseLinear layers")

    if teacher is not None:
        teacher.eval()  # run under no_grad below; its parameters are left as they are

    if loss_fn is None:
        def loss_fn(m, batch, info):
            inputs, labels = _split(batch, label_key)
            logits = _call(m, inputs)
            t_logits = None
            if distill > 0:
                with torch.no_grad():
                    t_logits = _call(teacher, inputs)
            loss = distillation_loss(logits, t_logits, labels if distill < 1 else None, distill, temperature)
            metrics = {}
            if labels is not None and labels.dtype in (torch.int64, torch.int32):
                pred = logits.detach().reshape(-1, logits.shape[-1]).argmax(-1)
                metrics["acc"] = (pred == labels.reshape(-1)).float().mean().item()
            return loss, metrics

    hooks: list = []
    masked = _dense_masked(report) if report is not None else {}
    if masked:
        sub = LPViTReport(block=report.block, target=report.target, kept_flops=report.kept_flops, masks=masked)
        hooks = mask_gradients(model, sub)
    try:
        return train(model, data, loss_fn, config, eval_fn=eval_fn, callbacks=callbacks, **train_kwargs)
    finally:
        for h in hooks:
            h.remove()


def _dense_masked(report: LPViTReport) -> dict:
    """The report's masks of the layers that were not swapped to BlockSparseLinear."""
    return {k: v for k, v in report.masks.items() if k not in set(report.swapped)}
