"""Train the test model once; launched by tests/test_train.py, alone or under torchrun.

Writes ``<out>/rank<r>.safetensors`` (full trainable parameters, plain tensors) and
``<out>/rank<r>.json`` (this call's history) on every rank. ``--kill-after K`` SIGKILLs the
process from a callback after step K (every rank), to test resuming."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from safetensors.torch import save_file

from common import loss_fn, make_batches, make_model
from semisparse.train import TrainConfig, full_state, train


def run(out: str, *, strategy: str = "none", steps: int = 8, grad_accum: int = 2,
        checkpoint_every: int = 2, kill_after: int | None = None, dropout: float = 0.1) -> None:
    if strategy == "fsdp2" and not torch.distributed.is_initialized():
        # train() destroys a process group it created itself; full_state() below still needs
        # one for FSDP2's DTensors, so this script owns the group.
        torch.distributed.init_process_group("gloo")
    cfg = TrainConfig(
        steps=steps,
        lr=3e-2,
        warmup_steps=2,
        grad_accum=grad_accum,
        seed=7,
        checkpoint_dir=os.path.join(out, "ckpt"),
        checkpoint_every=checkpoint_every,
        keep_checkpoints=2,
        progress=False,
        # under torchrun "auto" resolves to DDP (WORLD_SIZE > 1): tested that way
        distributed="auto" if strategy == "ddp" else strategy,
    )

    def kill(step, metrics):
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    res = train(make_model(dropout=dropout), make_batches(), loss_fn, cfg, callbacks=[kill])
    rank = int(os.environ.get("RANK", "0")) if strategy != "none" else 0
    save_file(full_state(res.model, trainable_only=True), os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"history": res.history, "resumed_from": res.resumed_from, "step": res.step}, f)
    if strategy == "fsdp2":
        # drop the FSDP2 model (its state can hold gloo Work objects) while the group and the
        # interpreter are alive; every rank has written its files before any tears gloo down
        del res
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="none", choices=["none", "ddp", "fsdp2"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--kill-after", type=int, default=None)
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run(args.out, strategy=args.strategy, steps=args.steps, grad_accum=args.grad_accum,
        checkpoint_every=args.checkpoint_every, kill_after=args.kill_after, dropout=args.dropout)
    # Everything is written and closed. Leave without interpreter finalization: torch 2.13 can
    # abort there ('terminate called without an active exception') when gloo Work objects
    # holding tensors are destroyed during finalization (seen in ~1 of 10-20 two-rank runs under
    # load, after both ranks had written their results; pytorch PR #179291 describes the race).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
