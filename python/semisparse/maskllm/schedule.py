"""Schedules of the Gumbel temperature ``tau`` and the logit scale ``kappa``.

MaskLLM anneals both linearly over training: ``tau`` 4 -> 0.05 (soft, exploring samples
first, nearly one-hot at the end) and ``kappa`` 100 -> 500 (the logits' share against the
noise grows). ``"exp"`` (geometric) and ``"cosine"`` are offered as alternatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule", "SCHEDULES"]

SCHEDULES = ("linear", "exp", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    """``value(step)`` goes from ``start`` (step 0) to ``end`` (the last step, ``steps - 1``)."""

    start: float
    end: float
    steps: int
    kind: str = "linear"

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"Schedule: kind must be one of {SCHEDULES}, got {self.kind!r}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"Schedule: {name} must be a finite number, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"Schedule: steps must be an integer >= 1, got {self.steps!r}")
        if self.kind == "exp" and (self.start <= 0 or self.end <= 0):
            raise ValueError(f"Schedule: 'exp' needs start and end > 0, got {self.start} and {self.end}")

    def progress(self, step: int) -> float:
        if self.steps <= 1:
            return 1.0
        return min(max(step / (self.steps - 1), 0.0), 1.0)

    def __call__(self, step: int) -> float:
        t = self.progress(step)
        a, b = float(self.start), float(self.end)
        if self.kind == "constant":
            return a
        if self.kind == "linear":
            return a + (b - a) * t
        if self.kind == "exp":
            return a * (b / a) ** t
        return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * t))  # cosine
