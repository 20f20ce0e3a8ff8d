"""Fused Gumbel N:M mask step on the GPU vs the composite torch formulation (issue 8 target:
>= 20x, forward + backward). One [size, size] layer, 2:4 (logits [size*size/4, 6]), frozen
weights, one step of the mask logits:

* composite: F.gumbel_softmax(logits * kappa, tau) @ patterns, W * mask, backward
* fused:     semisparse.ops.gumbel.gumbel_nm_masked_weight(W, logits, ...), backward
             (fp32 and bf16 logits; bf16 weights for the bf16 row)

Timed with CUDA events after a warm-up, median of --reps, inputs rotated among 3 sets so no
run reads a warm cache. Prints one table.

    python bench/gpu/gumbel_bench.py [--size 8192] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from semisparse.ops import gumbel as G

TAU, KAPPA, SEED = 0.5, 3.0, 1234


def inputs(size: int, wdt, ldt, k: int):
    gen = torch.Generator(device="cuda").manual_seed(k)
    w = torch.randn(size, size, generator=gen, device="cuda").to(wdt)
    lg = torch.randn(size * size // 4, 6, generator=gen, device="cuda").to(ldt).requires_grad_()
    g = torch.randn(size, size, generator=gen, device="cuda").to(wdt)
    return w, lg, g


def step(variant: str, w, lg, g, patterns, offset: int) -> None:
    lg.grad = None
    if variant == "composite":
        mask = F.gumbel_softmax(lg * KAPPA, tau=TAU, hard=False) @ patterns.to(lg.dtype)
        wm = w * mask.view_as(w).to(w.dtype)
    else:
        wm = G.gumbel_nm_masked_weight(w, lg, SEED, offset, TAU, KAPPA, 2, 4)
    wm.backward(g)


def time_variant(variant, size, wdt, ldt, reps):
    sets = [inputs(size, wdt, ldt, k) for k in range(3)]
    patterns = G.pattern_table(2, 4).cuda()
    for i in range(3):
        step(variant, *sets[i], patterns, i)
    torch.cuda.synchronize()
    times = []
    for r in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(variant, *sets[r % 3], patterns, 100 + r)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    print(f"gumbel mask step, {a.size}x{a.size} weight, 2:4, fwd+bwd, median of {a.reps} (ms), "
          f"{torch.cuda.get_device_name()}")
    print(f"{'weights':>8} {'logits':>8} {'composite':>10} {'fused':>8} {'speed-up':>9}")
    for wdt, ldt in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        comp = time_variant("composite", a.size, wdt, ldt, a.reps)
        fused = time_variant("fused", a.size, wdt, ldt, a.reps)
        name = lambda t: str(t).removeprefix("torch.")  # noqa: E731
        print(f"{name(wdt):>8} {name(ldt):>8} {comp:10.3f} {fused:8.3f} {comp / fused:8.1f}x")


if __name__ == "__main__":
    main()
