"""The training loop: :func:`train`."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_bytes
from .checkpoint import (
    complete_checkpoints,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from .config import StepInfo, TrainConfig, TrainResult, lr_at, resolve_autocast
from .distributed import DistContext, setup, wrap_model

__all__ = ["batch_index", "train"]

_RESERVED = ("step", "loss", "lr", "grad_norm", "time_s", "eval")
_GROUP_KEYS = ("params", "weight_decay", "lr_scale", "name")


# --------------------------------------------------------------------------- data order
def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + 1) % (2**63)


def _permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return torch.randperm(length, generator=g)


def batch_index(global_micro: int, length: int, seed: int, shuffle: bool = True) -> int:
    """The item of a length-``length`` sequence that global micro-batch ``global_micro``
    reads: position ``global_micro % length`` of epoch ``global_micro // length``'s
    permutation (a ``torch.randperm`` seeded from ``seed`` and the epoch; identity when
    ``shuffle`` is off)."""
    epoch, pos = divmod(global_micro, length)
    if not shuffle:
        return pos
    return int(_permutation(length, seed, epoch)[pos])


class _Data:
    """Maps (step, micro, rank) to a batch; a pure function of the config."""

    def __init__(self, data, config: TrainConfig):
        self.config = config
        self._perm: tuple[int, torch.Tensor] | None = None
        if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self.length = len(data)
            if self.length == 0:
                raise ValueError("data: the sequence of batches is empty")
            self.fetch = data.__getitem__
            self.sequence = True
        elif callable(data):
            self.fetch = data
            self.sequence = False
        else:
            raise TypeError(
                "data must be a sequence of batches (__len__ and __getitem__, e.g. a list or a map-style "
                "Dataset whose items are batches) or a callable index -> batch; got "
                f"{type(data).__name__} (wrap an iterator or DataLoader in one of these)"
            )

    def __call__(self, step: int, micro: int, rank: int, world_size: int):
        c = self.config
        g = (step * c.grad_accum + micro) * world_size + rank
        if not self.sequence:
            return self.fetch(g)
        epoch, pos = divmod(g, self.length)
        if not c.shuffle:
            return self.fetch(pos)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, _permutation(self.length, c.seed, epoch))
        return self.fetch(int(self._perm[1][pos]))


def _to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x if x.device == device else x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        moved = {k: _to_device(v, device) for k, v in x.items()}
        try:
            return type(x)(moved)
        except TypeError:  # a Mapping type that cannot be built from a dict
            return moved
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_to_device(v, device) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


# ------------------------------------------------------------------------ params, state
def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _resolve_groups(model: nn.Module, params, config: TrainConfig) -> list[dict]:
    """Param groups as {"names", "weight_decay", "lr_scale", "name"}; names index the
    unwrapped model's named_parameters(), so groups survive DDP/FSDP2 wrapping."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    if params is None:
        raw = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    else:
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        if items and all(isinstance(g, Mapping) for g in items):
            raw = [dict(g) for g in items]
        elif all(isinstance(p, torch.Tensor) for p in items):
            raw = [{"params": items}]
        else:
            raise TypeError("params must be None, an iterable of Parameters, or a list of param-group dicts")
    groups, seen = [], set()
    for i, g in enumerate(raw):
        unknown = sorted(set(g) - set(_GROUP_KEYS))
        if unknown:
            raise ValueError(f"params: param group {i} has unknown keys {unknown}; allowed: {list(_GROUP_KEYS)}")
        if "params" not in g:
            raise ValueError(f"params: param group {i} has no 'params'")
        ps = g["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        gnames = []
        for p in ps:
            if id(p) not in names:
                raise ValueError(
                    f"params: param group {i} holds a tensor of shape {tuple(p.shape)} that is not a parameter of the model"
                )
            n = names[id(p)]
            if not p.requires_grad:
                raise ValueError(f"params: parameter {n!r} has requires_grad=False; a frozen parameter cannot be trained")
            if id(p) in seen:
                raise ValueError(f"params: parameter {n!r} appears in more than one place")
            seen.add(id(p))
            gnames.append(n)
        hp = {}
        for key, default, low in (("weight_decay", config.weight_decay, 0.0), ("lr_scale", 1.0, 0.0)):
            v = g.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                raise ValueError(f"params: param group {i}: {key} must be a finite number >= {low}, got {v!r}")
            hp[key] = float(v)
        groups.append({"names": gnames, "name": g.get("name"), **hp})
    if not seen:
        raise ValueError("params: no trainable parameters (every parameter has requires_grad=False?)")
    return groups


def _persistent_buffers(model: nn.Module) -> list[str]:
    out = []
    for mname, m in model.named_modules():
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                out.append(f"{mname}.{bname}" if mname else bname)
    return out


def _plain(v):
    """A JSON-able value: one-element tensors and NumPy scalars become Python numbers."""
    if isinstance(v, torch.Tensor):
        return v.item()
    if hasattr(v, "item") and not isinstance(v, (bool, int, float, str)):
        return v.item()
    return v


def _unpack_loss(out) -> tuple[torch.Tensor, dict[str, float]]:
    metrics = {}
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        out, raw = out
        for k, v in raw.items():
            if k in _RESERVED:
                raise ValueError(f"loss_fn: metric name {k!r} is reserved by the trainer ({', '.join(_RESERVED)})")
            metrics[str(k)] = float(_plain(v))
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise TypeError(
            "loss_fn must return a scalar Tensor or (scalar Tensor, dict[str, float]); got "
            + (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__)
        )
    return out.reshape(()), metrics


# ------------------------------------------------------------------------------ logging
class _MetricsLog:
    """Rank 0's JSONL file. On start, lines of steps after the starting step (left by a run
    that died after its last checkpoint) are dropped, so the file reads as one run."""

    def __init__(self, path: str | None, start_step: int, active: bool):
        self.file = None
        if path is None or not active:
            return
        p = Path(path)
        if p.exists():
            kept, changed = [], False
            for line in p.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    keep = int(rec["step"]) <= start_step
                except (ValueError, KeyError, TypeError):
                    keep = False  # a torn last line
                if keep:
                    kept.append(line)
                else:
                    changed = True
            if changed:
                atomic_write_bytes(p, "".join(line + "\n" for line in kept).encode())
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(p, "a")  # noqa: SIM115 - open for the whole run, closed by close()

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _progress_bar(config: TrainConfig, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.desc, dynamic_ncols=True)


# --------------------------------------------------------------------------------- loop
def train(
    model: nn.Module,
    data,
    loss_fn: Callable,
    config: TrainConfig,
    *,
    params=None,
    eval_fn: Callable | None = None,
    callbacks: Sequence[Callable] = (),
    fsdp_modules=None,
    extra_state=None,
    ddp_kwargs: dict | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.steps`` AdamW steps; see :mod:`semisparse.train`.

    Args:
        model: the module to train, already on its device (``cuda:LOCAL_RANK`` under torchrun).
        data: a sequence of batches, or a callable ``index -> batch`` (infinite stream indexed
            by the global micro-batch number).
        loss_fn: ``(model, batch, info: StepInfo) -> loss`` or ``-> (loss, {name: float})``;
            ``model`` is the wrapped module (DDP) or the model itself.
        config: a :class:`TrainConfig`.
        params: ``None`` (every parameter with ``requires_grad``), an iterable of parameters,
            or param-group dicts ``{"params", "weight_decay", "lr_scale", "name"}``.
        eval_fn: ``(model, step) -> dict`` run under ``torch.no_grad()`` on every rank with
            the unwrapped model and a forked RNG, every ``eval_every`` steps and after the last.
        callbacks: ``(step, metrics)`` after every optimizer step, on every rank; ``metrics``
            has an ``"eval"`` entry on steps that evaluated.
        fsdp_modules: FSDP2 only: which submodules get their own ``fully_shard`` (a callable
            ``module -> bool`` or module classes); default: each direct child with parameters.
        extra_state: an object with ``state_dict()`` / ``load_state_dict()`` stored in checkpoints.
        ddp_kwargs: extra keyword arguments for ``DistributedDataParallel``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: (model, batch, info) -> loss")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError("eval_fn must be None or callable: (model, step) -> dict")
    callbacks = tuple(callbacks)
    if not all(callable(cb) for cb in callbacks):
        raise TypeError("callbacks must be callables (step, metrics) -> None")
    if extra_state is not None and not (hasattr(extra_state, "state_dict") and hasattr(extra_state, "load_state_dict")):
        raise TypeError("extra_state must have state_dict() and load_state_dict(dict)")

    source = _Data(data, config)
    groups = _resolve_groups(model, params, config)
    buffer_names = _persistent_buffers(model)
    device = _model_device(model)
    ctx = setup(config.distributed, device)
    try:
        result = _run(model, source, loss_fn, config, ctx, device, groups, buffer_names,
                      eval_fn, callbacks, fsdp_modules, extra_state, ddp_kwargs)
    except BaseException:
        ctx.finish(clean=False)
        raise
    ctx.finish(clean=True)
    return result


def _micro_sync(wrapped: nn.Module, ctx: DistContext, sync: bool):
    """DDP: ``no_sync()`` on all but the last micro-batch. FSDP2: skip the reduce-scatter
    likewise (gradients accumulate unsharded until the last micro-batch)."""
    if ctx.strategy == "ddp" and not sync:
        return wrapped.no_sync()
    if ctx.strategy == "fsdp2":
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> float:
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _run(model, source, loss_fn, config, ctx, device, groups, buffer_names,
         eval_fn, callbacks, fsdp_modules, extra_state, ddp_kwargs) -> TrainResult:
    wrapped = wrap_model(model, ctx, device, fsdp_modules=fsdp_modules, ddp_kwargs=ddp_kwargs)
    named = dict(model.named_parameters())  # FSDP2 replaced them with DTensor parameters
    group_names = [g["names"] for g in groups]
    optimizer = torch.optim.AdamW(
        [
            {"params": [named[n] for n in g["names"]], "weight_decay": g["weight_decay"],
             "lr_scale": g["lr_scale"], "lr": config.lr * g["lr_scale"]}
            for g in groups
        ],
        lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
    )
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    ckpt_kw = {
        "model": model,
        "optimizer": optimizer,
        "group_names": group_names,
        "buffer_names": buffer_names,
        "ctx": ctx,
        "config": config,
        "extra_state": extra_state,
    }

    start, resumed_from = 0, None
    ckdir = config.checkpoint_dir
    if ckdir is not None:
        if config.resume:
            latest = find_latest(ckdir)
            if latest is not None:
                start = resumed_from = load_checkpoint(latest, **ckpt_kw)
        elif complete_checkpoints(ckdir):
            raise ValueError(
                f"TrainConfig.resume is False but checkpoint_dir {ckdir!r} already holds checkpoints; "
                "empty it or choose another folder so that two runs do not mix"
            )
    if not ctx.all_equal(start):
        raise RuntimeError("ranks resumed from different checkpoints; is checkpoint_dir shared by every rank?")
    if resumed_from is None:
        torch.manual_seed(config.seed + ctx.rank)  # every rank: its own dropout stream

    use_autocast = resolve_autocast(config, device)
    rank0 = ctx.rank == 0
    log = _MetricsLog(config.resolved_metrics_path(), start, rank0)
    bar = _progress_bar(config, start, config.progress and rank0)
    history: list[dict] = []
    last_eval = None
    t0 = time.perf_counter()
    was_training = model.training
    model.train()

    def evaluate(done: int) -> dict:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=cuda), torch.no_grad():
                res = eval_fn(model, done)
        finally:
            model.train()
        if not isinstance(res, Mapping):
            raise TypeError(f"eval_fn must return a dict, got {type(res).__name__}")
        return {str(k): _plain(v) for k, v in res.items()}

    try:
        for step in range(start, config.steps):
            lr = lr_at(step, config)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            sums: dict[str, float] = {}
            for micro in range(config.grad_accum):
                info = StepInfo(step, micro, config.steps, config.grad_accum, ctx.rank, ctx.world_size)
                batch = _to_device(source(step, micro, ctx.rank, ctx.world_size), device)
                with _micro_sync(wrapped, ctx, micro == config.grad_accum - 1):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                        out = loss_fn(wrapped, batch, info)
                    loss, metrics = _unpack_loss(out)
                    (loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
            grad_norm = _grad_norm(trainable, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            keys = sorted(sums)
            vec = torch.tensor([float(loss_sum)] + [sums[k] for k in keys], dtype=torch.float64)
            vec = ctx.mean(vec / config.grad_accum).tolist()
            done = step + 1
            metrics = {"step": done, "loss": vec[0], "lr": lr, "grad_norm": grad_norm}
            metrics.update(zip(keys, vec[1:]))
            metrics["time_s"] = time.perf_counter() - t0
            if done % config.log_every == 0 or done == config.steps:
                log.write(metrics)
                history.append(dict(metrics))
            if eval_fn is not None and (
                (config.eval_every is not None and done % config.eval_every == 0) or done == config.steps
            ):
                last_eval = evaluate(done)
                record = {"step": done, "eval": last_eval, "time_s": time.perf_counter() - t0}
                log.write(record)
                history.append(record)
                metrics["eval"] = last_eval
            for cb in callbacks:
                cb(done, metrics)
            if ckdir is not None and (
                (config.checkpoint_every is not None and done % config.checkpoint_every == 0)
                or done == config.steps
            ):
                save_checkpoint(ckdir, done, **ckpt_kw)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{lr:.3g}", refresh=False)
        if start == config.steps and eval_fn is not None:
            last_eval = evaluate(start)  # already complete: report, log nothing
    finally:
        log.close()
        if bar is not None:
            bar.close()
        model.train(was_training)
    return TrainResult(step=config.steps, history=history, last_eval=last_eval, resumed_from=resumed_from, model=model)
