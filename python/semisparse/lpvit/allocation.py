"""LPViT's rate-distortion allocation of block sparsity across layers.

For every prunable layer ``l`` (weight ``W`` viewed as ``[out, in]``, blocks ``bh x bw``):

* block score: ``mean over the block of |W * g|`` where ``g`` is the gradient of
  ``mean(model(x)^2)`` averaged over label-free calibration inputs (first-order Taylor);
* distortion of pruning the lowest-scored fraction ``s`` of the blocks (``dW = -W`` on the
  pruned blocks, 0 elsewhere), at 101 levels ``s = 0, 0.01, ..., 1``::

      d(s) = mean((dW * g)^2) + 1/2 dW^T (g g^T + 1e-7 I) dW
           = mean((dW * g)^2) + 1/2 ((g . dW)^2 + 1e-7 ||dW||^2)

  (a rank-1 Hessian from the averaged gradient), made non-decreasing and smoothed, then
  differentiated numerically (``d'(s)``);
* cost: ``F_l`` dense FLOPs of the layer; pruning ``s`` saves ``s * F_l`` (blocks are equal
  size); the optional hardware/power term ``P_l(s)`` (analytical: proportional to the
  surviving blocks, ``(1 - s) F_l``; or measured: our kernel's time at ``s``) is added as
  ``d + beta * P`` with ``beta = mean_l(max d_l') / mean_l(max |P_l'|)`` (the paper's
  balancing of the two terms);
* allocation: every layer takes the largest ``s`` whose marginal distortion per FLOP saved,
  ``d_l'(s) / F_l``, is at most a shared slope ``lambda`` (capped at ``max_sparsity``,
  95% by default); ``lambda`` is found by bisection so that the kept FLOPs hit the target.

The paper states the slope condition per layer without normalising by FLOPs; dividing by
``F_l`` makes it the Lagrange condition of "least total distortion for the FLOPs removed",
which is what the allocation is meant to solve when layers differ in size. Documented
choice; the unnormalised variant is ``per_flop=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["LEVELS", "LayerCurve", "distortion_curve", "block_scores", "allocate", "Allocation"]

LEVELS = 101  # sparsity levels 0, 0.01, ..., 1


def _check_block(shape: tuple[int, int], block: tuple[int, int], where: str) -> None:
    bh, bw = block
    if bh < 1 or bw < 1 or shape[0] % bh or shape[1] % bw:
        raise ValueError(
            f"{where}: block {bh}x{bw} does not divide the weight {shape[0]}x{shape[1]} "
            f"(pad the layer or choose a block whose sides divide it)"
        )


def block_scores(weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``mean |W * g|`` per block: ``[out/bh, in/bw]`` (float32)."""
    _check_block(tuple(weight.shape), block, "block_scores")
    bh, bw = block
    n, k = weight.shape
    s = (weight.float() * grad.float()).abs()
    return s.reshape(n // bh, bh, k // bw, bw).mean(dim=(1, 3))


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Block indices (flat) from the lowest score to the highest; ties by index (stable)."""
    return torch.sort(scores.reshape(-1), stable=True).indices


def distortion_curve(weight: torch.Tensor, grad: torch.Tensor, block: tuple[int, int],
                     levels: int = LEVELS, damp: float = 1e-7) -> torch.Tensor:
    """``d(s)`` at ``levels`` evenly spaced sparsities in [0, 1] (float64), pruning the
    lowest-scored blocks first. Exact for each level (cumulative sums over the blocks in
    pruning order)."""
    bh, bw = block
    scores = block_scores(weight, grad, block)
    nb = scores.numel()
    order = _order(scores)
    n, k = weight.shape
    w = weight.double().reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3).reshape(nb, bh * bw)
    g = grad.double().reshape(n // bh, bh, k // bw, bw).permute(0, 2, 1, 3).reshape(nb, bh * bw)
    w, g = w[order], g[order]
    numel = weight.numel()
    # cumulative over pruned blocks (dW = -W there)
    sq = torch.cumsum(((w * g) ** 2).sum(-1), 0)       # sum (dW * g)^2
    dot = torch.cumsum((w * g).sum(-1), 0)              # -(g . dW)
    norm = torch.cumsum((w**2).sum(-1), 0)              # ||dW||^2
    zero = torch.zeros(1, dtype=torch.float64)
    sq, dot, norm = torch.cat([zero, sq]), torch.cat([zero, dot]), torch.cat([zero, norm])
    counts = torch.round(torch.linspace(0, 1, levels, dtype=torch.float64) * nb).long()
    d = sq[counts] / numel + 0.5 * (dot[counts] ** 2 + damp * norm[counts])
    return d


def _smooth_monotone(d: torch.Tensor) -> torch.Tensor:
    d = torch.cummax(d, 0).values  # distortion never decreases with more pruning
    if d.numel() >= 5:  # 5-point moving average, ends kept
        pad = torch.cat([d[:1].repeat(2), d, d[-1:].repeat(2)])
        d = pad.unfold(0, 5, 1).mean(-1)
        d = torch.cummax(d, 0).values
    return d


def _derivative(d: torch.Tensor) -> torch.Tensor:
    s = torch.linspace(0, 1, d.numel(), dtype=torch.float64)
    return torch.gradient(d, spacing=(s,))[0].clamp_min(0)


@dataclass
class LayerCurve:
    """One layer's inputs to the allocation."""

    name: str
    flops: float                      # dense FLOPs of the layer per calibration input
    distortion: torch.Tensor          # d(s) at LEVELS sparsities (float64)
    cost: torch.Tensor | None = None  # P(s) at the same levels (hardware/power term), or None
    max_sparsity: float = 0.95
    nblocks: int | None = None        # blocks in the layer: sparsities are realised as whole blocks

    def realised(self, s: float) -> float:
        """The sparsity actually applied for level ``s``: a whole number of blocks."""
        if not self.nblocks:
            return s
        cap = math.floor(self.max_sparsity * self.nblocks + 1e-9)
        return min(round(s * self.nblocks), cap) / self.nblocks


@dataclass
class Allocation:
    sparsity: dict[str, float]   # per layer: the fraction of blocks pruned
    kept_flops: float            # fraction of the layers' dense FLOPs kept
    slope: float
    beta: float


def allocate(curves: list[LayerCurve], flops: float, *, per_flop: bool = True, tol: float = 1e-3,
             iters: int = 200) -> Allocation:
    """Per-layer sparsities keeping ``flops`` (a fraction in (0, 1]) of the layers' dense
    FLOPs, by bisection on the shared slope (see the module docstring)."""
    if not (isinstance(flops, (int, float)) and 0 < flops <= 1):
        raise ValueError(f"allocate: the FLOPs target must be in (0, 1] (the fraction kept), got {flops!r}")
    if not curves:
        raise ValueError("allocate: no layers to allocate")
    total = sum(c.flops for c in curves)
    floor = sum(c.flops * (1 - c.max_sparsity) for c in curves) / total
    if flops < floor - 1e-12:
        raise ValueError(
            f"allocate: the FLOPs target {flops:.3f} is below what the per-layer cap allows "
            f"({floor:.3f} with at most {100 * max(c.max_sparsity for c in curves):.0f}% pruned per layer)"
        )
    levels = curves[0].distortion.numel()
    grid = torch.linspace(0, 1, levels, dtype=torch.float64)
    derivs = [_derivative(_smooth_monotone(c.distortion)) for c in curves]
    beta = 0.0
    cost_derivs = []
    if any(c.cost is not None for c in curves):
        cds = [torch.gradient(c.cost.double(), spacing=(grid,))[0] if c.cost is not None else torch.zeros(levels, dtype=torch.float64)
               for c in curves]
        num = sum(float(d.max()) for d in derivs) / len(derivs)
        den = sum(float(cd.abs().max()) for cd in cds) / len(cds)
        beta = num / den if den > 0 else 0.0
        cost_derivs = cds
    marginal = []
    for i, c in enumerate(curves):
        m = derivs[i] + (beta * cost_derivs[i] if cost_derivs else 0.0)
        # running max: the layer prunes up to the first level whose marginal exceeds the slope
        m = torch.cummax(m, 0).values
        marginal.append(m / c.flops if per_flop else m)

    def choose(slope: float) -> list[float]:
        out = []
        for c, m in zip(curves, marginal):
            ok = (m <= slope) & (grid <= c.max_sparsity + 1e-12)
            idx = int(ok.nonzero().max()) if bool(ok.any()) else 0
            out.append(float(grid[idx]))
        return out

    def kept(sp: list[float]) -> float:
        return sum(c.flops * (1 - c.realised(s)) for c, s in zip(curves, sp)) / total

    lo = min(float(m.min()) for m in marginal) - 1.0
    hi = max(float(m.max()) for m in marginal) + 1.0
    best = choose(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        sp = choose(mid)
        if kept(sp) > flops:  # not enough pruned: raise the slope
            lo = mid
        else:
            hi, best = mid, sp
        if hi - lo < 1e-15 * max(1.0, abs(hi)):
            break
    # the bisection lands on the smallest slope whose allocation keeps <= the target; where
    # plateaus made several layers jump at once, or whole blocks overshoot, give blocks back
    # one at a time (the layer with the most costly marginal first, among those whose next
    # block still fits under the target) while the target still holds
    sp = [c.realised(s) for c, s in zip(curves, best)]
    units = [1.0 / c.nblocks if c.nblocks else 1.0 / (levels - 1) for c in curves]
    while kept(sp) < flops - tol:
        cand = sorted(
            (i for i, x in enumerate(sp) if x > 1e-12),
            key=lambda i: -float(marginal[i][min(levels - 1, int(round(sp[i] * (levels - 1))))]),
        )
        moved = False
        for i in cand:
            trial = list(sp)
            trial[i] = max(0.0, sp[i] - units[i])
            if kept(trial) <= flops + 1e-12:
                sp, moved = trial, True
                break
        if not moved:
            break
    return Allocation(sparsity={c.name: c.realised(s) for c, s in zip(curves, sp)}, kept_flops=kept(sp),
                      slope=hi, beta=beta)
