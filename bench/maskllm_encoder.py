"""MaskLLM with the distillation loss on a BERT-style encoder (docs/RESULTS.md).

Builds a BERT encoder from a config (4 layers, hidden 64), trains it briefly with masked
language modelling on the demo's synthetic language, prunes it at 2:4 with magnitude,
Wanda and SparseGPT, and learns 2:4 masks with MaskLLM using logit distillation from the
dense model (KL, frozen weights, SparseGPT prior). Quality: masked-token perplexity on
held-out sentences (15% of tokens masked at fixed positions).

    python bench/maskllm_encoder.py --seed 0 [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

import semisparse
from semisparse import maskllm
from semisparse.data import calibration_samples
from semisparse.demo.language import generate_corpus, word_tokenizer


def mlm_batch(ids: torch.Tensor, mask_id: int, vocab: int, g: torch.Generator, p: float = 0.15):
    """BERT masking: p of the tokens are targets; of those 80% [MASK], 10% random, 10% kept."""
    target = torch.rand(ids.shape, generator=g) < p
    r = torch.rand(ids.shape, generator=g)
    x = ids.clone()
    x[target & (r < 0.8)] = mask_id
    rnd = target & (r >= 0.8) & (r < 0.9)
    x[rnd] = torch.randint(0, vocab, (int(rnd.sum()),), generator=g)
    labels = torch.where(target, ids, torch.full_like(ids, -100))
    return {"input_ids": x, "labels": labels}


def train_encoder(seed: int, train_ids: torch.Tensor, vocab: int, steps: int = 1500, batch: int = 32, seqlen: int = 64,
                  hidden: int = 64, ffn: int = 256, layers: int = 4, heads: int = 4):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab + 1, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=seqlen, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, tie_word_embeddings=False)
    model = BertForMaskedLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, train_ids.numel() - seqlen, (batch,), generator=g)
        ids = torch.stack([train_ids[s:s + seqlen] for s in start.tolist()])
        loss = model(**mlm_batch(ids, vocab, vocab, g)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    print(f"trained the encoder {steps} steps, last MLM loss {loss.item():.3f}", flush=True)
    return model


@torch.no_grad()
def mlm_perplexity(model, batches) -> float:
    model.eval()
    nll, n = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"]).logits
        sel = b["labels"] != -100
        nll += float(F.cross_entropy(logits[sel].float(), b["labels"][sel], reduction="sum"))
        n += int(sel.sum())
    return math.exp(nll / n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--train-steps", type=int, default=1500, help="MLM pre-training steps of the encoder")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tok = word_tokenizer()
    vocab = len(tok)
    train_text = generate_corpus(30000, seed=a.seed)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    held = torch.tensor(tok(generate_corpus(1500, seed=a.seed + 1_000_003))["input_ids"])
    dense = train_encoder(a.seed, train_ids, vocab, steps=a.train_steps)
    g = torch.Generator().manual_seed(12345)
    n = held.numel() // 64
    test = [mlm_batch(held[i * 64 * 16:(i + 1) * 64 * 16].reshape(-1, 64), vocab, vocab, g) for i in range(n // 16)]
    rows = {"dense": mlm_perplexity(dense, test)}
    calib = calibration_samples(train_text, tok, 64, 64, seed=a.seed)
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(dense)
        semisparse.prune(m, method, pattern="2:4", calib=calib)
        rows[method] = mlm_perplexity(m, test)
        print(f"{method:>10}: {rows[method]:.4f}", flush=True)
    # distillation inputs: training windows corrupted as in MLM (the teacher's outputs are the targets)
    windows = calibration_samples(train_text, tok, 2048, 64, seed=a.seed + 17)
    gd = torch.Generator().manual_seed(a.seed + 29)
    data = []
    for i in range(0, windows.shape[0], a.batch_size):
        b = mlm_batch(windows[i:i + a.batch_size], vocab, vocab, gd)
        data.append({"input_ids": b["input_ids"]})
    m = copy.deepcopy(dense)
    cfg = maskllm.MaskLLMConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, min_lr=a.lr / 100, loss="kl",
                                prior="sparsegpt", prior_nsamples=64, seed=a.seed, progress=False)
    t0 = time.perf_counter()
    res = maskllm.train_masks(m, data, cfg, calib=calib, log=lambda *x: None)
    rows["maskllm (kl)"] = mlm_perplexity(m, test)
    changed = sum(res.changed.values()) / len(res.changed)
    print(f"maskllm (kl): {rows['maskllm (kl)']:.4f} ({time.perf_counter() - t0:.0f} s, {100 * changed:.1f}% groups "
          f"changed vs prior)", flush=True)
    d = rows["dense"]
    print(f"\nmasked-token perplexity at 2:4, BERT encoder seed {a.seed} (MaskLLM: {a.steps} steps x {a.batch_size} x 64, KL)")
    print(f"{'model':>14} {'ppl':>8} {'vs dense':>9}")
    for k, v in rows.items():
        print(f"{k:>14} {v:8.4f} {v / d:8.3f}x")
    gap = rows["sparsegpt"] - d
    if gap > 0:
        print(f"maskllm closes {100 * (rows['sparsegpt'] - rows['maskllm (kl)']) / gap:.0f}% of the SparseGPT-dense gap")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"seed": a.seed, "steps": a.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
