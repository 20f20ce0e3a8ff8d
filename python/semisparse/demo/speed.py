"""`semisparse bench --model`: a LLaMA-shaped decoder (random weights) made 2:4 sparse with
``sparsify``, timed and measured against its dense self on this machine."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..sparsify import sparsify

__all__ = ["TinyDecoder", "run_demo"]


class _Block(nn.Module):
    def __init__(self, d: int, f: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyDecoder(nn.Module):
    """Embedding, ``layers`` pre-norm blocks (attention + SwiGLU MLP), final norm.
    The LM head is left out: the demo measures the blocks."""

    def __init__(self, d: int = 1024, f: int = 2816, layers: int = 4, heads: int = 16, vocab: int = 1000):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d, f, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)

    def forward(self, ids):
        x = self.embed(ids)
        for blk in self.layers:
            x = blk(x)
        return self.norm(x)


def median_ms(fn, reps: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if not n.startswith("embed"))


def run_demo(d: int = 1024, f: int = 2816, layers: int = 4, heads: int = 16, tokens=(1, 64), dtype=torch.float32,
             reps: int = 5, seed: int = 0, out=print) -> dict:
    torch.manual_seed(seed)
    model = TinyDecoder(d, f, layers, heads).to(dtype).eval()
    out(f"model: TinyDecoder d={d} ffn={f} layers={layers} dtype={str(dtype).removeprefix('torch.')} "
        f"(random weights, seed {seed}); threads={torch.get_num_threads()}")
    inputs = {t: torch.randint(0, 1000, (1, t)) for t in tokens}
    with torch.inference_mode():
        dense_ms = {t: median_ms(lambda: model(inputs[t]), reps) for t in tokens}
        ref = {t: model(inputs[t]).float() for t in tokens}
    dense_bytes = _weight_bytes(model)

    t0 = time.perf_counter()
    report = sparsify(model)
    t_sparsify = time.perf_counter() - t0
    out(str(report))
    out(f"sparsify took {t_sparsify:.2f} s")
    sparse_bytes = _weight_bytes(model)
    with torch.inference_mode():
        sparse_ms = {t: median_ms(lambda: model(inputs[t]), reps) for t in tokens}
        cos = {t: F.cosine_similarity(model(inputs[t]).float().flatten(), ref[t].flatten(), dim=0).item() for t in tokens}

    out("")
    out(f"{'tokens':>6} {'dense ms':>10} {'2:4 ms':>10} {'speedup':>8} {'cos(out)':>9}")
    for t in tokens:
        out(f"{t:>6} {dense_ms[t]:10.2f} {sparse_ms[t]:10.2f} {dense_ms[t] / sparse_ms[t]:7.2f}x {cos[t]:9.4f}")
    out(f"block weights: {dense_bytes / 2**20:.1f} MiB dense -> {sparse_bytes / 2**20:.1f} MiB 2:4 "
        f"({sparse_bytes / dense_bytes:.3f}x)")
    out("cos(out): cosine similarity of the final hidden states to the dense model's; magnitude pruning "
        "of random weights, no calibration (calibrated pruning is a later milestone).")
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "cosine": cos, "dense_bytes": dense_bytes,
            "sparse_bytes": sparse_bytes, "swapped": len(report.swapped)}
