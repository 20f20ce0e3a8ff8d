"""Block sparsity on the GPU, side by side in one run (issue 9 targets):

* block-sparse linear, W 8192 x 8192 bf16, 64 x 64 blocks, 75% of blocks empty (random),
  y = x @ W^T for M in --ms: ours (semisparse::bsr_linear) vs cuBLAS dense (F.linear with the
  masked dense weight) vs PyTorch's BSR matmul (torch.sparse._triton_ops.bsr_dense_mm, the
  Triton kernel behind torch's BSR @ dense on CUDA);
* block-sparse attention, B 1, 16 heads, seq --seq, head dim 128, bf16, 128 x 128 blocks,
  90% of blocks empty (random, plus the diagonal): ours (semisparse::block_sparse_attention
  and its backward) vs FlexAttention under torch.compile with the equivalent BlockMask,
  forward and forward + backward (backward = the difference).

Timed with CUDA events after a warm-up, median of --reps. Prints one table; ratio > 1 means
ours is faster.

    python bench/gpu/blocksparse_bench.py [--reps 20] [--ms 512,2048,8192] [--seq 16384]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from semisparse.formats.bsr import BlockSparse
from semisparse.ops import block_attention as ba


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def bench_linear(ms, reps: int) -> None:
    n = k = 8192
    blk = 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    mask = torch.rand(n // blk, k // blk, generator=gen, device="cuda") < 0.25
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16)
    bs = BlockSparse.from_dense(w, (blk, blk), mask)
    dense = bs.to_dense()
    try:
        from torch.sparse._triton_ops import bsr_dense_mm

        w_bsr = dense.to_sparse_bsr((blk, blk))
        peer_err = None
    except Exception as e:  # noqa: BLE001  (say why the peer did not run)
        bsr_dense_mm, peer_err = None, f"{type(e).__name__}: {e}"[:100]
    print(f"# bsr_linear 8192x8192 bf16, 64x64 blocks, density {bs.density:.3f}")
    print(f"{'M':>6} {'dense ms':>9} {'ours ms':>9} {'ours vs dense':>13} {'torch BSR ms':>12} {'ours vs BSR':>11}")
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        t_d = timed(lambda: F.linear(x, dense), reps)
        t_o = timed(lambda: torch.ops.semisparse.bsr_linear(x, bs.values, bs.crow_indices, bs.col_indices, n, None),
                    reps)
        t_p = None
        if bsr_dense_mm is not None:
            xt = x.t().contiguous()
            try:
                t_p = timed(lambda: bsr_dense_mm(w_bsr, xt), reps)
            except Exception as e:  # noqa: BLE001
                peer_err = f"{type(e).__name__}: {e}"[:100]
        tp = f"{t_p:12.3f}" if t_p else f"{'n/a':>12}"
        rp = f"{t_p / t_o:10.2f}x" if t_p else f"{'n/a':>11}"
        print(f"{m:>6} {t_d:9.3f} {t_o:9.3f} {t_d / t_o:12.2f}x {tp} {rp}", flush=True)
    if peer_err:
        print(f"# torch BSR: {peer_err}")


def bench_attention(seq: int, reps: int) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, D, blk = 1, 16, 128, 128
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(B, H, seq, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    nb = seq // blk
    bm = torch.rand(B, H, nb, nb, generator=gen, device="cuda") < 0.1
    bm |= torch.eye(nb, dtype=torch.bool, device="cuda")
    density = bm.float().mean().item()

    def mask_mod(b, h, qi, ki):
        return bm[b, h, qi // blk, ki // blk]

    fbm = create_block_mask(mask_mod, B, H, seq, seq, device="cuda", BLOCK_SIZE=blk)
    flex = torch.compile(flex_attention)
    scale = D ** -0.5
    go = torch.randn_like(q)

    def ours_fwd():
        return ba.block_sparse_attention(q, k, v, bm, (blk, blk), scale)

    def flex_fwd():
        return flex(q, k, v, block_mask=fbm, scale=scale)

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def ours_fb():
        ba.block_sparse_attention(qg, kg, vg, bm, (blk, blk), scale).backward(go)

    def flex_fb():
        flex(qg, kg, vg, block_mask=fbm, scale=scale).backward(go)

    t = {name: timed(fn, reps) for name, fn in
         (("ours fwd", ours_fwd), ("flex fwd", flex_fwd), ("ours f+b", ours_fb), ("flex f+b", flex_fb))}
    print(f"# block_sparse_attention B1 H16 seq {seq} D128 bf16, 128x128 blocks, density {density:.3f}")
    print(f"{'':>10} {'ours ms':>9} {'flex ms':>9} {'flex/ours':>9}")
    print(f"{'forward':>10} {t['ours fwd']:9.3f} {t['flex fwd']:9.3f} {t['flex fwd'] / t['ours fwd']:8.2f}x")
    ob, fb = t["ours f+b"] - t["ours fwd"], t["flex f+b"] - t["flex fwd"]
    print(f"{'backward':>10} {ob:9.3f} {fb:9.3f} {fb / ob:8.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ms", default="512,2048,8192")
    ap.add_argument("--seq", type=int, default=16384)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.reps}")
    bench_linear([int(m) for m in args.ms.split(",")], args.reps)
    bench_attention(args.seq, args.reps)


if __name__ == "__main__":
    main()
