"""Fused Gumbel N:M mask step (MaskLLM) against the composite torch formulation, on the CPU.

One [size, size] fp32 layer, 2:4 (G = size*size/4 groups, logits [G, 6]), one training step
of the mask logits with the weights frozen:

* composite: choices = F.gumbel_softmax(logits * kappa, tau=tau, hard=False);
             mask = choices @ patterns (6x4); wm = W * mask.view_as(W); wm.backward(grad)
* fused:     wm = semisparse.gumbel_nm_masked_weight(W, logits, seed, offset, tau, kappa);
             wm.backward(grad)   (fp32 logits, and bf16 logits)

Times are medians over round-robin repetitions in one process; peak memory is measured for
each variant in its own fresh subprocess (ru_maxrss, and its increase over the RSS right after
the inputs are set up).

    PYTHONPATH=python SEMISPARSE_LIB_DIR=build/dev python bench/gumbel_mask.py [--size 4096] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import semisparse
from semisparse.ops import gumbel as G

TAU, KAPPA, SEED = 0.5, 3.0, 1234
VARIANTS = ("composite", "fused_fp32", "fused_bf16")


def setup(size: int, variant: str):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=gen)  # frozen
    ldt = torch.bfloat16 if variant == "fused_bf16" else torch.float32
    logits = torch.randn(size * size // 4, 6, generator=gen).to(ldt).requires_grad_()
    grad = torch.randn(size, size, generator=gen)
    patterns = G.pattern_table(2, 4)
    return weight, logits, grad, patterns


def step(variant: str, weight, logits, grad, patterns, offset: int) -> tuple[float, float]:
    """One forward + backward; returns (forward s, backward s)."""
    logits.grad = None
    t0 = time.perf_counter()
    if variant == "composite":
        choices = F.gumbel_softmax(logits * KAPPA, tau=TAU, hard=False)
        mask = choices @ patterns
        wm = weight * mask.view_as(weight)
    else:
        wm = G.gumbel_nm_masked_weight(weight, logits, SEED, offset, TAU, KAPPA, 2, 4)
    t1 = time.perf_counter()
    wm.backward(grad)
    t2 = time.perf_counter()
    del wm
    return t1 - t0, t2 - t1


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, size: int, threads: int) -> None:
    torch.set_num_threads(threads)
    args = setup(size, variant)
    base = rss_mib()
    for i in range(2):
        step(variant, *args, offset=i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"variant": variant, "peak_mib": peak, "setup_mib": base, "increase_mib": peak - base}))


def machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.size % 4:
        ap.error("--size must be a multiple of 4")
    if a.child:
        child(a.child, a.size, a.threads)
        return 0

    torch.set_num_threads(a.threads)
    st = semisparse.native_status()["cpu"]
    print(f"machine: {machine()}, {a.threads} threads, torch {torch.__version__}, "
          f"semisparse CPU kernels: {'native ' + semisparse.cpu_isa() if st.loaded else 'NOT loaded (reference)'}")
    print(f"layer {a.size}x{a.size} fp32, 2:4 (G = {a.size * a.size // 4:,} groups, logits [G, 6]), "
          f"tau {TAU}, kappa {KAPPA}, {a.reps} round-robin reps (+1 warm-up)")

    # memory first: ru_maxrss survives exec, so a child started after this process grew
    # would report this process's peak
    mem = {}
    for v in VARIANTS:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", v, "--size", str(a.size), "--threads", str(a.threads)],
            capture_output=True, text=True, check=True,
        ).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])

    states = {v: setup(a.size, v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for r in range(a.reps + 1):
        for v in VARIANTS:
            f, b = step(v, *states[v], offset=r)
            if r:  # the first round warms up (allocator, threads)
                times[v].append((f, b))
    del states

    med = {v: [statistics.median(x[i] for x in times[v]) * 1e3 for i in range(2)] for v in VARIANTS}
    tot = {v: statistics.median((x[0] + x[1]) for x in times[v]) * 1e3 for v in VARIANTS}
    c = "composite"
    print()
    print(f"{'variant':<12} {'fwd ms':>9} {'bwd ms':>9} {'total ms':>9} {'speedup':>8} "
          f"{'peak MiB':>9} {'+setup MiB':>11} {'peak ratio':>10} {'+ ratio':>8}")
    for v in VARIANTS:
        print(f"{v:<12} {med[v][0]:9.1f} {med[v][1]:9.1f} {tot[v]:9.1f} {tot[c] / tot[v]:7.1f}x "
              f"{mem[v]['peak_mib']:9.0f} {mem[v]['increase_mib']:11.0f} "
              f"{mem[v]['peak_mib'] / mem[c]['peak_mib']:10.2f} {mem[v]['increase_mib'] / mem[c]['increase_mib']:8.2f}")
    print("(speedup = composite total / variant total; ratios = variant / composite; "
          "+setup = peak RSS minus RSS after the inputs are set up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
