"""``lpvit.prune``: LPViT block pruning of a model, in place.

calibration gradient -> block scores -> per-layer distortion curves (101 levels) -> FLOPs
allocation (bisection on the shared slope, optional hardware/power term) -> block masks
applied (pruned blocks zeroed) -> a report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .allocation import LEVELS, Allocation, LayerCurve, allocate, block_scores, distortion_curve
from .calibrate import PrunableLayer, calibration_gradients, find_layers
from .cost import measured_cost

__all__ = ["prune", "LPViTReport", "LayerReport", "POWER", "ALLOCATIONS", "mask_gradients", "reapply_masks"]

POWER = (None, "analytical", "measured")
ALLOCATIONS = ("lpvit", "uniform")


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple[int, int]
    blocks: int
    pruned_blocks: int
    flops: float          # dense FLOPs per calibration batch

    @property
    def sparsity(self) -> float:
        return self.pruned_blocks / self.blocks if self.blocks else 0.0


@dataclass
class LPViTReport:
    block: tuple[int, int]
    target: float
    kept_flops: float                      # fraction of the pruned layers' dense FLOPs kept
    layers: list[LayerReport] = field(default_factory=list)
    masks: dict = field(default_factory=dict)   # {layer: bool block mask [out/bh, in/bw]}
    power: str | None = None
    beta: float = 0.0
    swapped: list = field(default_factory=list)   # layers replaced by BlockSparseLinear

    def plot(self, path) -> None:
        """A PNG bar chart of every layer's block sparsity and its share of the dense FLOPs
        (matplotlib, optional), written atomically."""
        import os
        from pathlib import Path

        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("lpvit: the chart needs matplotlib (pip install matplotlib)") from e
        names = [r.name for r in self.layers]
        total = sum(r.flops for r in self.layers) or 1.0
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) + 2), 4.5))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [100 * r.sparsity for r in self.layers], width=0.4, label="block sparsity (%)")
        ax.bar([i + 0.2 for i in x], [100 * r.flops / total for r in self.layers], width=0.4,
               label="share of dense FLOPs (%)")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_title(f"LPViT {self.block[0]}x{self.block[1]} blocks, FLOPs kept {self.kept_flops:.3f}")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)

    def table(self) -> str:
        lines = [f"LPViT: block {self.block[0]}x{self.block[1]}, FLOPs target {self.target:.3f}, kept "
                 f"{self.kept_flops:.4f}" + (f", power term {self.power} (beta {self.beta:.3g})" if self.power else ""),
                 f"{'layer':<48} {'shape':>11} {'blocks':>7} {'sparsity':>9} {'GFLOPs':>8}"]
        for r in self.layers:
            lines.append(f"{r.name:<48} {r.shape[0]:>5}x{r.shape[1]:<5} {r.blocks:>7} {100 * r.sparsity:>8.1f}% "
                         f"{r.flops / 1e9:>8.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _parse_block(block) -> tuple[int, int]:
    if isinstance(block, str):
        try:
            bh, bw = (int(v) for v in block.lower().split("x"))
        except ValueError:
            raise ValueError(f"lpvit: block must look like '32x32', got {block!r}") from None
        block = (bh, bw)
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
        raise ValueError(f"lpvit: block must be (rows, cols) of positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def block_mask_for(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep-mask over blocks with the ``pruned`` lowest-scored blocks removed (ties by index)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores.reshape(-1), stable=True).indices[:pruned]] = False
    return keep.reshape(scores.shape)


def expand(block_mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block mask [R, C] -> element mask [R*bh, C*bw]."""
    return block_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


@torch.no_grad()
def _apply(lay: PrunableLayer, mask: torch.Tensor, block) -> None:
    w = lay.module.weight
    m = expand(mask, block).to(w.device).reshape(w.shape)
    w.masked_fill_(~m, 0)


def prune(model: nn.Module, calib, block=(32, 32), flops: float = 0.5, power: str | None = None, *,
          max_sparsity: float = 0.95, targets=None, exclude=None, allocation: str = "lpvit",
          swap: bool = False) -> LPViTReport:
    """Prune ``model``'s Linear and Conv2d layers in ``block``-sized blocks so that their
    FLOPs are ``flops`` (a fraction in (0, 1]) of the dense ones, in place.

    ``calib``: an iterable of model inputs (tensors, tuples of positional inputs, or dicts of
    keyword inputs), no labels. ``power``: ``None``, ``"analytical"`` (cost proportional to
    the surviving blocks, balanced against the distortion as in the paper) or ``"measured"``
    (the time of our BlockSparseLinear kernel for each Linear layer's shape and calibration
    rows, on this machine, at 0-100% block sparsity; :func:`~semisparse.lpvit.cost.measured_cost`). Every selected
    layer's matrix (Conv2d: ``[out, in/groups * kh * kw]``) must be divisible by the block;
    use ``exclude`` for the ones that are not. ``allocation="uniform"`` is the baseline:
    every layer pruned to the same block sparsity ``1 - flops`` (the same block scores).
    ``swap=True`` replaces each pruned ``nn.Linear`` by a
    :class:`~semisparse.nn.BlockSparseLinear` holding only its kept blocks (Conv2d layers stay
    dense with zeroed blocks); the report lists the swapped layers. Returns a report with
    the block masks.
    """
    block = _parse_block(block)
    if not (isinstance(flops, (int, float)) and not isinstance(flops, bool) and 0 < flops <= 1):
        raise ValueError(f"lpvit: flops (the fraction of FLOPs kept) must be in (0, 1], got {flops!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"lpvit: allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if power not in POWER:
        raise ValueError(f"lpvit: power must be one of {POWER}, got {power!r}")
    if not (0 < max_sparsity <= 1):
        raise ValueError(f"lpvit: max_sparsity must be in (0, 1], got {max_sparsity!r}")
    layers = find_layers(model, targets, exclude)
    bad = [f"{lay.name} {lay.shape[0]}x{lay.shape[1]}" for lay in layers
           if lay.shape[0] % block[0] or lay.shape[1] % block[1]]
    if bad:
        raise ValueError(
            f"lpvit: block {block[0]}x{block[1]} does not divide {len(bad)} layer(s): {', '.join(bad[:6])}"
            f"{' ...' if len(bad) > 6 else ''}; exclude them (exclude=[...]) or choose another block"
        )
    grads, layer_flops = calibration_gradients(model, layers, calib)
    timings: dict = {}
    curves, scores = [], {}
    for lay in layers:
        w = lay.matrix().detach()
        g = lay.matrix(grads[lay.name])
        scores[lay.name] = block_scores(w, g, block)
        d = distortion_curve(w, g, block)
        f = max(layer_flops[lay.name], 1.0)
        cost = None
        if power == "analytical":
            cost = (1 - torch.linspace(0, 1, LEVELS, dtype=torch.float64)) * f
        elif power == "measured" and lay.kind == "linear":  # Conv2d layers stay dense: no measured saving
            rows = max(1, round(f / (2 * lay.shape[0] * lay.shape[1])))
            cost = measured_cost(lay.shape, block, rows, cache=timings)
        curves.append(LayerCurve(lay.name, flops=f, distortion=d, cost=cost, max_sparsity=max_sparsity,
                                 nblocks=scores[lay.name].numel()))
    if allocation == "uniform":
        if 1 - flops > max_sparsity + 1e-12:
            raise ValueError(f"lpvit: uniform allocation at flops={flops} exceeds max_sparsity={max_sparsity}")
        sp = {c.name: round((1 - flops) * c.nblocks) / c.nblocks for c in curves}
        total = sum(c.flops for c in curves)
        alloc = Allocation(sparsity=sp, kept_flops=sum(c.flops * (1 - sp[c.name]) for c in curves) / total,
                           slope=float("nan"), beta=0.0)
    else:
        alloc = allocate(curves, float(flops))
    report = LPViTReport(block=block, target=float(flops), kept_flops=alloc.kept_flops, power=power, beta=alloc.beta)
    for lay, c in zip(layers, curves):
        nb = c.nblocks
        pruned = round(alloc.sparsity[lay.name] * nb)
        mask = block_mask_for(scores[lay.name], pruned)
        _apply(lay, mask, block)
        report.masks[lay.name] = mask
        report.layers.append(LayerReport(lay.name, lay.kind, lay.shape, nb, pruned, c.flops))
    if swap:
        from ..nn import BlockSparseLinear

        for lay in layers:
            if lay.kind != "linear":
                continue
            new = BlockSparseLinear.from_dense(lay.module, block, report.masks[lay.name])
            new.train(lay.module.training)
            parent_name, _, child = lay.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            report.swapped.append(lay.name)
    return report


def mask_gradients(model: nn.Module, report: LPViTReport) -> list:
    """Keep the pruned blocks at zero while fine-tuning: hooks that zero their gradients
    (AdamW then never moves them: zero gradient, zero moments, decay of a zero weight).
    Returns the hook handles (``h.remove()`` to take them off)."""
    handles = []
    for name, bmask in report.masks.items():
        w = model.get_submodule(name).weight
        if not w.requires_grad:  # frozen: nothing will move it
            continue
        m = expand(bmask, report.block).to(w.device).reshape(w.shape)
        handles.append(w.register_hook(lambda g, m=m: g * m.to(g.dtype)))
    return handles


@torch.no_grad()
def reapply_masks(model: nn.Module, report: LPViTReport) -> None:
    """Zero the pruned blocks again (e.g. after a fine-tune without :func:`mask_gradients`)."""
    for name, bmask in report.masks.items():
        w = model.get_submodule(name).weight
        w.masked_fill_(~expand(bmask, report.block).to(w.device).reshape(w.shape), 0)
