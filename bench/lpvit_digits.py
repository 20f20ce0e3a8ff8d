"""LPViT vs uniform block sparsity on a small ViT trained on scikit-learn's digits (docs/RESULTS.md).

A ViT (Hugging Face ViTForImageClassification from a config: 16x16 inputs = the 8x8 digits
upsampled, patch 4, hidden 64, 4 layers, 4 heads, MLP 256) is trained briefly on 1297
digits; then pruned in 16x16 blocks to a FLOPs target with LPViT's allocation and with
uniform per-layer block sparsity at the same FLOPs (same block scores), and both are
fine-tuned with fixed masks for the same steps through ``lpvit.finetune`` (the shared
``semisparse.train`` loop): cross-entropy alone, and cross-entropy + distillation from the
dense model (``--distill``, T=2). Test accuracy on the other 500 digits, before and after.

    pip install scikit-learn
    python bench/lpvit_digits.py --seeds 0,1,2 [--flops 0.5] [--power analytical]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
import torch.nn.functional as F

from semisparse import lpvit
from semisparse.train import TrainConfig


def digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # one fixed split
    tr, te = perm[:1297], perm[1297:]
    return x[tr], y[tr], x[te], y[te]


def make_vit(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=256, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return ViTForImageClassification(cfg)


def train(model, x, y, steps: int, lr: float, seed: int, batch: int = 64, hooks=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(pixel_values=x).logits.argmax(-1) == y).float().mean())


def finetune(model, rep, x, y, steps: int, seed: int, teacher=None, distill: float = 0.0, batch: int = 64):
    """The fine-tune stage through lpvit.finetune: AdamW lr 5e-4 (10% warmup, cosine), clip 1."""

    def data(i: int):  # index -> batch: random batches, a pure function of the index
        idx = torch.randint(0, len(y), (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
        return {"pixel_values": x[idx], "labels": y[idx]}

    cfg = TrainConfig(steps=steps, lr=5e-4, min_lr=0.0, warmup_steps=max(1, steps // 10), weight_decay=0.05,
                      betas=(0.9, 0.999), seed=seed, progress=False, distributed="none", log_every=steps)
    lpvit.finetune(model, data, cfg, report=rep, teacher=teacher, distill=distill, temperature=2.0)
    model.eval()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--block", default="16x16")
    p.add_argument("--power", default=None, choices=["analytical", "measured"], help="the hardware term (default none)")
    p.add_argument("--distill", type=float, default=0.5, help="weight of the distillation term in the 2nd fine-tune")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        xtr, ytr, xte, yte = digits(seed)
        dense = train(make_vit(seed), xtr, ytr, a.train_steps, 2e-3, seed)
        row = {"seed": seed, "dense": accuracy(dense, xte, yte)}
        g = torch.Generator().manual_seed(seed + 7)
        calib = [xtr[torch.randint(0, len(ytr), (64,), generator=g)] for _ in range(8)]  # images only, no labels
        for alloc in ("lpvit", "uniform"):
            m = copy.deepcopy(dense)
            rep = lpvit.prune(m, [{"pixel_values": c} for c in calib], block=a.block, flops=a.flops,
                              power=a.power if alloc == "lpvit" else None, exclude=["classifier"], allocation=alloc)
            row[f"{alloc}_kept_flops"] = rep.kept_flops
            row[f"{alloc}"] = accuracy(m, xte, yte)
            pruned = copy.deepcopy(m)
            finetune(m, rep, xtr, ytr, a.finetune_steps, seed + 1)
            row[f"{alloc}_ft"] = accuracy(m, xte, yte)
            finetune(pruned, rep, xtr, ytr, a.finetune_steps, seed + 1, teacher=dense, distill=a.distill)
            row[f"{alloc}_kd"] = accuracy(pruned, xte, yte)
            if alloc == "lpvit":
                row["lpvit_sparsity"] = {r.name: round(r.sparsity, 3) for r in rep.layers}
        rows.append(row)
        print(f"seed {seed}: dense {row['dense']:.4f} | LPViT {row['lpvit']:.4f} -> {row['lpvit_ft']:.4f} / KD "
              f"{row['lpvit_kd']:.4f} (kept FLOPs {row['lpvit_kept_flops']:.4f}) | uniform {row['uniform']:.4f} -> "
              f"{row['uniform_ft']:.4f} / KD {row['uniform_kd']:.4f} (kept FLOPs {row['uniform_kept_flops']:.4f})",
              flush=True)
    def mean(k):
        return sum(r[k] for r in rows) / len(rows)

    print(f"\ntest accuracy at {a.flops:.0%} of the prunable layers' FLOPs, {a.block} blocks, mean of {len(rows)} seeds")
    print(f"{'':>10} {'pruned':>8} {'+ fine-tune':>12} {'+ fine-tune w/ KD':>18}")
    print(f"{'dense':>10} {mean('dense'):8.4f}")
    for alloc in ("lpvit", "uniform"):
        print(f"{alloc:>10} {mean(alloc):8.4f} {mean(alloc + '_ft'):12.4f} {mean(alloc + '_kd'):18.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
