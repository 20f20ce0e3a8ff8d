"""FLoRA vs PEFT LoRA on a small Conv2d CNN, transfer to held-out digit classes (docs/RESULTS.md).

Setup (fixed before any run; not tuned towards a result):

- Data: scikit-learn's digits (1797 8x8 images, bilinear-upsampled to 16x16). Classes 0-4
  (all ~900 images) pretrain the CNN; classes 5-9 are the downstream task, split once
  (fixed permutation, seed 1234) into 250 train / 150 validation / the rest (~496) test.
- Why this task: pretrain-on-some-classes, adapt-to-new-classes is the standard transfer
  setup (a pretrained backbone, a new label space, little downstream data); the new head
  is the same for every method, so the comparison is about how well each adapter
  reshapes the conv features.
- CNN: conv 1->32, conv 32->32, max-pool, conv 32->64, conv 64->64, max-pool (3x3, ReLU,
  no normalisation), global average pool, Linear head. Pretrained 400 steps (AdamW, lr
  3e-3, batch 64, cosine) per seed.
- Adaptation: a fresh 5-class head (same init for every method of a seed) and
  - head-only: only the head trains;
  - LoRA (PEFT): ``LoraConfig(r=4, lora_alpha=8, lora_dropout=0)`` on all four convs,
    the head in ``modules_to_save``;
  - FLoRA: per-conv ranks (r_out, r_in, 2, 2) (spatial rank 2 as in the official example)
    with r chosen so each conv's count is closest to LoRA's, scale 4.0 (official), dropout 0,
    the head in ``modules_to_save``;
  - full fine-tune: everything trains.
  Same optimizer for all: AdamW (weight decay 0), batch 32, 300 steps, 10% linear warmup +
  cosine decay; identical batch order per seed. Each method picks its lr from a grid of 5
  (half-decade steps) by validation accuracy (ties: lower validation loss); the test
  accuracy of that lr is reported. Grids: adapters {1e-3 .. 1e-1}, head-only
  {3e-3 .. 3e-1}, full {1e-4 .. 1e-2} (``--lrs-adapter/--lrs-head/--lrs-full`` override
  them). A first 3-point grid put most chosen lrs at its upper edge (LoRA's most), so the
  grids were widened for every method alike.

    pip install peft scikit-learn   # benchmark only
    PYTHONPATH=python python bench/flora_digits.py --seeds 0,1,2 [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from semisparse.flora import FLoRAConfig, get_flora_model
from torch import nn

LORA_R, LORA_ALPHA = 4, 8
FLORA_SCALE = 4.0
GRIDS = {
    "head-only": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    "LoRA": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "FLoRA": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "full": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
}
CONVS = ["conv1", "conv2", "conv3", "conv4"]


def load_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    pre = y < 5
    xp, yp = x[pre], y[pre]
    xd, yd = x[~pre], y[~pre] - 5
    perm = torch.randperm(len(yd), generator=torch.Generator().manual_seed(1234))
    tr, va, te = perm[:250], perm[250:400], perm[400:]
    return (xp, yp), (xd[tr], yd[tr]), (xd[va], yd[va]), (xd[te], yd[te])


class CNN(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        return self.head(x.mean((2, 3)))


def train(model, x, y, steps, lr, seed, batch):
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


# ---------------------------------------------------------------------- parameter matching
def lora_count(shape) -> int:
    out, inn = shape[0], shape[1] * shape[2] * shape[3]
    return LORA_R * inn + out * LORA_R


def flora_count(shape, ranks) -> int:
    return math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))


def matched_ranks(shape) -> tuple[int, ...]:
    target = lora_count(shape)
    best = None
    for r in range(1, max(shape[0], shape[1]) + 1):
        ranks = (min(r, shape[0]), min(r, shape[1]), min(2, shape[2]), min(2, shape[3]))
        err = abs(flora_count(shape, ranks) - target)
        if best is None or err < best[0]:
            best = (err, ranks)
    return best[1]


def adapt_model(method, pretrained, head_seed):
    base = copy.deepcopy(pretrained)
    torch.manual_seed(head_seed)
    base.head = nn.Linear(64, 5)
    torch.manual_seed(head_seed + 1)  # adapter init
    if method == "full":
        return base
    if method == "head-only":
        for n, p in base.named_parameters():
            p.requires_grad_(n.startswith("head."))
        return base
    if method == "LoRA":
        import peft

        cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=CONVS,
                              modules_to_save=["head"])
        return peft.get_peft_model(base, cfg)
    if method == "FLoRA":
        pattern = {f"^{n}$": matched_ranks(tuple(getattr(base, n).weight.shape)) for n in CONVS}
        cfg = FLoRAConfig(ranks=1, scale=FLORA_SCALE, dropout=0.0, target_modules=CONVS, modules_to_save=["head"],
                          rank_pattern=pattern)
        return get_flora_model(base, cfg)
    raise ValueError(method)


def n_trainable(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pre-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", default="head-only,LoRA,FLoRA,full")
    ap.add_argument("--verbose", action="store_true", help="print validation/test accuracy of every lr")
    ap.add_argument("--lrs-adapter", help="comma list; overrides the LoRA and FLoRA grid")
    ap.add_argument("--lrs-head", help="comma list; overrides the head-only grid")
    ap.add_argument("--lrs-full", help="comma list; overrides the full fine-tune grid")
    args = ap.parse_args()
    for opt, keys in (("lrs_adapter", ("LoRA", "FLoRA")), ("lrs_head", ("head-only",)), ("lrs_full", ("full",))):
        if getattr(args, opt):
            for k in keys:
                GRIDS[k] = tuple(float(v) for v in getattr(args, opt).split(","))
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    (xp, yp), (xtr, ytr), (xva, yva), (xte, yte) = load_data()
    print(f"torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()}")
    print(f"pretrain: classes 0-4, {len(yp)} images; downstream classes 5-9: train {len(ytr)}, "
          f"val {len(yva)}, test {len(yte)} (16x16)")
    print("lr grids: " + ", ".join(f"{m} {list(GRIDS[m])}" for m in methods))
    shapes = {n: tuple(getattr(CNN(), n).weight.shape) for n in CONVS}
    print("per-conv parameters, LoRA r=4 vs FLoRA ranks:")
    for n, s in shapes.items():
        r = matched_ranks(s)
        print(f"  {n}: {s}  LoRA {lora_count(s):,d}  FLoRA {r} {flora_count(s, r):,d}")
    t_start = time.time()
    acc = {m: {} for m in methods}
    chosen = {m: {} for m in methods}
    counts = {}
    for seed in seeds:
        torch.manual_seed(seed)
        pre = CNN()
        train(pre, xp, yp, args.pre_steps, 3e-3, seed=10_000 + seed, batch=64)
        pre_acc, _ = evaluate(pre, xp, yp)
        for method in methods:
            best = None
            for lr in GRIDS[method]:
                m = adapt_model(method, pre, head_seed=1000 + seed)
                counts[method] = n_trainable(m)
                train(m, xtr, ytr, args.steps, lr, seed=20_000 + seed, batch=args.batch)
                va_acc, va_loss = evaluate(m, xva, yva)
                te_acc, _ = evaluate(m, xte, yte)
                if args.verbose:
                    print(f"  seed {seed} {method:9s} lr {lr:<7g} val {va_acc:.4f} (loss {va_loss:.3f}) test {te_acc:.4f}",
                          flush=True)
                key = (va_acc, -va_loss)
                if best is None or key > best[0]:
                    best = (key, lr, te_acc)
            acc[method][seed] = best[2]
            chosen[method][seed] = best[1]
        print(f"seed {seed}: pretrain train-acc {pre_acc:.3f}; " +
              ", ".join(f"{m} {acc[m][seed]:.4f} (lr {chosen[m][seed]:g})" for m in methods) +
              f"  [{time.time() - t_start:.0f} s]", flush=True)

    print("\ntrainable parameters (incl. the 325-parameter head): " +
          ", ".join(f"{m} {counts[m]:,d}" for m in methods))
    print("\ntest accuracy on classes 5-9 (lr chosen per seed on validation)")
    print(f"{'method':10s} {'params':>8s} " + " ".join(f"{'seed ' + str(s):>8s}" for s in seeds) +
          f" {'mean':>8s} {'std':>7s}  chosen lr")
    for m in methods:
        v = [acc[m][s] for s in seeds]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{m:10s} {counts[m]:8,d} " + " ".join(f"{a:8.4f}" for a in v) + f" {statistics.mean(v):8.4f} "
              f"{sd:7.4f}  " + ",".join(f"{chosen[m][s]:g}" for s in seeds))
    print(f"\ntotal time {time.time() - t_start:.0f} s, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
