"""Training checkpoints: safetensors + JSON, written atomically, validated on load.

Layout of ``<checkpoint_dir>``::

    latest                      text file: the name of the newest complete checkpoint
    metrics.jsonl               (default metrics_path)
    step-00000100/
        model.safetensors       trainable parameters + persistent buffers, by name
        optimizer.safetensors   AdamW state: "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step"
        rng.safetensors         torch RNG states per rank: "rank<r>.cpu", "rank<r>.cuda<i>"
        extra.safetensors       tensors of extra_state.state_dict() (only when there are some)
        trainer.json            step, world size, config, param-group hyper-parameters,
                                JSON part of extra_state, format version

A checkpoint is first written to ``step-XXXXXXXX.tmp-<pid>`` and renamed into place once
complete (``trainer.json`` is its last file), then ``latest`` is replaced atomically. Readers
ignore ``*.tmp-*`` folders; a missing or corrupt ``latest`` falls back to the newest
complete ``step-*`` folder. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_write_bytes, load_tensors, save_tensors
from .config import RESULT_FIELDS, TrainConfig
from .distributed import DistContext

__all__ = [
    "FORMAT",
    "VERSION",
    "complete_checkpoints",
    "find_latest",
    "load_checkpoint",
    "read_trainer_json",
    "save_checkpoint",
    "step_dir_name",
]

FORMAT = "semisparse.train.checkpoint"
VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_RE = re.compile(r"^step-\d{8,}\.tmp-(\d+)$")
_OPTIM_FIELDS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(checkpoint_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint folder (one holding ``trainer.json``),
    oldest first. Temporary ``*.tmp-*`` folders are not listed."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and (entry / "trainer.json").is_file():
            out.append((int(m.group(1)), entry))
    return sorted(out)


def read_trainer_json(path) -> dict:
    """The parsed ``trainer.json`` of checkpoint folder ``path``; ValueError when it is
    missing, not JSON, or not a checkpoint of this format and version."""
    f = Path(path) / "trainer.json"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a complete checkpoint: no trainer.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not a semisparse training checkpoint (format {FORMAT!r} expected)")
    if meta.get("version") != VERSION:
        raise ValueError(f"{f}: unsupported checkpoint version {meta.get('version')!r} (this is version {VERSION})")
    return meta


def find_latest(checkpoint_dir) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names, else the newest complete
    ``step-*`` folder whose ``trainer.json`` reads; ``None`` when there is none."""
    root = Path(checkpoint_dir)
    named = None
    try:
        text = (root / "latest").read_text().strip()
        if _STEP_RE.match(text):
            named = root / text
    except (OSError, UnicodeDecodeError):
        pass
    if named is not None:
        try:
            read_trainer_json(named)
            return named
        except ValueError:
            pass
    candidates = complete_checkpoints(root)
    for _, path in reversed(candidates):
        try:
            read_trainer_json(path)
        except ValueError as e:
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
            continue
        if (root / "latest").exists():
            warnings.warn(f"{root / 'latest'} does not name a readable checkpoint; using {path.name}", stacklevel=2)
        return path
    return None


# ----------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune(root: Path, keep: int) -> None:
    for _, path in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for entry in root.iterdir():  # folders left by writers that were killed
        m = _TMP_RE.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def _write_dir(root: Path, step: int, files: dict[str, dict[str, torch.Tensor]], meta: dict, keep: int) -> Path:
    name = step_dir_name(step)
    final, tmp = root / name, root / f"{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for fname, tensors in files.items():
        if tensors or fname != "extra.safetensors":
            save_tensors(tensors, tmp / fname, metadata={"format": FORMAT, "step": step})
    atomic_write_bytes(tmp / "trainer.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    _fsync_dir(tmp)
    if final.exists():  # e.g. written by an earlier attempt whose `latest` update was lost
        aside = root / f"{name}.tmp-{os.getpid()}-old"
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_bytes(root / "latest", (name + "\n").encode())
    _prune(root, keep)
    return final


def _json_part(key: str, value):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"extra_state.state_dict()[{key!r}] is neither a tensor nor JSON-serialisable "
            f"({type(value).__name__}): {e}"
        ) from None
    return value


def _group_hparams(optimizer: torch.optim.Optimizer, names: list[list[str]]) -> list[dict]:
    out = []
    for g, gnames in zip(optimizer.param_groups, names):
        h = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        h["param_names"] = list(gnames)
        out.append(h)
    return out


def _rng_states(ctx: DistContext) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG states, gathered on all ranks (a collective)."""
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    if not ctx.all_equal(n_cuda):
        raise RuntimeError("ranks disagree on whether CUDA is initialised; cannot save RNG states")
    out = {}
    for r, t in enumerate(ctx.gather_bytes(torch.get_rng_state())):
        out[f"rank{r}.cpu"] = t
    for i in range(n_cuda):
        for r, t in enumerate(ctx.gather_bytes(torch.cuda.get_rng_state(i))):
            out[f"rank{r}.cuda{i}"] = t
    return out


def save_checkpoint(
    checkpoint_dir,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    buffer_names: list[str],
    ctx: DistContext,
    config: TrainConfig,
    extra_state=None,
) -> Path | None:
    """Write the checkpoint of ``step`` completed steps (a collective: every rank calls it;
    rank 0 writes). Returns the folder on rank 0, ``None`` elsewhere."""
    trainable = [n for names in group_names for n in names]
    if ctx.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        msd, osd = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        state = osd.get("state", {}) if ctx.rank == 0 else {}
        model_tensors = {n: msd[n] for n in trainable + buffer_names} if ctx.rank == 0 else {}
        optim_tensors = {
            f"{n}.{k}": (v if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
            for n in trainable
            for k, v in state.get(n, {}).items()
        }
    else:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        model_tensors = {n: params[n].detach() for n in trainable}
        model_tensors.update({n: buffers[n] for n in buffer_names})
        optim_tensors = {}
        for n in trainable:
            for k, v in optimizer.state.get(params[n], {}).items():
                optim_tensors[f"{n}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    rng = _rng_states(ctx)
    path = None
    if ctx.rank == 0:
        extra_tensors, extra_json = {}, None
        if extra_state is not None:
            extra_json = {}
            for k, v in extra_state.state_dict().items():
                if isinstance(v, torch.Tensor):
                    extra_tensors[k] = v
                else:
                    extra_json[k] = _json_part(k, v)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": ctx.world_size,
            "strategy": ctx.strategy,
            "config": config.to_dict(),
            "param_groups": _group_hparams(optimizer, group_names),
            "buffers": list(buffer_names),
            "extra": extra_json,
            "extra_tensors": sorted(extra_tensors),
            "torch_version": torch.__version__,
        }
        files = {
            "model.safetensors": model_tensors,
            "optimizer.safetensors": optim_tensors,
            "rng.safetensors": rng,
            "extra.safetensors": extra_tensors,
        }
        path = _write_dir(Path(checkpoint_dir), step, files, meta, config.keep_checkpoints)
    ctx.barrier()
    return path


# ----------------------------------------------------------------------------- loading
def _check_config(meta: dict, config: TrainConfig, ctx: DistContext, path: Path) -> None:
    saved, current = meta.get("config", {}), config.to_dict()
    for f in RESULT_FIELDS:
        if saved.get(f) != current[f]:
            raise ValueError(
                f"TrainConfig.{f}: this run has {current[f]!r} but checkpoint {path} was written with "
                f"{saved.get(f)!r}; resuming needs the same value (use another checkpoint_dir to start over)"
            )
    if meta.get("world_size") != ctx.world_size:
        raise ValueError(
            f"world_size: this run has {ctx.world_size} ranks but checkpoint {path} was written by "
            f"{meta.get('world_size')!r}; the data order depends on it, so resume with the same world size"
        )


def _check_groups(meta: dict, optimizer: torch.optim.Optimizer, group_names, path: Path) -> None:
    saved = meta.get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(group_names):
        n = len(saved) if isinstance(saved, list) else saved
        raise ValueError(f"params: checkpoint {path} has {n} param groups, this run has {len(group_names)}")
    for i, (s, g, names) in enumerate(zip(saved, optimizer.param_groups, group_names)):
        if s.get("param_names") != names:
            raise ValueError(
                f"params: param group {i} holds {s.get('param_names')} in checkpoint {path} but {names} in this run"
            )
        for key in ("weight_decay", "lr_scale"):
            if s.get(key) != g[key]:
                raise ValueError(
                    f"params: param group {i} has {key}={g[key]!r} but checkpoint {path} was written with {s.get(key)!r}"
                )


def _check_tensors(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, t in expected.items():
        if name not in saved:
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} (model shape {tuple(t.shape)}) is missing from model.safetensors"
            )
        s = saved[name]
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} has shape {tuple(s.shape)} in the checkpoint "
                f"but {tuple(t.shape)} in the model"
            )
        if s.dtype != t.dtype:
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} has dtype {s.dtype} in the checkpoint but {t.dtype} in the model"
            )
    for name, s in saved.items():
        if name not in expected:
            raise ValueError(
                f"checkpoint {path}: tensor {name!r} (shape {tuple(s.shape)}) is not a trainable "
                "parameter or persistent buffer of the model"
            )


def _optim_state(path: Path, tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> dict:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, _, field = key.rpartition(".")
        if name not in params or field not in _OPTIM_FIELDS:
            raise ValueError(
                f"checkpoint {path}: optimizer tensor {key!r} does not belong to a trainable parameter of this run"
            )
        if field != "step" and tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(
                f"checkpoint {path}: optimizer tensor {key!r} has shape {tuple(t.shape)} "
                f"but parameter {name!r} has shape {tuple(params[name].shape)}"
            )
        state.setdefault(name, {})[field] = t
    return state


def load_checkpoint(
    path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    buffer_names: list[str],
    ctx: DistContext,
    config: TrainConfig,
    extra_state=None,
) -> int:
    """Restore model tensors, optimizer state, this rank's RNG states and ``extra_state``
    from checkpoint folder ``path`` (every rank reads it); returns the step. Raises
    ValueError when the checkpoint does not fit this model, config or world size."""
    path = Path(path)
    meta = read_trainer_json(path)
    _check_config(meta, config, ctx, path)
    _check_groups(meta, optimizer, group_names, path)
    step = meta.get("step")
    if not isinstance(step, int) or not 0 <= step <= config.steps:
        raise ValueError(f"checkpoint {path}: step {step!r} is not in [0, steps={config.steps}]")

    model_t, _ = load_tensors(path / "model.safetensors")
    optim_t, _ = load_tensors(path / "optimizer.safetensors")
    rng_t, _ = load_tensors(path / "rng.safetensors")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = [n for names in group_names for n in names]
    expected = {n: params[n] for n in trainable}
    expected.update({n: buffers[n] for n in buffer_names})
    _check_tensors(path, model_t, expected)
    state = _optim_state(path, optim_t, {n: params[n] for n in trainable})

    if ctx.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g, names in zip(optimizer.param_groups, group_names)
        ]
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_t,
            optim_state_dict={"state": state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    else:
        with torch.no_grad():
            for name, t in model_t.items():
                expected[name].copy_(t)
        index = {n: i for i, n in enumerate(trainable)}
        groups, start = [], 0
        for g, names in zip(optimizer.param_groups, group_names):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + len(names)))})
            start += len(names)
        optimizer.load_state_dict({"state": {index[n]: s for n, s in state.items()}, "param_groups": groups})

    cpu_key = f"rank{ctx.rank}.cpu"
    if cpu_key not in rng_t:
        raise ValueError(f"checkpoint {path}: rng.safetensors has no {cpu_key!r}")
    torch.set_rng_state(rng_t[cpu_key])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            key = f"rank{ctx.rank}.cuda{i}"
            if key in rng_t:
                torch.cuda.set_rng_state(rng_t[key], i)

    if extra_state is not None:
        sd = dict(meta.get("extra") or {})
        names = meta.get("extra_tensors") or []
        if names:
            extra_t, _ = load_tensors(path / "extra.safetensors")
            sd.update({k: extra_t[k] for k in names})
        extra_state.load_state_dict(sd)
    return step
