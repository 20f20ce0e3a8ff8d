"""`semisparse demo`: the main job on a built-in default.

1. generate a synthetic language (semisparse.demo.language) and a word-level tokenizer;
2. train a small Llama-architecture model on it for a fixed number of steps (about a
   minute on 2 CPU cores; deterministic for a seed);
3. prune a copy with each one-shot method at 2:4 (magnitude, Wanda, SparseGPT) using
   calibration windows of the training text, and measure held-out perplexity;
4. swap the SparseGPT model's Linear layers for SparseLinear (compressed 2:4) and time it
   against the dense model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

__all__ = ["DemoConfig", "run_demo", "train_demo_model"]


@dataclass
class DemoConfig:
    seed: int = 0
    train_sentences: int = 60000
    heldout_sentences: int = 2000
    hidden: int = 64
    ffn: int = 256
    layers: int = 4
    heads: int = 4
    steps: int = 1200
    batch: int = 32
    seqlen: int = 64
    lr: float = 6e-3
    nsamples: int = 64           # calibration windows of seqlen tokens
    eval_seqlen: int = 128
    methods: tuple = ("magnitude", "wanda", "sparsegpt")
    pattern: str = "2:4"
    time_tokens: tuple = (1, 256)  # prefill lengths timed dense vs compressed
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def train_demo_model(cfg: DemoConfig, train_ids: torch.Tensor, vocab: int, log=print):
    """A small Llama trained with AdamW (cosine schedule, warm-up) on random windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.hidden, intermediate_size=cfg.ffn, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=max(cfg.seqlen, cfg.eval_seqlen, max(cfg.time_tokens)),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=None,
    )
    model = LlamaForCausalLM(mcfg).to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(range(cfg.steps), desc="train", disable=None, leave=False)
    for step in bar:
        start = torch.randint(0, train_ids.numel() - cfg.seqlen - 1, (cfg.batch,), generator=g)
        x = torch.stack([train_ids[s:s + cfg.seqlen] for s in start.tolist()]).to(cfg.device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    log(f"trained {cfg.steps} steps x {cfg.batch} x {cfg.seqlen} tokens, last loss {loss.item():.3f}")
    return model


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "layers." in n)


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    import semisparse
    from semisparse.data import calibration_samples, eval_tokens
    from semisparse.eval import perplexity

    from .language import generate_corpus, word_tokenizer
    from .speed import median_ms

    cfg = cfg or DemoConfig()
    t_start = time.perf_counter()
    tok = word_tokenizer()
    train_text = generate_corpus(cfg.train_sentences, seed=cfg.seed)
    heldout_text = generate_corpus(cfg.heldout_sentences, seed=cfg.seed + 1_000_003)
    train_ids = torch.tensor(tok(train_text)["input_ids"])
    test_ids = eval_tokens(heldout_text, tok)
    log(f"synthetic language: {len(tok)} words, {train_ids.numel()} training tokens, "
        f"{test_ids.numel()} held-out tokens (seed {cfg.seed})")

    dense = train_demo_model(cfg, train_ids, len(tok), log=log).to(cfg.dtype)
    calib = calibration_samples(train_text, tok, cfg.nsamples, cfg.seqlen, seed=cfg.seed)

    rows = {}
    rows["dense"] = perplexity(dense, test_ids, seqlen=cfg.eval_seqlen)
    log(f"dense perplexity {rows['dense']:.3f}")
    pruned = {}
    for method in cfg.methods:
        m = copy.deepcopy(dense)
        t1 = time.perf_counter()
        masks = semisparse.prune(m, method, pattern=cfg.pattern, calib=calib)
        t_prune = time.perf_counter() - t1
        rows[method] = perplexity(m, test_ids, seqlen=cfg.eval_seqlen)
        pruned[method] = (m, masks)
        log(f"{method:>9} {cfg.pattern}: perplexity {rows[method]:.3f} (pruned in {t_prune:.1f} s)")

    log("")
    log(f"held-out perplexity at {cfg.pattern} (lower is better)")
    log(f"{'model':>10} {'ppl':>9} {'vs dense':>9}")
    for k, v in rows.items():
        log(f"{k:>10} {v:9.3f} {v / rows['dense']:8.2f}x")

    # compress the best pruned model and time it against dense
    best = "sparsegpt" if "sparsegpt" in pruned else cfg.methods[-1]
    model, masks = pruned[best]
    report = semisparse.sparsify(model, masks={k: v for k, v in masks.items()})
    compressed_ppl = perplexity(model, test_ids, seqlen=cfg.eval_seqlen)
    log("")
    log(f"{best} model compressed: {len(report.swapped)} Linear layers -> SparseLinear; "
        f"perplexity {compressed_ppl:.3f} (same weights, 2:4 kernels)")
    timing = {}
    with torch.inference_mode():
        for t in cfg.time_tokens:
            x = test_ids[:, :t].to(cfg.device)
            timing[t] = (median_ms(lambda: dense(input_ids=x), 5), median_ms(lambda: model(input_ids=x), 5))
    log(f"{'tokens':>6} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>8}")
    for t, (d, s) in timing.items():
        log(f"{t:>6} {d:9.2f} {s:9.2f} {d / s:7.2f}x")
    db, sb = _weight_bytes(dense), _weight_bytes(model)
    log(f"block weights {db / 2**20:.2f} MiB dense -> {sb / 2**20:.2f} MiB 2:4 ({sb / db:.3f}x)")
    if cfg.hidden < 1024:
        log(f"(layers {cfg.hidden} wide are dominated by per-call overhead; `semisparse bench` times the "
            f"kernels at LLM sizes)")
    total = time.perf_counter() - t_start
    log(f"demo finished in {total:.0f} s")
    return {"perplexity": rows, "compressed_perplexity": compressed_ppl, "timing_ms": timing,
            "dense_bytes": db, "sparse_bytes": sb, "seconds": total}
