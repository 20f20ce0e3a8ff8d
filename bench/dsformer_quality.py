"""DSFormer (STF) vs its baselines on the demo model, at equal compression and training steps.

Trains the `semisparse demo` model (same data, model and defaults as bench/maskllm_quality.py),
then, on three copies with every prunable Linear (all but lm_head) compressed ``--compression``x:

* ``stf``        factorize (init="svd") then STF training (masks learned; frozen for the last 10%),
* ``fixed-mask`` factorize (init="svd"), masks frozen before the first step, same training,
* ``lowrank``    truncated-SVD low-rank factors, same training (semisparse.train.train with the
                 same loss as train_stf, since train_stf refuses a model without DenseSparseLinear).
* ``dense-ft``   (control, only with --methods) the uncompressed model with the same training:
                 how much of the fine-tuned perplexity is just more training of the demo model.

Same batches (same order), same steps, same lr / schedule / weight decay for all three; the
whole model (embeddings, norms, lm_head too) trains in every case. Held-out perplexity is
printed right after each initialisation and after fine-tuning.

    python bench/dsformer_quality.py --seed 0 [--steps 300] [--lr 1e-3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import semisparse
from semisparse import dsformer
from semisparse.data import calibration_samples, eval_tokens
from semisparse.demo import DemoConfig, train_demo_model
from semisparse.demo.language import generate_corpus, word_tokenizer
from semisparse.eval import perplexity
from semisparse.train import TrainConfig, train


def demo_model(seed: int, cache: Path | None, cfg: DemoConfig):
    """As bench/maskllm_quality.py: the demo's data and its trained dense model."""
    tok = word_tokenizer()
    train_text = generate_corpus(cfg.train_sentences, seed=cfg.seed)
    heldout = generate_corpus(cfg.heldout_sentences, seed=cfg.seed + 1_000_003)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    path = cache / f"demo_seed{seed}_steps{cfg.steps}" if cache else None
    if path is not None and (path / "config.json").exists():
        model = semisparse.load_pretrained(str(path))
    else:
        model = train_demo_model(cfg, train_ids, len(tok))
        if path is not None:
            semisparse.save_pretrained(model, str(path), overwrite=True)
    model.eval()
    return tok, train_text, eval_tokens(heldout, tok), model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps (same for every method)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--compression", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (same for every method)")
    p.add_argument("--methods", default="stf,fixed-mask,lowrank")
    p.add_argument("--quick", action="store_true", help="tiny run (demo model 200 steps, 20 fine-tune steps)")
    p.add_argument("--cache", default=None, help="folder to keep the trained demo model in between runs")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    print("command:", " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]), flush=True)
    t_all = time.perf_counter()
    torch.manual_seed(a.seed)
    cfg = DemoConfig(seed=a.seed)
    if a.quick:
        cfg.steps, a.steps = 200, 20
    t0 = time.perf_counter()
    tok, train_text, test_ids, dense = demo_model(a.seed, Path(a.cache) if a.cache else None, cfg)
    t_dense = time.perf_counter() - t0
    ppl = lambda m: perplexity(m, test_ids, seqlen=cfg.eval_seqlen, progress=False)  # noqa: E731
    dense_ppl = ppl(dense)
    print(f"dense: ppl {dense_ppl:.4f} (trained in {t_dense:.0f} s)", flush=True)

    # the same fine-tuning batches for every method: steps x batch windows of the training text
    windows = calibration_samples(train_text, tok, a.steps * a.batch_size, cfg.seqlen, seed=a.seed + 17)
    batches = list(windows.split(a.batch_size))

    def tcfg():
        return TrainConfig(steps=a.steps, lr=a.lr, min_lr=a.lr / 100, warmup_steps=max(1, a.steps // 10),
                           schedule="cosine", seed=a.seed, progress=False, log_every=max(1, a.steps // 5))

    rows = {}
    for method in [m for m in a.methods.split(",") if m]:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        if method in ("stf", "fixed-mask"):
            rep = dsformer.factorize(m, a.compression, init="svd")
        elif method == "lowrank":
            rep = dsformer.lowrank(m, a.compression)
        elif method == "dense-ft":  # control: no compression, same fine-tuning
            rep = dsformer.FactorizeReport("dense", None, "-")
        else:
            raise SystemExit(f"unknown method {method!r}")
        t_init = time.perf_counter() - t0
        m.eval()
        init_ppl = ppl(m)
        m.train()
        t0 = time.perf_counter()
        if method == "stf":
            res = dsformer.train_stf(m, batches, tcfg(), freeze_mask_steps=a.steps // 10, compress=True)
        elif method == "fixed-mask":
            res = dsformer.train_stf(m, batches, tcfg(), freeze_mask_steps=a.steps, compress=True)
        else:  # lowrank, dense-ft
            res = train(m, batches, lambda mm, b, info: dsformer.stf_loss(mm, b), tcfg())
        t_train = time.perf_counter() - t0
        m.eval()
        ft_ppl = ppl(m)
        hist = getattr(res, "history", None) or []
        last = hist[-1].get("task_loss", float("nan")) if hist and isinstance(hist[-1], dict) else float("nan")
        rows[method] = dict(params_before=rep.params_before, params_after=rep.params_after,
                            compression=rep.compression, layers=len(rep.layers), skipped=len(rep.skipped),
                            ppl_init=init_ppl, ppl_ft=ft_ppl, init_s=t_init, train_s=t_train, last_loss=last)
        print(f"{method:>10}: {len(rep.layers)} layers, params {rep.params_before} -> {rep.params_after} "
              f"({rep.compression:.2f}x), ppl init {init_ppl:.4f} -> fine-tuned {ft_ppl:.4f} "
              f"(init {t_init:.1f} s, train {t_train:.0f} s, last train loss {last:.4f})", flush=True)

    print(f"\nheld-out perplexity, demo model seed {a.seed}, {a.compression}x on the factorised Linear layers; "
          f"fine-tune {a.steps} steps x {a.batch_size} x {cfg.seqlen} tokens, lr {a.lr} (cosine, 10% warm-up)")
    print(f"dense ppl {dense_ppl:.4f}")
    head = f"{'method':>10} {'layers':>6} {'params before':>13} {'params after':>12} {'ratio':>6} " \
           f"{'ppl init':>10} {'ppl fine-tuned':>14} {'vs dense':>8} {'train s':>7}"
    print(head)
    print("-" * len(head))
    for k, r in rows.items():
        print(f"{k:>10} {r['layers']:>6} {r['params_before']:>13} {r['params_after']:>12} {r['compression']:>6.2f} "
              f"{r['ppl_init']:>10.4f} {r['ppl_ft']:>14.4f} {r['ppl_ft'] / dense_ppl:>7.3f}x {r['train_s']:>7.0f}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"seed": a.seed, "steps": a.steps, "lr": a.lr, "compression": a.compression,
                                            "dense_ppl": dense_ppl, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
