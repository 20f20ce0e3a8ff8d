"""One training loop for the methods in semisparse (MaskLLM mask logits, DSFormer and LPViT
fine-tuning): AdamW, a warmup + cosine/linear/constant schedule, gradient accumulation and
clipping, bf16 autocast, JSONL metrics, atomic safetensors checkpoints with exact resume, and
DDP / FSDP2 under ``torchrun``.

Usage::

    from semisparse.train import TrainConfig, train

    def loss_fn(model, batch, info):           # info: StepInfo(step, micro, steps, ...)
        out = model(batch["x"])
        loss = F.cross_entropy(out, batch["y"])
        return loss, {"acc": (out.argmax(-1) == batch["y"]).float().mean().item()}

    result = train(model, batches, loss_fn, TrainConfig(steps=1000, checkpoint_dir="run1"))

The loop
    Each optimizer step ``s`` (0-based) sets every param group's learning rate to
    ``lr_at(s, config) * lr_scale``, then runs ``grad_accum`` micro-batches: forward + loss
    (under ``torch.autocast(bfloat16)`` when enabled), ``(loss / grad_accum).backward()``
    (DDP: inside ``no_sync()`` except for the last micro-batch; FSDP2: gradient sync only on the
    last one). Then ``clip_grad_norm_`` over the trainable parameters (the norm is logged as
    ``grad_norm`` even when clipping is off), ``optimizer.step()`` and
    ``zero_grad(set_to_none=True)``. After the step: a metrics line every ``log_every`` steps
    (and after the last), ``eval_fn`` every ``eval_every`` steps (and after the last), the
    callbacks, and a checkpoint every ``checkpoint_every`` steps (and after the last) — in that
    order, so a checkpoint holds the state after the step's callbacks.

    Only the given parameters are trained (default: every parameter with ``requires_grad``);
    frozen parameters are neither optimised nor checkpointed. ``eval_fn(model, step)`` gets the
    unwrapped model, runs under ``torch.no_grad()`` and a forked torch RNG (evaluation does not
    change the training's random stream), and the model is put back in train mode afterwards.

Data order and determinism
    ``data`` is a sequence of ready batches (``__len__`` + ``__getitem__``) or a callable
    ``index -> batch``. Micro-batch ``micro`` of step ``step`` on rank ``rank`` has the global
    number ``g = (step * grad_accum + micro) * world_size + rank``. A callable receives ``g``; a
    sequence of length ``n`` yields item ``perm_e[g % n]`` where ``e = g // n`` is the epoch and
    ``perm_e`` a ``torch.randperm(n)`` drawn from a generator seeded by ``(seed, e)`` (identity
    without ``shuffle``; see :func:`batch_index`). Batches are moved to the model's device
    (recursively through dicts, lists, tuples). So which batch a step sees is a pure function
    of the config, independent of restarts. At the start of a fresh (not resumed) run the loop
    calls ``torch.manual_seed(seed + rank)``: the global torch RNG (dropout, ...) is seeded
    once, differently on every rank.

Metrics (JSONL, rank 0 only)
    ``metrics_path`` (default ``<checkpoint_dir>/metrics.jsonl``) gets one JSON object per line:
    training lines ``{"step", "loss", "lr", "grad_norm", <loss_fn metrics>..., "time_s"}`` where
    ``step`` counts completed steps, ``loss`` and the loss_fn metrics are means over the step's
    micro-batches and over ranks, ``lr`` is the schedule's value (before ``lr_scale``) and
    ``time_s`` the wall time since this call started; evaluation lines
    ``{"step", "eval": {...}, "time_s"}``. The file is appended to; when a run starts (fresh at
    step 0 or resumed at step k) lines with a larger ``step`` are first dropped (atomic rewrite),
    so a killed-and-resumed run's file equals an uninterrupted run's apart from ``time_s``.
    Loss_fn metric names must be the same on every rank.

Checkpoints (see :mod:`semisparse.train.checkpoint`)
    ``<checkpoint_dir>/step-00000100/`` holds ``model.safetensors`` (trainable parameters and
    persistent buffers by their names in the unwrapped model), ``optimizer.safetensors``
    (``<param>.exp_avg`` / ``.exp_avg_sq`` / ``.step``), ``rng.safetensors`` (every rank's torch
    CPU RNG state and, when CUDA is initialised, CUDA RNG states), ``extra.safetensors`` (tensor
    entries of ``extra_state.state_dict()``) and ``trainer.json`` (step, world size, config,
    param-group hyper-parameters, the JSON entries of ``extra_state``, format version). It is
    written to a ``.tmp-<pid>`` folder and renamed into place, then ``<checkpoint_dir>/latest``
    is replaced atomically; only the newest ``keep_checkpoints`` are kept. Nothing is pickled.
    Under DDP/FSDP2 rank 0 writes (FSDP2: the full state is gathered with
    ``get_state_dict(full_state_dict=True, cpu_offload=True)``) and every rank reads
    (``checkpoint_dir`` must be visible to every rank).

Resume contract
    With ``resume=True`` (the default) and a checkpoint in ``checkpoint_dir``, the loop loads the
    model tensors, optimizer state, RNG states and ``extra_state`` and continues at the
    checkpoint's step; the result is bitwise identical to an uninterrupted run with the same
    config, data, model and world size (on the same hardware and software). The checkpoint must
    fit: names, shapes and dtypes of the trainable parameters and buffers, the param groups,
    the world size and every field in ``RESULT_FIELDS`` (steps, lr, schedule, seed, grad_accum,
    ...) must match, else ``ValueError`` naming the first difference. Bookkeeping fields
    (logging, eval cadence, checkpoint cadence, progress bar) may change. Only torch's RNGs are
    restored: a ``loss_fn`` that draws from Python's ``random`` or NumPy is not resumed exactly.
    ``resume=False`` refuses a ``checkpoint_dir`` that already holds checkpoints.

Distributed
    ``distributed="auto"`` uses DDP when ``WORLD_SIZE > 1`` (torchrun); ``"none"`` ignores any
    process group (each process trains alone, as rank 0 of 1). If no process group is
    initialised the loop creates one from the torchrun environment (``nccl`` for a CUDA model,
    ``gloo`` otherwise) and destroys it at the end; a group you created is left alone. Place the
    model on ``cuda:LOCAL_RANK`` before calling :func:`train`. DDP broadcasts buffers from rank 0
    each forward; FSDP2 (``fully_shard`` on the ``fsdp_modules`` submodules, then the root, on a
    1-D mesh of all ranks) leaves buffers per rank, as FSDP does. After FSDP2 training the
    returned model keeps DTensor parameters; :func:`full_state` gathers plain full tensors
    (call it on every rank, with the process group still alive: initialise the group yourself
    before :func:`train` in that case, since the loop destroys only a group it created).
"""

from .checkpoint import complete_checkpoints, find_latest
from .config import RESULT_FIELDS, StepInfo, TrainConfig, TrainResult, lr_at
from .distributed import full_state
from .loop import batch_index, train

__all__ = [
    "RESULT_FIELDS",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "batch_index",
    "complete_checkpoints",
    "find_latest",
    "full_state",
    "lr_at",
    "train",
]
