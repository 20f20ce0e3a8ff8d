"""DSFormer STF training of a tiny Llama once; launched by tests/test_dsformer.py under
torchrun (or alone). Writes ``<out>/rank<r>.safetensors`` (the model's state after training
and export) and ``<out>/rank<r>.json`` (history)."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from maskllm_run import tiny_llama, token_data
from safetensors.torch import save_file

from semisparse import dsformer
from semisparse.train import TrainConfig


def run(out: str, *, strategy: str, steps: int) -> None:
    model = tiny_llama()
    dsformer.factorize(model, compression=2.0, iters=2)
    cfg = TrainConfig(steps=steps, lr=3e-3, min_lr=3e-3, schedule="constant", weight_decay=0.0, progress=False,
                      autocast="off", seed=3, distributed=strategy, checkpoint_dir=os.path.join(out, "ckpt"),
                      checkpoint_every=2)
    data = [{"input_ids": b} for b in token_data(32).split(4)]
    res = dsformer.train_stf(model, data, cfg, freeze_mask_steps=2, compress=True)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": res.history, "step": res.step}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="none", choices=["none", "ddp"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(1)
    run(a.out, strategy=a.strategy, steps=a.steps)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # results written and closed: skip interpreter finalization (see run.py)


if __name__ == "__main__":
    main()
