"""FLoRA vs PEFT LoRA step time at equal trainable parameters (CPU, side by side).

Two small models, each adapted twice from the same frozen base:

- ``convnet``: a stem Conv2d 3->64 (frozen, not adapted), then four 3x3 convs 64->64,
  64->128 (stride 2), 128->128, 128->128 (the targets), global average pool, Linear head
  (10 classes, trained in both: ``modules_to_save``); 32x32 inputs, batch 32.
- ``bert``: Hugging Face ``BertForSequenceClassification`` from a config (hidden 256,
  4 layers, 4 heads, MLP 1024, no dropout), seq 128, batch 16; targets ``query``,
  ``key``, ``value`` and the ``dense`` Linears of every layer (attention output, MLP in,
  MLP out; not the pooler); the classifier trains in both (``modules_to_save``).

LoRA: ``peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0)``. FLoRA: per-target ranks
chosen to match LoRA's per-layer parameter count (convs: ranks (r, r, 2, 2) as in the
official example; Linears: (r, r)), scale 4.0, dropout 0 (forward_mode "auto" -> fused).
Both counts are printed.

Timed, round robin (LoRA, FLoRA, LoRA, ...), median over ``--reps`` after warmup:

- train: ``zero_grad``, forward, cross-entropy, backward, ``AdamW.step``;
- infer: eval forward under ``torch.inference_mode`` (adapters unmerged);
- merged: the same after ``merge_and_unload()`` (both are then the plain base model, so
  this row's ratio shows the measurement noise).

The table gives the median ratio and, as a check on a loaded machine, the ratio of the
fastest repetitions ("min ratio").

    pip install peft   # benchmark only; not a dependency of semisparse
    PYTHONPATH=python python bench/flora_speed.py [--reps 30] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F
from semisparse.flora import FLoRAConfig, get_flora_model
from torch import nn

LORA_R = 8
LORA_ALPHA = 16
FLORA_SCALE = 4.0


# ---------------------------------------------------------------------- models
class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.conv1 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, padding=1)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        for c in (self.stem, self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(c(x))
        return self.head(x.mean((2, 3)))


CONV_TARGETS = ["conv1", "conv2", "conv3", "conv4"]
BERT_TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]  # not pooler.dense


def build_convnet(quick: bool):
    torch.manual_seed(0)
    model = ConvNet()
    b = 8 if quick else 32
    x = torch.randn(b, 3, 32, 32)
    y = torch.randint(0, 10, (b,))
    return model, CONV_TARGETS, (lambda m: F.cross_entropy(m(x), y)), (lambda m: m(x))


def build_bert(quick: bool):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=1024, max_position_embeddings=128, num_labels=4,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    b, s = (4, 32) if quick else (16, 128)
    ids = torch.randint(0, 1000, (b, s))
    y = torch.randint(0, 4, (b,))

    def logits(m):
        return m(input_ids=ids).logits

    return model, BERT_TARGETS, (lambda m: F.cross_entropy(logits(m), y)), logits


# ---------------------------------------------------------------------- adapters
def lora_params(w_shape) -> int:
    out, inn = w_shape[0], 1
    for d in w_shape[1:]:
        inn *= d
    if len(w_shape) == 2:
        return LORA_R * (w_shape[0] + w_shape[1])
    # PEFT Conv2d LoRA: A = conv in->r with the full kernel, B = 1x1 conv r->out
    return LORA_R * inn + out * LORA_R


def flora_params(w_shape, ranks) -> int:
    n = 1
    for r in ranks:
        n *= r
    return n + sum(d * r for d, r in zip(w_shape, ranks))


def matched_ranks(w_shape) -> tuple[int, ...]:
    """FLoRA ranks whose count is closest to LoRA's for this weight: (r, r) for a Linear,
    (r, r, 2, 2) for a 3x3 conv (the official example's spatial rank)."""
    target = lora_params(w_shape)
    tail = tuple(min(2, d) for d in w_shape[2:])
    best = None
    for r in range(1, min(w_shape[0], w_shape[1]) + 1):
        ranks = (r, r) + tail
        err = abs(flora_params(w_shape, ranks) - target)
        if best is None or err < best[0]:
            best = (err, ranks)
    return best[1]


def target_modules(model, targets):
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets)}


DROPOUT = 0.0  # --dropout: the adapters' input dropout, the same for both


def make_lora(base, targets, save):
    import peft

    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=DROPOUT, target_modules=targets,
                          modules_to_save=save)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def make_flora(base, targets, save):
    pattern = {"^" + n.replace(".", r"\.") + "$": matched_ranks(tuple(m.weight.shape))
               for n, m in target_modules(base, targets).items()}
    cfg = FLoRAConfig(ranks=1, scale=FLORA_SCALE, dropout=DROPOUT, target_modules=targets, modules_to_save=save,
                      rank_pattern=pattern)
    return get_flora_model(copy.deepcopy(base), cfg)


def n_trainable(m) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- timing
def round_robin(fns: dict, reps: int, warmup: int) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def train_step_fn(model, loss_fn):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        opt.step()

    return step


def infer_fn(model, fwd):
    def run():
        with torch.inference_mode():
            fwd(model)

    return run


def bench_model(name, builder, args, extra_variants=None):
    """Returns rows {variant: {"params", "train", "infer", "merged"}}. ``extra_variants``
    maps a name to ``f(base, targets, save) -> adapted model`` (local experiments)."""
    base, targets, loss_fn, fwd = builder(args.quick)
    save = ["head"] if name == "convnet" else ["classifier"]
    makers = {"LoRA": make_lora, "FLoRA": make_flora}
    makers.update(extra_variants or {})
    models = {k: f(base, targets, save) for k, f in makers.items()}
    # both start from dW = 0: put the adapters somewhere non-trivial for the merge timing
    torch.manual_seed(1)
    for m in models.values():
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.requires_grad and ("lora_B" in n or "flora_core" in n):
                    p.normal_(0, 1e-3)
    params = {k: n_trainable(m) for k, m in models.items()}
    train = round_robin({k: train_step_fn(m, loss_fn) for k, m in models.items()}, args.reps, args.warmup)
    for m in models.values():
        m.eval()
    infer = round_robin({k: infer_fn(m, fwd) for k, m in models.items()}, args.reps, args.warmup)
    merged_models = {k: m.merge_and_unload() for k, m in models.items()}
    for m in merged_models.values():
        m.eval()
    merged = round_robin({k: infer_fn(m, fwd) for k, m in merged_models.items()}, args.reps, args.warmup)
    out = {}
    for k in models:
        out[k] = {"params": params[k]}
        for mode, res in (("train", train), ("infer", infer), ("merged", merged)):
            out[k][mode], out[k][mode + "_min"] = res[k]
    return out


def print_table(results: dict) -> None:
    print()
    print(f"{'model':8s} {'LoRA params':>11s} {'FLoRA params':>12s} {'mode':>6s} {'LoRA ms':>8s} {'FLoRA ms':>8s} "
          f"{'FLoRA/LoRA':>10s} {'min ratio':>9s}")
    for name, rows in results.items():
        lo, fl = rows["LoRA"], rows["FLoRA"]
        for mode in ("train", "infer", "merged"):
            print(f"{name:8s} {lo['params']:11,d} {fl['params']:12,d} {mode:>6s} {lo[mode]:8.2f} {fl[mode]:8.2f} "
                  f"{fl[mode] / lo[mode]:10.3f} {fl[mode + '_min'] / lo[mode + '_min']:9.3f}"
                  + ("  (target <= 1.15)" if mode == "train" else ""))
        for k, r in rows.items():
            if k not in ("LoRA", "FLoRA"):
                print(f"{name:8s} {'':11s} {r['params']:12,d} {'':6s} {k}: train {r['train']:.2f} ms "
                      f"({r['train'] / lo['train']:.3f}x LoRA; min {r['train_min'] / lo['train_min']:.3f}x), infer {r['infer']:.2f} ms, merged {r['merged']:.2f} ms")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps (smoke test)")
    ap.add_argument("--models", default="convnet,bert")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="adapter input dropout for both (FLoRA then trains on its factored path)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 3, 1
    return args


def main(argv=None, extra_variants=None):
    global DROPOUT
    args = parse_args(argv)
    DROPOUT = args.dropout
    torch.set_num_threads(args.threads)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    print(f"torch {torch.__version__}, threads {args.threads}, reps {args.reps} (median), warmup {args.warmup}, "
          f"adapter dropout {DROPOUT}, load average before {load}")
    try:
        import peft

        print(f"peft {peft.__version__}")
    except ImportError:
        raise SystemExit("this benchmark needs PEFT: pip install peft")
    builders = {"convnet": build_convnet, "bert": build_bert}
    results = {}
    for name in args.models.split(","):
        base, targets, _, _ = builders[name](args.quick)
        print(f"\n{name}: FLoRA ranks per target (LoRA r={LORA_R} params -> FLoRA params)")
        for n, m in target_modules(base, targets).items():
            s = tuple(m.weight.shape)
            r = matched_ranks(s)
            print(f"  {n:40s} {s!s:18s} {r!s:14s} {lora_params(s):7,d} -> {flora_params(s, r):7,d}")
        results[name] = bench_model(name, builders[name], args, extra_variants)
    print_table(results)
    try:
        print(f"\nload average after {os.getloadavg()}")
    except OSError:
        pass
    return results


if __name__ == "__main__":
    main()
