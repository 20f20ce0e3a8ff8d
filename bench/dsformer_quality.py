"""DSFormer (STF) vs its baselines at equal compression and equal training steps.

Two models, both trained here from a config on the demo's synthetic language:

* ``--model lm``       the `semisparse demo` Llama (causal LM; perplexity),
* ``--model encoder``  a BERT-style encoder trained with masked language modelling
                       (bench/maskllm_encoder.py; masked-token perplexity).

On copies of the trained dense model, every Linear except the output head is compressed
``--compression``x and the whole model is fine-tuned on the task loss (LM / MLM) with the
same batches, steps and schedule:

* ``stf``        factorize (SVD + alternating init) then STF (mask recomputed every step,
                 frozen for the last 10%),
* ``fixed-mask`` the same factorisation, mask frozen before the first step ("initialise,
                 then fine-tune"),
* ``lowrank``    truncated-SVD low-rank factors ``U V`` at the same budget, fine-tuned,
* ``prune24``    2:4 pruning alone (SparseGPT on calibration windows of the training text,
                 the same layers), then the same fine-tuning with the masks fixed (the
                 SparseLinear values train); 2x on the weights like the others,
* ``dense-ft``   (control) the uncompressed model with the same fine-tuning: how much of the
                 fine-tuned number is just more training of the dense model.

The learning rate is chosen per method from ``--lrs`` on a validation split; the test split
(different sentences) is only read for the reported number. Perplexities are printed right
after each initialisation (test) and after fine-tuning (validation at every lr, test at the
chosen one), with the share of kept ``S`` entries whose mask changed during STF.

    python bench/dsformer_quality.py --model lm --seed 0 [--steps 300] [--lrs 3e-4,1e-3,3e-3]
    python bench/dsformer_quality.py --model encoder --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import semisparse
from semisparse import dsformer
from semisparse.data import calibration_samples, eval_tokens
from semisparse.demo import DemoConfig, train_demo_model
from semisparse.demo.language import generate_corpus, word_tokenizer
from semisparse.eval import perplexity
from semisparse.train import TrainConfig, train

VAL_SEED, TEST_SEED = 2_000_003, 1_000_003


def _cached(path: Path | None, build):
    if path is not None and (path / "config.json").exists():
        return semisparse.load_pretrained(str(path))
    model = build()
    if path is not None:
        semisparse.save_pretrained(model, str(path), overwrite=True)
    return model


def lm_task(a, cache: Path | None):
    """The demo LM, its data, and (ppl_fn(model, split), fine-tune batches)."""
    cfg = DemoConfig(seed=a.seed, hidden=a.hidden, ffn=a.ffn, layers=a.layers)
    if a.pretrain_steps:
        cfg.steps = a.pretrain_steps
    tok = word_tokenizer()
    train_text = generate_corpus(cfg.train_sentences, seed=cfg.seed)
    split = {"val": eval_tokens(generate_corpus(cfg.heldout_sentences, seed=cfg.seed + VAL_SEED), tok),
             "test": eval_tokens(generate_corpus(cfg.heldout_sentences, seed=cfg.seed + TEST_SEED), tok)}
    name = f"lm_seed{a.seed}_h{cfg.hidden}_f{cfg.ffn}_l{cfg.layers}_steps{cfg.steps}"
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    dense = _cached(cache / name if cache else None, lambda: train_demo_model(cfg, train_ids, len(tok)))
    dense.eval()

    def ppl(model, which):
        return perplexity(model, split[which], seqlen=cfg.eval_seqlen, progress=False)

    windows = calibration_samples(train_text, tok, a.steps * a.batch_size, cfg.seqlen, seed=a.seed + 17)
    return dense, ppl, list(windows.split(a.batch_size))


def encoder_task(a, cache: Path | None):
    """The BERT-style encoder of bench/maskllm_encoder.py (MLM), its data and batches."""
    from maskllm_encoder import mlm_batch, mlm_perplexity, train_encoder

    tok = word_tokenizer()
    vocab = len(tok)
    train_text = generate_corpus(30000, seed=a.seed)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    steps = a.pretrain_steps or 1500
    name = f"encoder_seed{a.seed}_h{a.hidden}_f{a.ffn}_l{a.layers}_steps{steps}"
    dense = _cached(cache / name if cache else None,
                    lambda: train_encoder(a.seed, train_ids, vocab, steps=steps, hidden=a.hidden, ffn=a.ffn, layers=a.layers))
    dense.eval()
    split = {}
    for which, off in (("val", VAL_SEED), ("test", TEST_SEED)):
        held = torch.tensor(tok(generate_corpus(1500, seed=a.seed + off))["input_ids"])
        g = torch.Generator().manual_seed(12345 + off)
        n = held.numel() // (64 * 16)
        split[which] = [mlm_batch(held[i * 64 * 16:(i + 1) * 64 * 16].reshape(-1, 64), vocab, vocab, g) for i in range(n)]

    def ppl(model, which):
        return mlm_perplexity(model, split[which])

    # fine-tune windows drawn at random starts (the encoder's 30k sentences are too short for
    # steps x batch disjoint windows), corrupted once as in MLM: the same batches for every method
    g = torch.Generator().manual_seed(a.seed + 17)
    starts = torch.randint(0, train_ids.numel() - 64, (a.steps * a.batch_size,), generator=g)
    windows = torch.stack([train_ids[s:s + 64] for s in starts.tolist()])
    batches = [mlm_batch(w, vocab, vocab, g) for w in windows.split(a.batch_size)]
    return dense, ppl, batches


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("lm", "encoder"), default="lm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=0, help="dense training steps (default: lm 1200, encoder 1500)")
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps (same for every method)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--compression", type=float, default=2.0)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="peak lrs tried for every method (chosen on validation)")
    p.add_argument("--iters", type=int, default=10, help="alternating iterations of the DSFormer initialisation")
    p.add_argument("--freeze-frac", type=float, default=0.1, help="STF: freeze the masks for this share of the steps")
    p.add_argument("--methods", default="stf,fixed-mask,lowrank,prune24,dense-ft")
    p.add_argument("--quick", action="store_true", help="tiny run (dense 200 steps, 20 fine-tune steps, one lr)")
    p.add_argument("--cache", default=None, help="folder to keep the trained dense models in between runs")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    print("command:", " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]), flush=True)
    if a.quick:
        a.pretrain_steps, a.steps, a.lrs = 200, 20, a.lrs.split(",")[0]
    lrs = [float(x) for x in a.lrs.split(",") if x]
    t_all = time.perf_counter()
    torch.manual_seed(a.seed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cache = Path(a.cache) if a.cache else None
    t0 = time.perf_counter()
    dense, ppl, batches = (lm_task if a.model == "lm" else encoder_task)(a, cache)
    calib = torch.cat([(b["input_ids"] if isinstance(b, dict) else b) for b in batches[:8]])  # prune24: 128 windows
    dense_ppl = {w: ppl(dense, w) for w in ("val", "test")}
    print(f"dense: ppl val {dense_ppl['val']:.4f} test {dense_ppl['test']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def tcfg(lr):
        return TrainConfig(steps=a.steps, lr=lr, min_lr=lr / 100, warmup_steps=max(1, a.steps // 10),
                           schedule="cosine", seed=a.seed, progress=False, log_every=max(1, a.steps // 5))

    def build(method):
        m = copy.deepcopy(dense)
        if method in ("stf", "fixed-mask"):
            return m, dsformer.factorize(m, a.compression, init="svd", iters=a.iters)
        if method == "lowrank":
            return m, dsformer.lowrank(m, a.compression)
        if method == "prune24":
            # the layers factorize would take, pruned 2:4 by SparseGPT and stored as SparseLinear
            names = sorted(dsformer.factorize(copy.deepcopy(dense), a.compression, iters=0).layers)
            masks = semisparse.prune(m, "sparsegpt", pattern="2:4", calib=calib, targets=names, strict=True)
            semisparse.sparsify(m, masks=masks)
            before = sum(masks[n].numel() for n in names)
            return m, SimpleNamespace(params_before=before, params_after=before // 2, compression=2.0, layers=names)
        if method == "dense-ft":
            return m, None
        raise SystemExit(f"unknown method {method!r}")

    rows = {}
    for method in [m for m in a.methods.split(",") if m]:
        t0 = time.perf_counter()
        m, rep = build(method)
        t_init = time.perf_counter() - t0
        m.eval()
        init_ppl = ppl(m, "test")
        init_model = m
        runs = {}
        for lr in lrs:
            m = copy.deepcopy(init_model)
            m.train()
            masks0 = {n: mod.current_mask().clone() for n, mod in dsformer.dense_sparse_layers(m).items()}
            t0 = time.perf_counter()
            if method == "stf":
                dsformer.train_stf(m, batches, tcfg(lr), freeze_mask_steps=int(a.steps * a.freeze_frac), compress=False)
            elif method == "fixed-mask":
                dsformer.train_stf(m, batches, tcfg(lr), freeze_mask_steps=a.steps, compress=False)
            else:  # lowrank, dense-ft: the same loss as train_stf (which needs DenseSparseLinear layers)
                train(m, batches, lambda mm, b, info: dsformer.stf_loss(mm, b), tcfg(lr))
            t_train = time.perf_counter() - t0
            changed = None
            if masks0:
                layers = dsformer.dense_sparse_layers(m)
                kept = sum(int(v.sum()) for v in masks0.values())
                changed = sum(int((layers[n].current_mask() & ~v).sum()) for n, v in masks0.items()) / kept
                dsformer.export(m)  # what a user gets: compressed 2:4 layers
            m.eval()
            runs[lr] = {"val": ppl(m, "val"), "model": m, "train_s": t_train, "changed": changed}
            print(f"{method:>10} lr {lr:g}: val ppl {runs[lr]['val']:.4f}"
                  + (f", {100 * changed:.2f}% of kept S entries changed" if changed is not None else "")
                  + f" ({t_train:.0f} s)", flush=True)
        best = min(runs, key=lambda lr: runs[lr]["val"])
        r = runs[best]
        test = ppl(r["model"], "test")
        rows[method] = dict(
            params_before=rep.params_before if rep else None, params_after=rep.params_after if rep else None,
            compression=rep.compression if rep else 1.0, layers=len(rep.layers) if rep else 0,
            ppl_init=init_ppl, lr=best, val={str(k): v["val"] for k, v in runs.items()}, ppl_val=r["val"], ppl_test=test,
            changed=r["changed"], init_s=t_init, train_s=r["train_s"])
        print(f"{method:>10}: chosen lr {best:g}; test ppl init {init_ppl:.4f} -> fine-tuned {test:.4f}"
              + (f" ({len(rep.layers)} layers, params {rep.params_before} -> {rep.params_after}, "
                 f"{rep.compression:.2f}x, init {t_init:.1f} s)" if rep else ""), flush=True)

    what = "perplexity" if a.model == "lm" else "masked-token perplexity"
    print(f"\n{what}, {a.model} seed {a.seed} (hidden {a.hidden}, ffn {a.ffn}, {a.layers} layers), {a.compression}x on "
          f"the factorised Linear layers; fine-tune {a.steps} steps x {a.batch_size} x 64 tokens, cosine, 10% warm-up, "
          f"lr chosen on validation from {a.lrs}")
    print(f"dense: val {dense_ppl['val']:.4f}, test {dense_ppl['test']:.4f}")
    head = f"{'method':>10} {'params after':>12} {'ratio':>6} {'test init':>10} {'lr':>7} {'val':>8} {'test':>8} " \
           f"{'vs dense':>8} {'S changed':>9} {'train s':>7}"
    print(head)
    print("-" * len(head))
    for k, r in rows.items():
        ch = f"{100 * r['changed']:.2f}%" if r["changed"] is not None else "-"
        print(f"{k:>10} {r['params_after'] or '-':>12} {r['compression']:>6.2f} {r['ppl_init']:>10.4f} {r['lr']:>7g} "
              f"{r['ppl_val']:>8.4f} {r['ppl_test']:>8.4f} {r['ppl_test'] / dense_ppl['test']:>7.3f}x {ch:>9} {r['train_s']:>7.0f}")
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "dense": dense_ppl, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
