"""Configuration, per-step context, result type and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["RESULT_FIELDS", "StepInfo", "TrainConfig", "TrainResult", "lr_at"]

_SCHEDULES = ("cosine", "linear", "constant")
_AUTOCAST = ("auto", "bf16", "off")
_DISTRIBUTED = ("auto", "none", "ddp", "fsdp2")

#: Fields whose value changes the numbers a run produces. Resuming from a checkpoint written
#: with a different value of one of these raises ``ValueError``; every other field (logging,
#: evaluation cadence, checkpoint bookkeeping, progress bar, distributed strategy name) may
#: change between a run and its resumption.
RESULT_FIELDS = (
    "steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "schedule",
    "weight_decay",
    "betas",
    "eps",
    "grad_clip",
    "grad_accum",
    "autocast",
    "seed",
    "shuffle",
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Everything that decides what :func:`semisparse.train.train` does.

    ``steps`` counts optimizer steps; each consumes ``grad_accum`` micro-batches per rank.
    The learning rate of optimizer step ``s`` is :func:`lr_at` ``(s, config)`` (times the
    param group's ``lr_scale``). See the module docstring of :mod:`semisparse.train` for the
    data order, logging, checkpoint and resume contracts."""

    steps: int
    lr: float = 5e-4
    min_lr: float = 5e-6
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    autocast: str = "auto"
    seed: int = 0
    shuffle: bool = True
    log_every: int = 1
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = True
    metrics_path: str | None = None
    progress: bool = True
    desc: str = "train"
    distributed: str = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TrainConfig: {name} must be {expected}, got {getattr(self, name)!r}")

        def int_at_least(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < low:
                raise bad(name, f"{'None or ' if optional else ''}an integer >= {low}")

        def boolean(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise bad(name, "one of " + ", ".join(repr(o) for o in options))

        def path(name: str) -> None:
            v = getattr(self, name)
            if v is None:
                return
            if isinstance(v, os.PathLike):
                v = os.fspath(v)
                setattr(self, name, v)
            if not isinstance(v, str) or not v:
                raise bad(name, "None or a non-empty path")

        int_at_least("steps", 1)
        if not _is_real(self.lr) or self.lr <= 0:
            raise bad("lr", "a finite number > 0")
        if not _is_real(self.min_lr) or self.min_lr < 0 or self.min_lr > self.lr:
            raise bad("min_lr", f"a finite number in [0, lr={self.lr!r}]")
        int_at_least("warmup_steps", 0)
        if self.warmup_steps > self.steps:
            raise bad("warmup_steps", f"an integer in [0, steps={self.steps}]")
        choice("schedule", _SCHEDULES)
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a finite number >= 0")
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if not (
            isinstance(self.betas, tuple)
            and len(self.betas) == 2
            and all(_is_real(b) and 0 <= b < 1 for b in self.betas)
        ):
            raise bad("betas", "a pair of numbers in [0, 1)")
        if not _is_real(self.eps) or self.eps <= 0:
            raise bad("eps", "a finite number > 0")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "None or a finite number > 0")
        int_at_least("grad_accum", 1)
        choice("autocast", _AUTOCAST)
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise bad("seed", "an integer in [0, 2**63)")
        boolean("shuffle")
        int_at_least("log_every", 1)
        int_at_least("eval_every", 1, optional=True)
        path("checkpoint_dir")
        int_at_least("checkpoint_every", 1, optional=True)
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise bad("checkpoint_every", "None when checkpoint_dir is None (nowhere to write)")
        int_at_least("keep_checkpoints", 1)
        boolean("resume")
        path("metrics_path")
        boolean("progress")
        if not isinstance(self.desc, str):
            raise bad("desc", "a string")
        choice("distributed", _DISTRIBUTED)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``betas`` as a list), as stored in ``trainer.json``."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def resolved_metrics_path(self) -> str | None:
        if self.metrics_path is not None:
            return self.metrics_path
        if self.checkpoint_dir is not None:
            return os.path.join(self.checkpoint_dir, "metrics.jsonl")
        return None


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is, passed to ``loss_fn`` with every micro-batch."""

    step: int  #: 0-based index of the optimizer step being computed
    micro: int  #: 0-based micro-batch index within the step
    steps: int  #: total optimizer steps (``config.steps``)
    grad_accum: int
    rank: int
    world_size: int

    @property
    def progress(self) -> float:
        """``step / steps``, in ``[0, 1)`` (e.g. for temperature or sparsity schedules)."""
        return self.step / self.steps


@dataclass
class TrainResult:
    step: int  #: completed optimizer steps (== config.steps after a full run)
    history: list[dict] = field(default_factory=list)  #: the metric lines logged by this call
    last_eval: dict | None = None  #: the latest eval_fn result, if any
    resumed_from: int | None = None  #: the checkpoint step this call resumed from
    model: nn.Module | None = None  #: the unwrapped model (FSDP2: parameters stay DTensors)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based), before a group's ``lr_scale``.

    The same convention as Hugging Face's ``get_*_schedule_with_warmup``:

    * warmup (``step < warmup_steps``): ``lr * step / warmup_steps`` (so step 0 uses 0);
    * then with ``p = (step - warmup_steps) / max(1, steps - warmup_steps)`` in ``[0, 1)``:
      ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``;
      ``linear``: ``min_lr + (lr - min_lr) * (1 - p)``; ``constant``: ``lr``.

    ``lr_at(config.steps, config)`` is ``min_lr`` (cosine, linear): the value the schedule
    reaches at the end of the run."""
    if not _is_int(step) or step < 0:
        raise ValueError(f"lr_at: step must be an integer >= 0, got {step!r}")
    c = config
    if step < c.warmup_steps:
        return c.lr * step / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    p = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
    if c.schedule == "cosine":
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return c.min_lr + (c.lr - c.min_lr) * (1.0 - p)


def resolve_autocast(config: TrainConfig, device: torch.device) -> bool:
    if config.autocast == "off":
        return False
    if config.autocast == "bf16":
        return True
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
