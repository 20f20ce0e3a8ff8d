"""Process-group set-up, model wrapping (DDP / FSDP2) and the few collectives the loop uses."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "full_state", "setup", "wrap_model"]


@dataclass
class DistContext:
    strategy: str  # "none" | "ddp" | "fsdp2"
    rank: int = 0
    world_size: int = 1
    created_group: bool = False  # we initialised the default group, so we destroy it
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # for collectives

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of a 1-D float64 tensor over ranks (identity when off)."""
        if not self.enabled or self.world_size == 1:
            return values
        t = values.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return (t / self.world_size).cpu()

    def all_equal(self, value: int) -> bool:
        if not self.enabled or self.world_size == 1:
            return True
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0]) == value and int(-t[1]) == value

    def gather_bytes(self, t: torch.Tensor) -> list[torch.Tensor]:
        """All ranks' 1-D uint8 tensors (sizes may differ between ranks)."""
        t = t.contiguous().view(torch.uint8).flatten()
        if not self.enabled or self.world_size == 1:
            return [t.cpu()]
        n = torch.tensor([t.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: t.numel()] = t.to(self.device)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [o[: int(s)].cpu() for o, s in zip(out, sizes)]

    def finish(self, clean: bool = True) -> None:
        """Destroy the default group if we created it. After a clean run every rank first
        meets at a barrier, so no rank tears gloo/nccl down while another still has a
        collective in flight (an early teardown can abort the other process)."""
        if self.created_group and dist.is_initialized():
            # free collectives' Work objects kept alive by cycles (DDP's reducer) while the
            # group exists: destroying them later, during interpreter finalization, can abort
            gc.collect()
            if clean and self.enabled:
                dist.barrier()
            dist.destroy_process_group()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def setup(strategy: str, device: torch.device) -> DistContext:
    """Resolve ``config.distributed`` and initialise the default process group from the
    torchrun environment when needed (``nccl`` for CUDA models, ``gloo`` otherwise)."""
    if strategy == "auto":
        world = _env_int("WORLD_SIZE")
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        strategy = "ddp" if world is not None and world > 1 else "none"
    if strategy == "none":
        return DistContext("none")
    if not dist.is_available():
        raise RuntimeError(f"TrainConfig.distributed={strategy!r} but torch.distributed is not available")
    created = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"TrainConfig.distributed={strategy!r}: no process group is initialised and the "
                f"torchrun environment is incomplete (missing {', '.join(missing)}); launch with torchrun "
                "or call torch.distributed.init_process_group first"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    backend = str(dist.get_backend()).lower()
    coll = device if "nccl" in backend and device.type == "cuda" else torch.device("cpu")
    return DistContext(strategy, dist.get_rank(), dist.get_world_size(), created, coll)


def _fsdp_matcher(root: nn.Module, fsdp_modules) -> Callable[[nn.Module], bool]:
    """Which submodules get their own ``fully_shard`` (besides the root)."""
    if fsdp_modules is None:  # default: each direct child that has parameters
        children = {id(c) for c in root.children()}
        return lambda m: id(m) in children and any(True for _ in m.parameters())
    if isinstance(fsdp_modules, type) or (
        isinstance(fsdp_modules, tuple) and fsdp_modules and all(isinstance(c, type) for c in fsdp_modules)
    ):
        return lambda m: isinstance(m, fsdp_modules)
    if callable(fsdp_modules):
        return lambda m: bool(fsdp_modules(m))
    raise TypeError(
        "fsdp_modules must be None, a module class, a tuple of module classes or a callable "
        f"(module) -> bool, got {type(fsdp_modules).__name__}"
    )


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    device: torch.device,
    *,
    fsdp_modules=None,
    ddp_kwargs: dict | None = None,
) -> nn.Module:
    """Return the module ``loss_fn`` receives: ``model`` itself (none, FSDP2: sharded in
    place) or a ``DistributedDataParallel`` wrapper."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        kw = dict(ddp_kwargs or {})
        if device.type == "cuda":
            kw.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
        return DDP(model, **kw)
    if ctx.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ctx.world_size,))
        match = _fsdp_matcher(model, fsdp_modules)
        # innermost first: fully_shard a parent after its children, the root last
        targets = [m for name, m in model.named_modules() if name and match(m)]
        for m in reversed(targets):
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def full_state(model: nn.Module, *, trainable_only: bool = False, device="cpu") -> dict[str, torch.Tensor]:
    """The model's state (parameters and persistent buffers, by name) as full, plain tensors
    on ``device``, on every rank.

    Works for plain, DDP-wrapped (the ``module.`` prefix is dropped) and FSDP2-sharded
    models; for FSDP2 the DTensor shards are all-gathered, so every rank must call it while
    the process group is alive: :func:`~semisparse.train.train` destroys a group it created
    itself, so initialise the group yourself (``torch.distributed.init_process_group``)
    before ``train`` when you want to call this afterwards. ``trainable_only`` keeps only
    parameters with ``requires_grad``."""
    from torch.distributed.tensor import DTensor

    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if trainable_only and name not in trainable:
            continue
        t = t.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        out[name] = t.to(device, copy=True)
    return out
