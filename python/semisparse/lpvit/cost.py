"""LPViT's hardware term measured on the machine at hand: the time of our
:class:`~semisparse.nn.BlockSparseLinear` forward for a layer's shape at a few block
sparsities, interpolated to the allocation's 101 levels."""

from __future__ import annotations

import statistics
import time

import torch

from .allocation import LEVELS

__all__ = ["MEASURED_LEVELS", "measured_cost"]

MEASURED_LEVELS = (0.0, 0.25, 0.5, 0.75, 0.95, 1.0)


@torch.no_grad()
def _time_ms(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def measured_cost(shape: tuple[int, int], block: tuple[int, int], rows: int, *, reps: int = 5, seed: int = 0,
                  dtype=torch.float32, cache: dict | None = None) -> torch.Tensor:
    """Milliseconds of ``BlockSparseLinear`` (``shape = (out, in)``, ``rows`` rows of input) at
    :data:`MEASURED_LEVELS` block sparsities (random block masks), linearly interpolated to
    ``LEVELS`` sparsities (float64). ``cache`` (a dict) reuses timings of equal shapes."""
    from ..nn import BlockSparseLinear

    key = (tuple(shape), tuple(block), int(rows), dtype)
    if cache is not None and key in cache:
        return cache[key]
    out_f, in_f = shape
    bh, bw = block
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, dtype=dtype)
    x = torch.randn(max(1, rows), in_f, generator=g).to(dtype)
    nb = (out_f // bh) * (in_f // bw)
    times = []
    for s in MEASURED_LEVELS:
        keep = torch.ones(nb, dtype=torch.bool)
        keep[torch.randperm(nb, generator=g)[: round(s * nb)]] = False
        mod = BlockSparseLinear.from_dense(lin, block, keep.reshape(out_f // bh, in_f // bw))
        times.append(_time_ms(lambda mod=mod: mod(x), reps))
    grid = torch.linspace(0, 1, LEVELS, dtype=torch.float64)
    xs = torch.tensor(MEASURED_LEVELS, dtype=torch.float64)
    ys = torch.tensor(times, dtype=torch.float64)
    idx = torch.clamp(torch.searchsorted(xs, grid, right=True) - 1, 0, len(xs) - 2)
    t = (grid - xs[idx]) / (xs[idx + 1] - xs[idx])
    cost = ys[idx] + t * (ys[idx + 1] - ys[idx])
    if cache is not None:
        cache[key] = cost
    return cost
