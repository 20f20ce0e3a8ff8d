"""Block-sparse attention on the CPU: semisparse vs SDPA (dense bool mask) vs FlexAttention
(BlockMask from create_block_mask, under torch.compile).

Default problem (the issue's): batch 1, seq 4096, 8 heads, head dim 64, 64x64 blocks,
~90% of the blocks empty (random + diagonal), fp32. Forward and forward+backward, median
ms over round-robin repetitions in one process (the machine is noisy: the three
implementations alternate so drifts hit all of them alike).

    SEMISPARSE_LIB_DIR=build/dev PYTHONPATH=python python bench/block_attention.py [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import semisparse.ops  # noqa: F401  (loads the native library)
import torch
import torch.nn.functional as F
from semisparse.ops.block_attention import BlockMasks, block_sparse_attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.09, help="random blocks (the diagonal is added)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()

    L, H, D, blk = args.seq, args.heads, args.dim, args.block
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D) for _ in range(3))
    nb = -(-L // blk)
    bm = BlockMasks.random(L, L, args.density, seed=0, block=(blk, blk), heads=H) | torch.eye(nb, dtype=torch.bool)
    density = bm.float().mean().item()
    scale = D**-0.5
    dense = BlockMasks.to_dense(bm, L, L, (blk, blk))

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        return bm[0, h, qi // blk, ki // blk]

    flex_bm = create_block_mask(mask_mod, 1, H, L, L, device="cpu", BLOCK_SIZE=blk)
    flex = torch.compile(flex_attention, fullgraph=True)

    fwd = {
        "semisparse": lambda q, k, v: block_sparse_attention(q, k, v, bm, (blk, blk), scale=scale),
        "flex": lambda q, k, v: flex(q, k, v, block_mask=flex_bm, scale=scale),
    }
    if not args.no_sdpa:
        fwd["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)

    # correctness on this problem (every row has its diagonal block: no empty rows)
    ref = fwd["flex"](q, k, v)
    got = fwd["semisparse"](q, k, v)
    err = (got - ref).abs().max().item()

    def time_fwd(f):
        with torch.no_grad():
            t = time.perf_counter()
            f(q, k, v)
            return time.perf_counter() - t

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    go = torch.randn(1, H, L, D)

    def time_fwd_bwd(f):
        for t in (qg, kg, vg):
            t.grad = None
        t = time.perf_counter()
        out = f(qg, kg, vg)
        out.backward(go)
        return time.perf_counter() - t

    names = list(fwd)
    res_f = {n: [] for n in names}
    res_b = {n: [] for n in names}
    no_bwd = {}
    for n in names:  # warm-up (compiles flex)
        time_fwd(fwd[n])
        if not args.no_backward:
            try:
                time_fwd_bwd(fwd[n])
            except (NotImplementedError, RuntimeError) as e:  # FlexAttention: no CPU backward (torch 2.13)
                no_bwd[n] = str(e).strip().splitlines()[0][:120]
    for _ in range(args.reps):
        for n in names:
            res_f[n].append(time_fwd(fwd[n]))
            if not args.no_backward and n not in no_bwd:
                res_b[n].append(time_fwd_bwd(fwd[n]))

    print(
        f"seq {L}, heads {H}, head dim {D}, blocks {blk}x{blk}, block density {density:.3f}, fp32, "
        f"threads {torch.get_num_threads()}, max |ours - flex| = {err:.2e}"
    )
    med_f = {n: statistics.median(r) * 1e3 for n, r in res_f.items()}
    print("forward (median ms):  " + "  ".join(f"{n} {t:.1f}" for n, t in med_f.items()))
    print(
        "  speed-up of semisparse: "
        + "  ".join(f"vs {n} {med_f[n] / med_f['semisparse']:.2f}x" for n in names if n != "semisparse")
    )
    if not args.no_backward:
        med_b = {n: statistics.median(r) * 1e3 for n, r in res_b.items() if r}
        print("forward+backward (median ms):  " + "  ".join(f"{n} {t:.1f}" for n, t in med_b.items()))
        print(
            "  speed-up of semisparse: "
            + "  ".join(f"vs {n} {med_b[n] / med_b['semisparse']:.2f}x" for n in med_b if n != "semisparse")
        )
        for n, why in no_bwd.items():
            print(f"  {n}: no backward here ({why})")


if __name__ == "__main__":
    main()
