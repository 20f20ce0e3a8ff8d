"""``FLoRAConfig``: what to adapt and how (JSON-safe, validated on construction)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

__all__ = ["FORWARD_MODES", "INITS", "FLoRAConfig", "resolve_ranks"]

INITS = ("zero-core",)
FORWARD_MODES = ("auto", "fused", "delta", "factored")

# ranks: an int (every mode), a float fraction of each dimension, or a tuple with one entry
# (int or float) per mode of the target's weight.


def _check_rank_entry(r, where: str) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise ValueError(f"{where}: a rank must be an int >= 1 or a float fraction in (0, 1], got {r!r}")
    if isinstance(r, int) and r < 1:
        raise ValueError(f"{where}: an int rank must be >= 1, got {r}")
    if isinstance(r, float) and not (0.0 < r <= 1.0):
        raise ValueError(f"{where}: a float rank is a fraction of the dimension in (0, 1], got {r}")


def _norm_ranks(spec, where: str):
    """Validate a rank spec; lists become tuples (JSON round trip)."""
    if isinstance(spec, (list, tuple)):
        if len(spec) == 0:
            raise ValueError(f"{where}: a per-mode rank tuple must not be empty")
        for r in spec:
            _check_rank_entry(r, where)
        return tuple(spec)
    _check_rank_entry(spec, where)
    return spec


def resolve_ranks(spec, dims: tuple[int, ...], module_name: str) -> tuple[int, ...]:
    """Per-mode ranks for a weight of shape ``dims``. A float ``f`` gives ``max(1, round(f * d))``."""
    n = len(dims)
    if isinstance(spec, tuple):
        if len(spec) != n:
            raise ValueError(
                f"module '{module_name}': ranks {spec} have {len(spec)} entries but its weight "
                f"{tuple(dims)} has {n} modes (give one rank per mode, or one int/float for all)"
            )
        entries = spec
    else:
        entries = (spec,) * n
    out = []
    for i, (r, d) in enumerate(zip(entries, dims)):
        if isinstance(r, float):
            r = max(1, int(round(r * d)))
        if r > d:
            raise ValueError(
                f"module '{module_name}': rank {r} of mode {i} exceeds its dimension {d} "
                f"(weight shape {tuple(dims)}); give a smaller rank or a per-mode tuple/fraction"
            )
        out.append(int(r))
    return tuple(out)


def _norm_patterns(value, name: str, allow_str: bool = True):
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_str:
            raise ValueError(f"{name} must be a list of module names, got the string {value!r}")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{name}: {value!r} is not a valid regular expression: {e}") from e
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        for v in items:
            if not isinstance(v, str) or not v:
                raise ValueError(f"{name} must hold non-empty strings, got {v!r}")
        if not items:
            raise ValueError(f"{name} must not be an empty list (use None)")
        return items
    raise ValueError(f"{name} must be None, a string (regex, full match) or a list of names, got {type(value).__name__}")


@dataclass
class FLoRAConfig:
    """FLoRA adapter settings (PEFT-style).

    - ``ranks``: int (every mode), float fraction of each dimension (``max(1, round(f*d))``)
      or a tuple with one int/float per mode of the weight (Linear 2, ConvNd N+2,
      Embedding 2). A rank above its dimension is an error.
    - ``scale``: plain multiplier of dW. ``dropout``: on the adapter's input (not used by
      Embedding: token ids cannot be dropped).
    - ``target_modules``: list of names (full name or suffix at a ``.`` boundary), a string
      (regex, full match), or ``"all-linear"``. ``exclude_modules``: the same rules.
    - ``modules_to_save``: names (full or suffix): a trained copy per adapter, saved in full.
    - ``rank_pattern`` / ``scale_pattern``: ``{pattern: value}``; a key matches a module
      name as the regex ``(^|.*\\.)key$`` (suffix at a dot boundary), or, when it starts
      with ``^``, as a regex from the start of the name; the first matching key wins.
    - ``init``: ``"zero-core"`` (core = 0, factors ``kaiming_normal_(a=sqrt(3))``, so dW = 0).
    - ``forward_mode``: ``"auto"`` (see :mod:`semisparse.flora.layers`), ``"fused"``, ``"delta"`` or ``"factored"``.
    """

    ranks: object = 8
    scale: float = 1.0
    dropout: float = 0.0
    target_modules: object = None
    exclude_modules: object = None
    modules_to_save: object = None
    rank_pattern: dict = field(default_factory=dict)
    scale_pattern: dict = field(default_factory=dict)
    init: str = "zero-core"
    forward_mode: str = "auto"

    def __post_init__(self):
        self.ranks = _norm_ranks(self.ranks, "FLoRAConfig.ranks")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise ValueError(f"FLoRAConfig.scale must be a finite number, got {self.scale!r}")
        self.scale = float(self.scale)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"FLoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = _norm_patterns(self.target_modules, "FLoRAConfig.target_modules")
        self.exclude_modules = _norm_patterns(self.exclude_modules, "FLoRAConfig.exclude_modules")
        if self.exclude_modules == "all-linear":
            raise ValueError("FLoRAConfig.exclude_modules cannot be 'all-linear'")
        self.modules_to_save = _norm_patterns(self.modules_to_save, "FLoRAConfig.modules_to_save", allow_str=False)
        self.rank_pattern = self._norm_dict(self.rank_pattern, "rank_pattern", lambda v, w: _norm_ranks(v, w))
        self.scale_pattern = self._norm_dict(self.scale_pattern, "scale_pattern", _norm_scale)
        if self.init not in INITS:
            raise ValueError(f"FLoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"FLoRAConfig.forward_mode must be one of {FORWARD_MODES}, got {self.forward_mode!r}")

    @staticmethod
    def _norm_dict(d, name, norm):
        if d is None:
            return {}
        if not isinstance(d, dict):
            raise ValueError(f"FLoRAConfig.{name} must be a dict {{pattern: value}}, got {type(d).__name__}")
        out = {}
        for k, v in d.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"FLoRAConfig.{name}: keys must be non-empty strings, got {k!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"FLoRAConfig.{name}: key {k!r} is not a valid regular expression: {e}") from e
            out[k] = norm(v, f"FLoRAConfig.{name}[{k!r}]")
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = asdict(self)

        def js(v):
            if isinstance(v, tuple):
                return [js(x) for x in v]
            if isinstance(v, list):
                return [js(x) for x in v]
            if isinstance(v, dict):
                return {k: js(x) for k, x in v.items()}
            return v

        return {k: js(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> FLoRAConfig:
        if not isinstance(d, dict):
            raise ValueError(f"FLoRAConfig.from_dict needs a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"FLoRAConfig.from_dict: unknown keys {extra}; known: {sorted(known)}")
        return cls(**d)

    # ------------------------------------------------------------------ per module
    def ranks_for(self, module_name: str):
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.ranks

    def scale_for(self, module_name: str) -> float:
        key = _pattern_key(self.scale_pattern, module_name)
        return self.scale_pattern[key] if key is not None else self.scale


def _norm_scale(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: a scale must be a finite number, got {v!r}")
    return float(v)


def _pattern_key(patterns: dict, name: str):
    """PEFT's rule: the first key matching the name as ``(^|.*\\.)key$`` (or, for a key that
    starts with ``^``, matching as a regex from the start of the name, to the end)."""
    for key in patterns:
        if key.startswith("^"):
            if re.match(rf"{key}$" if not key.endswith("$") else key, name):
                return key
        elif re.match(rf"(^|.*\.){key}$", name):
            return key
    return None
