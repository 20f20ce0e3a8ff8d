"""Training a factorised model (:func:`semisparse.dsformer.factorize`) with the
Straight-Through Factorizer, through :mod:`semisparse.train`.

Every :class:`~semisparse.nn.dense_sparse_linear.DenseSparseLinear` trains its dense basis
``D`` and the latent ``S_latent`` jointly (the N:M projection is recomputed each forward and
the gradient passes straight through); anything else with ``requires_grad`` trains too.
Optionally the masks are frozen for the last ``freeze_mask_steps`` steps, and at the end every
2:4 layer is compressed (:meth:`DenseSparseLinear.compress`) for the sparse kernel.

Default loss (or pass ``loss_fn(model, batch, info)``):

* a dict batch with ``"labels"``, or any batch of a Hugging Face causal LM (class name with
  ``CausalLM``/``LMHead``): the model's own loss ``model(**batch).loss`` (``labels`` default
  to ``input_ids``; a tensor batch is taken as ``input_ids``);
* otherwise ``(inputs, labels)`` pairs: cross-entropy of the output logits;
* with a ``teacher`` and ``distill > 0``:
  ``(1 - distill) * task + distill * T^2 * KL(softmax(t/T) || softmax(s/T))`` over the last
  dimension of the logits (averaged over every other position); ``distill=1`` needs no labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dense_sparse_linear import DenseSparseLinear
from ..train import TrainConfig, TrainResult, train
from ..train.outputs import is_causal_lm, logit_kl, logits_of

__all__ = ["dense_sparse_layers", "export", "freeze_masks", "stf_loss", "train_stf"]


def dense_sparse_layers(model: nn.Module) -> dict[str, DenseSparseLinear]:
    model = getattr(model, "module", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, DenseSparseLinear)}


def freeze_masks(model: nn.Module) -> list[str]:
    """Freeze the mask of every DenseSparseLinear still in the STF state; returns their names."""
    done = []
    for name, mod in dense_sparse_layers(model).items():
        if not mod.compressed:
            mod.freeze_mask()
            done.append(name)
    return done


def export(model: nn.Module) -> list[str]:
    """Compress every 2:4 DenseSparseLinear (inference state, sparse kernel); layers of other
    N:M patterns cannot be compressed and get their mask frozen instead. Returns the names of
    the compressed layers."""
    done = []
    for name, mod in dense_sparse_layers(model).items():
        if (mod.n, mod.m) == (2, 4):
            mod.compress()
            done.append(name)
        elif not mod.mask_frozen:
            mod.freeze_mask()
    return done


class _FrozenMaskState:
    """Checkpointed with the training state (``extra_state`` of :func:`semisparse.train.train`):
    the masks of the layers frozen during training, whose ``mask`` buffers did not exist when
    the loop listed the model's buffers, so a resume after the freeze restores them; wraps
    the caller's own ``extra_state`` (keys prefixed ``user.``)."""

    def __init__(self, model: nn.Module, user=None):
        self.model, self.user = model, user

    def state_dict(self) -> dict:
        sd = {f"mask.{name}": mod.mask for name, mod in dense_sparse_layers(self.model).items()
              if not mod.compressed and mod.mask is not None}
        if self.user is not None:
            sd.update({f"user.{k}": v for k, v in self.user.state_dict().items()})
        return sd

    def load_state_dict(self, sd: Mapping) -> None:
        layers = dense_sparse_layers(self.model)
        for key, value in sd.items():
            if not key.startswith("mask."):
                continue
            name = key[len("mask."):]
            mod = layers.get(name)
            if mod is None or mod.compressed:
                raise ValueError(f"train_stf: the checkpoint holds a frozen mask for {name!r}, which is not a "
                                 "DenseSparseLinear in the training state of this model")
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != (mod.out_features, mod.k):
                raise ValueError(f"train_stf: checkpointed mask {name!r} must be a [{mod.out_features}, {mod.k}] tensor")
            mod.mask = value.to(device=mod.D.device, dtype=torch.bool).clone()
        if self.user is not None:
            self.user.load_state_dict({k[len("user."):]: v for k, v in sd.items() if k.startswith("user.")})


def _logits(out) -> torch.Tensor:
    return logits_of(out, "train_stf", "pass loss_fn")


def _call(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def stf_loss(model, batch, teacher=None, distill: float = 0.0, temperature: float = 1.0):
    """The default loss of :func:`train_stf` (see the module docs): ``(loss, metrics)``."""
    metrics = {}
    lm = is_causal_lm(model)
    if (isinstance(batch, Mapping) and ("labels" in batch or lm)) or (lm and isinstance(batch, torch.Tensor)):
        inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
        t_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if lm and "labels" not in inputs:
            inputs["labels"] = inputs["input_ids"]
        out = model(**inputs)
        task = getattr(out, "loss", None)
        if task is None and distill < 1:
            raise ValueError("train_stf: the model returned no loss for a batch with labels; pass loss_fn")
        logits = _logits(out) if distill > 0 else None
    else:
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, labels = batch
        else:
            inputs, labels = batch, None
        t_inputs = inputs
        logits = _logits(_call(model, inputs))
        task = None
        if distill < 1:
            if labels is None:
                raise ValueError("train_stf: the batch has no labels; give (inputs, labels) pairs, "
                                 "distill=1.0 with a teacher, or a loss_fn")
            task = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long())
    loss = 0.0
    if distill < 1:
        loss = (1.0 - distill) * task
        metrics["task_loss"] = float(task.detach())
    if distill > 0:
        with torch.no_grad():
            t_logits = _logits(_call(teacher, t_inputs))
        kl = logit_kl(logits, t_logits, temperature, where="train_stf")
        loss = loss + distill * temperature ** 2 * kl
        metrics["kl"] = float(kl.detach())
    return loss, metrics


def train_stf(model: nn.Module, data, config: TrainConfig, *, loss_fn=None, teacher: nn.Module | None = None,
              distill: float = 0.0, temperature: float = 1.0, freeze_mask_steps: int = 0, compress: bool = True,
              callbacks: Sequence = (), **train_kwargs) -> TrainResult:
    """Train a factorised model with STF (see the module docs); the model is trained in place.

    Args:
        model: a model with DenseSparseLinear layers in the training state (from
            :func:`semisparse.dsformer.factorize`).
        data: batches for :func:`semisparse.train.train` (a sequence or ``index -> batch``).
        config: the :class:`~semisparse.train.TrainConfig`.
        loss_fn: your own ``(model, batch, info) -> loss | (loss, metrics)``.
        teacher: model to distil from (eval mode, no grad; usually the dense model).
        distill: weight of the distillation term in [0, 1]; ``temperature`` its T.
        freeze_mask_steps: freeze every DenseSparseLinear's mask for the last this many
            steps (a callback at completed step ``config.steps - freeze_mask_steps``; all of
            them when ``>= config.steps``: frozen before the first step). 0: never.
        compress: after training, compress every 2:4 DenseSparseLinear
            (:func:`export`: the parameters are replaced, so build new optimizers for any
            further training); other patterns get their mask frozen instead.
        callbacks, train_kwargs: passed on to :func:`semisparse.train.train`.

    Returns the :class:`~semisparse.train.TrainResult`.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train_stf: config must be a semisparse.train.TrainConfig, got {type(config).__name__}")
    if not (isinstance(distill, (int, float)) and 0.0 <= distill <= 1.0):
        raise ValueError(f"train_stf: distill must be in [0, 1], got {distill!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"train_stf: temperature must be > 0, got {temperature!r}")
    if not (isinstance(freeze_mask_steps, int) and not isinstance(freeze_mask_steps, bool) and freeze_mask_steps >= 0):
        raise ValueError(f"train_stf: freeze_mask_steps must be an integer >= 0, got {freeze_mask_steps!r}")
    if distill > 0 and teacher is None and loss_fn is None:
        raise ValueError("train_stf: distill > 0 needs a teacher model (e.g. a copy of the dense model)")
    layers = dense_sparse_layers(model)
    if not layers:
        raise ValueError("train_stf: the model has no DenseSparseLinear layers; run semisparse.dsformer.factorize first")
    if any(m.compressed for m in layers.values()):
        raise ValueError("train_stf: some DenseSparseLinear layers are already compressed (STF needs the training state)")
    if teacher is not None:
        teacher.eval()

    if loss_fn is None:
        def loss_fn(m, batch, info):
            return stf_loss(m, batch, teacher, distill, temperature)

    callbacks = list(callbacks)
    if freeze_mask_steps > 0:
        if freeze_mask_steps >= config.steps:
            freeze_masks(model)
        else:
            at = config.steps - freeze_mask_steps

            def freeze(step, metrics):
                if step == at:
                    freeze_masks(model)

            callbacks.insert(0, freeze)
    # frozen masks travel in the checkpoints, so a resume after the freeze continues exactly
    train_kwargs["extra_state"] = _FrozenMaskState(model, train_kwargs.get("extra_state"))
    result = train(model, data, loss_fn, config, callbacks=callbacks, **train_kwargs)
    if compress:
        export(model)
    return result
