"""MaskLLM vs the one-shot methods on the demo model (docs/RESULTS.md).

Trains the `semisparse demo` model (a 4-layer Llama on the synthetic language), prunes it at
2:4 with magnitude, Wanda and SparseGPT, then learns 2:4 masks with MaskLLM (frozen
weights, SparseGPT mask as the prior) and prints held-out perplexities side by side.

    python bench/maskllm_quality.py --seed 0 [--steps 600] [--variants default,bf16,noprior]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import semisparse
from semisparse import maskllm
from semisparse.data import calibration_samples, eval_tokens
from semisparse.demo import DemoConfig, train_demo_model
from semisparse.demo.language import generate_corpus, word_tokenizer
from semisparse.eval import perplexity

VARIANTS = {
    "default": {},
    "bf16": {"logits_dtype": "bfloat16"},
    "noprior": {"prior": None},
    "magprior": {"prior": "magnitude"},
    "noreg": {"reg_lambda": 0.0},
}


def demo_model(seed: int, cache: Path | None):
    cfg = DemoConfig(seed=seed)
    tok = word_tokenizer()
    train_text = generate_corpus(cfg.train_sentences, seed=cfg.seed)
    heldout = generate_corpus(cfg.heldout_sentences, seed=cfg.seed + 1_000_003)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    path = cache / f"demo_seed{seed}" if cache else None
    if path is not None and (path / "config.json").exists():
        model = semisparse.load_pretrained(str(path))
    else:
        model = train_demo_model(cfg, train_ids, len(tok))
        if path is not None:
            semisparse.save_pretrained(model, str(path), overwrite=True)
    model.eval()
    return cfg, tok, train_text, eval_tokens(heldout, tok), model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--nsamples", type=int, default=4096, help="training windows of 64 tokens")
    p.add_argument("--variants", default="default", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--baselines", default="magnitude,wanda,sparsegpt")
    p.add_argument("--cache", default=None, help="folder to keep the trained demo model in between runs")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--set", action="append", default=[], help="extra MaskLLMConfig field=value (JSON value)")
    a = p.parse_args(argv)
    cfg, tok, train_text, test_ids, dense = demo_model(a.seed, Path(a.cache) if a.cache else None)
    ppl = lambda m: perplexity(m, test_ids, seqlen=cfg.eval_seqlen, progress=False)  # noqa: E731
    rows = {"dense": ppl(dense)}
    calib = calibration_samples(train_text, tok, cfg.nsamples, cfg.seqlen, seed=cfg.seed)
    for method in [m for m in a.baselines.split(",") if m]:
        m = copy.deepcopy(dense)
        semisparse.prune(m, method, pattern="2:4", calib=calib)
        rows[method] = ppl(m)
        print(f"{method:>12}: {rows[method]:.4f}", flush=True)
    data = calibration_samples(train_text, tok, a.nsamples, cfg.seqlen, seed=a.seed + 17)
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    for name in a.variants.split(","):
        m = copy.deepcopy(dense)
        mc = maskllm.MaskLLMConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, min_lr=a.lr / 100,
                                   prior_nsamples=cfg.nsamples, seed=a.seed, progress=False,
                                   **{**VARIANTS[name], **extra})
        t0 = time.perf_counter()
        res = maskllm.train_masks(m, data, mc, calib=calib, log=lambda *_: None)
        secs = time.perf_counter() - t0
        rows[f"maskllm[{name}]"] = ppl(m)
        changed = sum(res.changed.values()) / max(len(res.changed), 1)
        print(f"maskllm[{name}]: {rows[f'maskllm[{name}]']:.4f} ({secs:.0f} s, {100 * changed:.1f}% groups "
              f"changed vs prior, last loss {res.history[-1].get('task_loss', float('nan')):.4f})", flush=True)
    d = rows["dense"]
    print(f"\nheld-out perplexity at 2:4, demo model seed {a.seed} (MaskLLM: {a.steps} steps x {a.batch_size} x 64 tokens)")
    print(f"{'model':>18} {'ppl':>8} {'vs dense':>9}")
    for k, v in rows.items():
        print(f"{k:>18} {v:8.4f} {v / d:8.3f}x")
    if "sparsegpt" in rows:
        gap = rows["sparsegpt"] - d
        for k, v in rows.items():
            if k.startswith("maskllm") and gap > 0:
                print(f"{k}: closes {100 * (rows['sparsegpt'] - v) / gap:.0f}% of the SparseGPT-dense gap")
    if a.json:
        Path(a.json).write_text(json.dumps({"seed": a.seed, "steps": a.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
