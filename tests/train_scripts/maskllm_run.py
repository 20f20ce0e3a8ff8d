"""Learn 2:4 masks for a tiny Llama once; launched by tests/test_maskllm_train.py, alone or
under torchrun. Writes ``<out>/rank<r>.safetensors`` (the learned masks as uint8 and the full
logits) and ``<out>/rank<r>.json`` (history, resumed_from). ``--kill-after K`` SIGKILLs the
process after step K, to test resuming."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from safetensors.torch import save_file

from semisparse import maskllm


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def token_data(n: int = 32, seqlen: int = 16, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a learnable sequence: x[t+1] = (x[t] * 3 + 1) % 64 with random starts
    start = torch.randint(0, 64, (n, 1), generator=g)
    ids = [start]
    for _ in range(seqlen - 1):
        ids.append((ids[-1] * 3 + 1) % 64)
    return torch.cat(ids, 1)


def run(out: str, *, strategy: str, steps: int, kill_after: int | None, prior: str, grad_accum: int) -> None:
    model = tiny_llama()
    cfg = maskllm.MaskLLMConfig(
        steps=steps, batch_size=4, grad_accum=grad_accum, lr=5e-2, prior=prior, seed=3, progress=False,
        checkpoint_dir=os.path.join(out, "ckpt"), checkpoint_every=2, distributed=strategy, eval_every=2,
    )

    def kill(step, metrics):
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    held = token_data(8, seed=9)

    def heldout_loss(mdl, step=None):  # runs in eval mode: the argmax masks
        with torch.no_grad():
            return {"loss": float(mdl(input_ids=held, labels=held).loss)}

    res = maskllm.train_masks(model, token_data(), cfg, callbacks=[kill], eval_fn=heldout_loss, log=lambda *a: None)
    model.eval()
    final = heldout_loss(model)["loss"]  # the final masks, computed after training
    rank = int(os.environ.get("RANK", "0"))
    tensors = {f"mask.{k}": v.to(torch.uint8).contiguous() for k, v in res.masks.items()}
    save_file(tensors, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": res.history, "resumed_from": res.resumed_from, "changed": res.changed,
                   "last_eval": res.last_eval, "final_loss": final}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="none", choices=["none", "ddp", "fsdp2"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--kill-after", type=int, default=None)
    ap.add_argument("--prior", default="magnitude")
    ap.add_argument("--grad-accum", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    run(a.out, strategy=a.strategy, steps=a.steps, kill_after=a.kill_after, prior=a.prior, grad_accum=a.grad_accum)
    # results written and closed: leave without interpreter finalization (see run.py)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
