"""CPU block-sparse linear benchmark: semisparse bsr_linear vs dense F.linear vs torch BSR
(``w.to_sparse_bsr(block)`` + ``F.linear``), measured round-robin in one process.

    SEMISPARSE_LIB_DIR=build/dev PYTHONPATH=python python bench/bsr_linear.py
    ... --n 4096 --k 4096 --block 32 --sparsity 0.75 0.5 --m 1 8 64 512 --reps 15
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import semisparse  # noqa: F401  (loads the native library)
import semisparse.ops.bsr  # noqa: F401  (defines the ops)
from semisparse.formats.bsr import BlockSparse

from _timing import round_robin_medians


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--block", type=int, nargs="+", default=[32])
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.75, 0.5])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--isa", default=None, help="force a CPU path (scalar, avx2_fma, avx512_bf16)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        semisparse.set_cpu_isa(args.isa)
    block = tuple(args.block * 2)[:2] if len(args.block) == 1 else tuple(args.block[:2])
    torch.manual_seed(0)
    print(f"# {args.n}x{args.k} fp32, block {block}, threads {torch.get_num_threads()}, "
          f"isa {semisparse.cpu_isa()}, median of {args.reps} round-robin rounds (ms)")
    print(f"{'sparsity':>8} {'M':>5} {'dense':>9} {'torchBSR':>9} {'ours':>9} {'x dense':>8} {'x tBSR':>8}")
    for sp in args.sparsity:
        w = torch.randn(args.n, args.k)
        bs = BlockSparse.from_dense(w, block, sp)
        wd = bs.to_dense()
        wt = wd.to_sparse_bsr(block)
        for m in args.m:
            x = torch.randn(m, args.k)
            fns = {
                "dense": lambda: F.linear(x, wd),
                "tbsr": lambda: F.linear(x, wt),
                "ours": lambda: bs.linear(x),
            }
            ref = fns["dense"]()
            for name in ("tbsr", "ours"):
                err = (fns[name]() - ref).abs().max().item()
                assert err < 1e-2 * (1 + ref.abs().max().item()), (name, err)
            med = round_robin_medians(fns, args.reps)
            print(f"{sp:>8.2f} {m:>5} {med['dense']:>9.3f} {med['tbsr']:>9.3f} {med['ours']:>9.3f} "
                  f"{med['dense'] / med['ours']:>8.2f} {med['tbsr'] / med['ours']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
