"""SparseGPT pruning throughput on a Llama-config model (random weights: throughput does
not depend on them): wall time and peak memory (max RSS) against the model's size.

    python bench/prune_throughput.py                       # hidden 1024, 8 layers, 128 x 512 tokens
    python bench/prune_throughput.py --method wanda --layers 2 --nsamples 16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import transformers

    import semisparse

    torch.manual_seed(a.seed)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, max_position_embeddings=a.seqlen)
    model = transformers.LlamaForCausalLM(cfg).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = torch.randint(0, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(a.seed))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    masks = semisparse.prune(model, a.method, pattern=a.pattern, calib=calib)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{a.method} {a.pattern}: Llama hidden {a.hidden}, ffn {a.ffn}, {a.layers} layers "
          f"({size / 2**20:.0f} MiB fp32), {len(masks)} layers pruned, {a.nsamples} x {a.seqlen} calibration tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"wall {wall:.1f} s | peak RSS {peak / 2**30:.2f} GiB (model {size / 2**30:.2f} GiB; "
          f"before pruning {rss0 / 2**30:.2f} GiB) | peak - model {(peak - size) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
