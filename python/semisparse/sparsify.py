"""Swap ``nn.Linear`` modules of a model for :class:`~semisparse.nn.SparseLinear`."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn import SparseLinear

__all__ = ["sparsify", "SparsifyReport", "name_matches", "name_patterns"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def name_matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern when it equals it, ends with ``"." + pattern``
    (PEFT's suffix rule, e.g. ``"q_proj"``), or matches it as a glob (``"*.mlp.*"``)."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def name_patterns(x, what: str, where: str) -> list[str] | None:
    """``None``, one name pattern or an iterable of them -> a list (``None`` stays ``None``);
    anything else is a ``ValueError`` naming ``where`` and ``what``."""
    if x is None:
        return None
    if isinstance(x, str):
        return [x]
    if isinstance(x, Iterable):
        items = list(x)
        if all(isinstance(p, str) for p in items):
            return items
    raise ValueError(f"{where}: {what} must be a name pattern or a list of them, got {x!r}")


@dataclass
class SparsifyReport:
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    dense_bytes: int = 0   # weight bytes of the swapped layers before
    sparse_bytes: int = 0  # values + metadata after

    def __str__(self) -> str:
        lines = [f"sparsify: swapped {len(self.swapped)} Linear layer(s) to SparseLinear (2:4)"]
        if self.swapped:
            ratio = self.sparse_bytes / self.dense_bytes if self.dense_bytes else 0.0
            lines.append(
                f"  weight bytes {self.dense_bytes / 2**20:.2f} MiB -> {self.sparse_bytes / 2**20:.2f} MiB ({ratio:.4f}x)"
            )
        for name, why in self.skipped.items():
            lines.append(f"  skipped {name}: {why}")
        return "\n".join(lines)


def sparsify(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None = None,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
) -> SparsifyReport:
    """Replace eligible ``nn.Linear`` modules of ``model`` in place by ``SparseLinear``.

    - ``targets``: name patterns (see :func:`name_matches`) selecting the layers; ``None``
      selects every ``nn.Linear``.
    - ``exclude``: name patterns to leave dense.
    - ``masks``: ``{module name: bool mask [out, in]}``. When given, a selected layer
      without a mask is skipped (nothing is pruned that the caller did not ask for);
      when ``None``, every selected layer is pruned to 2:4 by magnitude.

    Layers are skipped, with the reason in the report, when ``in_features`` is not a
    multiple of 4, the dtype has no kernel, or the weight is shared with another module
    (tied embeddings): pruning it would silently change the other module too.
    """
    targets = [targets] if isinstance(targets, str) else targets
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    masks = dict(masks) if masks is not None else None

    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)

    if masks is not None:
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(masks) - linears)
        if unknown:
            raise ValueError(f"sparsify: masks name modules that are not nn.Linear layers of the model: {unknown}")

    report = SparsifyReport()
    swaps: list[tuple[str, SparseLinear]] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            if masks is not None and name in masks:
                report.skipped[name] = f"a mask was given but the module is a {type(mod).__name__}, not nn.Linear"
            continue
        if targets is not None and not any(name_matches(name, p) for p in targets):
            if masks is not None and name in masks:
                report.skipped[name] = "a mask was given but no pattern in targets selects this layer"
            continue
        if any(name_matches(name, p) for p in exclude):
            report.skipped[name] = "excluded by name"
            continue
        w = mod.weight
        if mod.in_features % 4:
            report.skipped[name] = f"in_features={mod.in_features} is not a multiple of 4"
            continue
        if w.dtype not in _KERNEL_DTYPES:
            report.skipped[name] = f"dtype {w.dtype} has no 2:4 kernel (float32, bfloat16, float16)"
            continue
        shared = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if shared:
            report.skipped[name] = f"weight is shared with {', '.join(shared)}"
            continue
        mask = None
        if masks is not None:
            if name not in masks:
                report.skipped[name] = "no mask given for this layer"
                continue
            mask = masks[name]
        swaps.append((name, SparseLinear.from_dense(mod, mask)))
        report.dense_bytes += w.numel() * w.element_size()

    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.swapped.append(name)
        report.sparse_bytes += new.values.numel() * new.values.element_size() + new.meta.numel()
    return report
