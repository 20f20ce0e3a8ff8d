"""CPU 2:4 linear benchmark (`semisparse bench`, `python bench/sparse24_cpu.py`): dense
F.linear, torch CSR (50% unstructured) and semisparse, measured side by side in one run.
Prints one table of median times and ratios to the dense fp32 F.linear of the same shape
and M.

    semisparse bench                 # the full table (docs/BENCHMARKS.md)
    semisparse bench --quick         # one small shape, few repeats
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import semisparse as ss


def time_together(fns: dict, min_reps: int, min_time: float) -> dict:
    """Median seconds of each callable, run round-robin (one call of each per round) so
    that a noisy machine affects all of them alike."""
    for f in fns.values():
        f()  # warm-up
    times = {k: [] for k in fns}
    t_end = time.perf_counter() + min_time * len(fns)
    rounds = 0
    while rounds < min_reps or time.perf_counter() < t_end:
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= 200:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="NxK weight shapes (out x in)")
    ap.add_argument("--m", default="1,8,64,512", help="rows of x")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=7, help="minimum repeats per measurement")
    ap.add_argument("--min-time", type=float, default=0.5, help="minimum seconds per measurement")
    ap.add_argument("--no-csr", action="store_true", help="skip torch CSR (slow at large M)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="256x512 weight, M in 1,8, few repeats")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(a: argparse.Namespace) -> int:
    if a.quick:
        a.shapes, a.m, a.reps, a.min_time = "256x512", "1,8", 3, 0.05
    if a.threads:
        torch.set_num_threads(a.threads)
    dts = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ms = [int(v) for v in a.m.split(",")]

    print(f"semisparse {ss.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"cpu {platform.processor() or platform.machine()} | simd {ss.cpu_isa()}")
    print("times: median ms, candidates run round-robin; ratios: dense fp32 F.linear time / this time (higher is faster)")
    print("dense = F.linear in the row's dtype; CSR = torch.mm on a 50% unstructured CSR weight (fp32 only);")
    print("'vs dense' = dense in the row's dtype / ours")
    hdr = (f"{'weight':>11} {'M':>4} {'dense fp32':>11} | {'dtype':>5} {'dense':>8} {'CSR 50%':>8} {'2:4 ours':>9} | "
           f"{'x dense':>7} {'x CSR':>6} {'x ours':>7} {'vs dense':>8}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w32 = torch.randn(n, k, generator=g)
        w24 = w32 * ss.nm_mask(w32.abs(), 2, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
            wcsr = (w32 * (torch.rand(n, k, generator=g) >= 0.5)).to_sparse_csr()
        for m in ms:
            x32 = torch.randn(m, k, generator=g)
            for dname in a.dtypes.split(","):
                dt = dts[dname]
                x = x32.to(dt)
                w = w24.to(dt)
                wd = w32.to(dt)
                sp = ss.Sparse24.from_dense(w)
                fns = {"dense32": lambda: F.linear(x32, w32), "ours": lambda: ss.ops.sparse24_linear(x, sp.values, sp.meta)}
                if dt != torch.float32:
                    fns["dense"] = lambda: F.linear(x, wd)
                if not a.no_csr and dt == torch.float32:
                    fns["csr"] = lambda: torch.mm(wcsr, x.t()).t()
                t = time_together(fns, a.reps, a.min_time)
                t_dense32, t_ours = t["dense32"], t["ours"]
                t_dense = t.get("dense", t_dense32)
                t_csr = t.get("csr")
                row = dict(n=n, k=k, m=m, dtype=dname, dense_fp32_ms=t_dense32 * 1e3, dense_ms=t_dense * 1e3,
                           csr_ms=None if t_csr is None else t_csr * 1e3, ours_ms=t_ours * 1e3,
                           ratio_dense=t_dense32 / t_dense, ratio_csr=None if t_csr is None else t_dense32 / t_csr,
                           ratio_ours=t_dense32 / t_ours, ours_vs_dense_same_dtype=t_dense / t_ours)
                rows.append(row)
                csr_s = "-" if t_csr is None else f"{t_csr * 1e3:8.2f}"
                rcsr = "-" if t_csr is None else f"{t_dense32 / t_csr:5.2f}x"
                print(f"{n:>5}x{k:<5} {m:>4} {t_dense32 * 1e3:11.2f} | {dname:>5} {t_dense * 1e3:8.2f} {csr_s:>8} "
                      f"{t_ours * 1e3:9.2f} | {t_dense32 / t_dense:6.2f}x {rcsr:>6} {t_dense32 / t_ours:6.2f}x "
                      f"{t_dense / t_ours:7.2f}x", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
