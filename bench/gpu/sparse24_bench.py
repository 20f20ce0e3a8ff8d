"""2:4 sparse GEMM on the GPU, side by side in one run: ours (semisparse::sparse24_mm in
the device's preferred layout, the kernel picked by shape; on Hopper also the
cutlass_sm80 layout) vs cuBLAS dense (F.linear) vs PyTorch's to_sparse_semi_structured
(cuSPARSELt where available, else its CUTLASS sm8x path). y = x @ W^T + b, bf16 (fp32
accumulation), W [N, K] magnitude-pruned 2:4.

Timed with CUDA events after a warm-up, median of --reps; each variant rotates among 3
independent (x, W) sets so no run reads the previous run's weights from L2 (a 4096 x 4096
bf16 weight fits in the H200's 50 MB L2). Prints one table of times and ratios
(dense / ours: > 1 means ours is faster).

    python bench/gpu/sparse24_bench.py [--reps 20] [--shapes 4096x4096,8192x8192,28672x8192]
                                       [--ms 1,16,128,2048,8192]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from semisparse.formats.sparse24 import Sparse24, nm_mask, preferred_layout


def timed(fn, sets, reps: int) -> float:
    for s in sets:  # warm-up (and any lazy setup)
        fn(*s)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s = sets[i % len(sets)]
        a.record()
        fn(*s)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cusparselt_weight(w):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = False  # cuSPARSELt when this torch has it
    return to_sparse_semi_structured(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shapes", default="4096x4096,8192x8192,28672x8192")
    ap.add_argument("--ms", default="1,16,128,2048,8192")
    args = ap.parse_args()
    dt = torch.bfloat16
    dev = torch.device("cuda")
    cc = torch.cuda.get_device_capability()
    print(f"# {torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]}), torch {torch.__version__}, bf16, "
          f"median of {args.reps}; ratio = dense time / variant time")
    hdr = f"{'N x K':>12} {'M':>5} {'dense ms':>9} {'ours ms':>9} {'ours':>6} {'sm80-layout':>11} {'cuSPARSELt':>10} {'ours/cuSL':>9}"
    print(hdr)
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        layout = preferred_layout(dev, dt, n, k)
        gen = torch.Generator(device=dev).manual_seed(n + k)
        ws = []
        for _ in range(3):
            w = torch.randn(n, k, generator=gen, device=dev, dtype=dt)
            ws.append(w * nm_mask(w.abs(), 2, 4))
        bias = torch.randn(n, device=dev, dtype=dt)
        ours = [Sparse24.from_dense(w, layout=layout) for w in ws]
        alt = [Sparse24.from_dense(w, layout="cutlass_sm80") for w in ws] if layout == "cutlass_sm90" else None
        try:
            csl = [cusparselt_weight(w) for w in ws]
            csl_err = None
        except Exception as e:  # noqa: BLE001  (report why the peer did not run)
            csl, csl_err = None, f"{type(e).__name__}: {e}"[:80]
        for m in (int(v) for v in args.ms.split(",")):
            xs = [torch.randn(m, k, generator=gen, device=dev, dtype=dt) for _ in range(3)]
            t_dense = timed(lambda x, w: F.linear(x, w, bias), list(zip(xs, ws)), args.reps)
            t_ours = timed(lambda x, s: s.matmul_t(x, bias), list(zip(xs, ours)), args.reps)
            t_alt = timed(lambda x, s: s.matmul_t(x, bias), list(zip(xs, alt)), args.reps) if alt else None
            t_csl = None
            if csl is not None:
                try:
                    t_csl = timed(lambda x, w: F.linear(x, w, bias), list(zip(xs, csl)), args.reps)
                except Exception as e:  # noqa: BLE001
                    csl_err = f"{type(e).__name__}: {e}"[:80]
            r = lambda t: f"{t_dense / t:6.2f}x" if t else "   n/a"  # noqa: E731
            vs = f"{t_csl / t_ours:8.2f}x" if t_csl else "      n/a"
            print(f"{shape:>12} {m:>5} {t_dense:9.3f} {t_ours:9.3f} {r(t_ours):>6} {r(t_alt):>11} {r(t_csl):>10} {vs:>9}",
                  flush=True)
        if csl_err:
            print(f"# cuSPARSELt for {shape}: {csl_err}")
        del ws, ours, alt, csl
        torch.cuda.empty_cache()
    print(f"# layout used: {preferred_layout(dev, dt, 8192, 8192)}; SEMISPARSE_SPARSE24_KERNEL="
          f"{os.environ.get('SEMISPARSE_SPARSE24_KERNEL', 'auto')}")


if __name__ == "__main__":
    main()
