"""DSFormer's DenseSparseLinear (W ~ S D, S 2:4-compressed) at a compression ratio vs dense
F.linear and vs a low-rank factorisation (U V) at the same parameter budget, measured
round-robin in one process (inference, fp32).

    SEMISPARSE_LIB_DIR=build/dev PYTHONPATH=python python bench/dsformer_linear.py
    ... --n 4096 --k 4096 --compression 2 --m 1 8 64 --reps 15
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import semisparse  # noqa: F401  (loads the native library)
from semisparse.nn import DenseSparseLinear
from semisparse.nn.dense_sparse_linear import dense_sparse_params, k_for_compression

from _timing import round_robin_medians


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096, help="out features")
    ap.add_argument("--k", type=int, default=4096, help="in features")
    ap.add_argument("--compression", type=float, nargs="+", default=[2.0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_f, in_f = args.n, args.k
    print(f"# {out_f}x{in_f} fp32, threads {torch.get_num_threads()}, isa {semisparse.cpu_isa()}, "
          f"median of {args.reps} round-robin rounds (ms)")
    print(f"{'compr':>5} {'rank k':>6} {'lowrank r':>9} {'M':>4} {'dense':>9} {'lowrank':>9} {'ours':>9} "
          f"{'x dense':>8} {'x lowrank':>9}")
    w = torch.randn(out_f, in_f) / in_f**0.5
    with torch.no_grad():
        for c in args.compression:
            k = k_for_compression(out_f, in_f, c)
            layer = DenseSparseLinear(in_f, out_f, k, bias=False)
            layer.compress()
            layer.eval()
            r = int(out_f * in_f / c) // (out_f + in_f)
            u, v = torch.randn(out_f, r) / r**0.5, torch.randn(r, in_f) / in_f**0.5
            assert dense_sparse_params(out_f, in_f, k) <= out_f * in_f / c and r * (out_f + in_f) <= out_f * in_f / c
            wd = layer.to_dense_weight()
            for m in args.m:
                x = torch.randn(m, in_f)
                fns = {
                    "dense": lambda: F.linear(x, w),
                    "lowrank": lambda: F.linear(F.linear(x, v), u),
                    "ours": lambda: layer(x),
                }
                ref = F.linear(x, wd)
                err = (fns["ours"]() - ref).abs().max().item()
                assert err < 1e-3 * (1 + ref.abs().max().item()), err
                med = round_robin_medians(fns, args.reps)
                print(f"{c:>5.2f} {k:>6} {r:>9} {m:>4} {med['dense']:>9.3f} {med['lowrank']:>9.3f} {med['ours']:>9.3f} "
                      f"{med['dense'] / med['ours']:>8.2f} {med['lowrank'] / med['ours']:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
