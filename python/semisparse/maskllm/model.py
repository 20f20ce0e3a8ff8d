"""Model-level MaskLLM: put learnable masks on a model's Linear layers, read the learned
masks, take them off again, and store per-task masks compactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..io import load_tensors, save_tensors
from ..ops.gumbel import num_patterns, pattern_table
from ..pruning.calibration import find_blocks
from ..pruning.patterns import parse_pattern
from ..sparsify import SparsifyReport, name_matches, name_patterns, sparsify
from .layer import MaskLLMLinear, SamplingState, layer_seed, pattern_index

__all__ = [
    "add_masks",
    "mask_layers",
    "sampling_state",
    "learned_masks",
    "remove_masks",
    "export",
    "masks_disabled",
    "changed_fraction",
    "pack_masks",
    "unpack_masks",
    "save_task_masks",
    "load_task_masks",
    "set_masks",
    "apply_task_masks",
    "TASK_MASKS_FORMAT",
]

TASK_MASKS_FORMAT = "semisparse.task_masks"


def _nm(pattern) -> tuple[int, int]:
    p = parse_pattern(pattern)
    if not p.structured or not 1 <= p.n < p.m <= 8:
        raise ValueError(f"maskllm: pattern must be N:M with 1 <= N < M <= 8 (e.g. '2:4'), got {pattern!r}")
    return p.n, p.m


def _select(model: nn.Module, targets, exclude, m: int) -> tuple[list[tuple[str, nn.Linear]], dict[str, str]]:
    """Linear layers to mask: ``targets`` name patterns (default: every Linear inside the
    model's repeated blocks, or every Linear when there are none), minus ``exclude``."""
    targets, exclude = name_patterns(targets, "targets", "maskllm"), name_patterns(exclude, "exclude", "maskllm") or []
    owners: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    if targets is None:
        blocks_name, _ = find_blocks(model)
        prefix = f"{blocks_name}." if blocks_name else ""
        chosen = [(n, mod) for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.startswith(prefix)]
    else:
        chosen = [
            (n, mod) for n, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and any(name_matches(n, p) for p in targets)
        ]
        if not chosen:
            raise ValueError(f"maskllm: targets {targets} match no nn.Linear layer of the model")
    layers, skipped = [], {}
    for name, mod in chosen:
        if any(name_matches(name, p) for p in exclude):
            continue
        if isinstance(mod, MaskLLMLinear):
            continue
        if mod.in_features % m:
            skipped[name] = f"in_features={mod.in_features} is not a multiple of {m}"
        elif owners.get(id(mod.weight), 1) > 1:
            skipped[name] = "its weight is shared with another module (tied)"
        else:
            layers.append((name, mod))
    return layers, skipped


def add_masks(
    model: nn.Module,
    pattern: str = "2:4",
    *,
    prior: Mapping[str, torch.Tensor] | None = None,
    alpha: float = 3.0,
    init_std: float = 0.01,
    targets=None,
    exclude=None,
    train_weights: bool = False,
    logits_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    strict_prior: bool = True,
) -> dict[str, str]:
    """Replace the selected ``nn.Linear`` layers of ``model`` (in place) by
    :class:`MaskLLMLinear` sharing their weights. Returns ``{name: reason}`` of the selected
    layers left alone. The model's other parameters are frozen unless ``train_weights``.

    ``prior``: ``{layer name: bool n:m mask}`` (a one-shot method's masks from
    :func:`semisparse.prune`, or learned masks for transfer); with ``strict_prior`` every
    masked layer must have one. ``seed`` fixes the logits' initialisation and the noise.
    Every other parameter of the model is frozen (``requires_grad=False``); with
    ``train_weights`` the masked layers' weights and biases train with the logits.
    """
    n, m = _nm(pattern)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"maskllm: alpha (prior strength) must be a finite number >= 0, got {alpha!r}")
    if not (isinstance(init_std, (int, float)) and init_std > 0):
        raise ValueError(f"maskllm: init_std must be > 0, got {init_std!r}")
    if logits_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"maskllm: logits_dtype must be a floating dtype, got {logits_dtype}")
    existing = mask_layers(model)
    state = next(iter(existing.values())).state if existing else SamplingState()
    layers, skipped = _select(model, targets, exclude, m)
    if not layers and not existing:
        raise ValueError(f"maskllm: no Linear layer to mask (skipped: {skipped or 'none selected'})")
    if prior is not None:
        unknown = sorted(set(prior) - {name for name, _ in layers} - set(existing))
        if unknown:
            raise ValueError(f"maskllm: the prior has masks for layers that are not masked: {unknown[:5]}")
        missing = [name for name, _ in layers if name not in prior]
        if missing and strict_prior:
            raise ValueError(f"maskllm: the prior has no mask for {len(missing)} layer(s), e.g. {missing[:3]}")
    # everything but the logits is frozen; with train_weights the masked layers' own
    # weights and biases train too (remove_masks restores the flags found by the first call)
    if not existing:
        state.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for mod in existing.values():  # layers masked by an earlier call keep training
        mod.logits.requires_grad_(True)
        for p in (mod.weight, mod.bias):
            if p is not None:
                p.requires_grad_(train_weights)
    gen = torch.Generator().manual_seed(int(seed))
    start = len(existing)
    for i, (name, lin) in enumerate(layers):
        pm = None if prior is None else prior.get(name)
        layer = MaskLLMLinear.from_linear(
            lin, n=n, m=m, state=state, seed=layer_seed(seed, start + i), init_std=init_std, prior=pm,
            alpha=alpha, train_weight=train_weights, logits_dtype=logits_dtype, generator=gen,
        )
        layer.train(lin.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return skipped


def mask_layers(model: nn.Module) -> dict[str, MaskLLMLinear]:
    """``{name: MaskLLMLinear}`` of the model, in module order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, MaskLLMLinear)}


def sampling_state(model: nn.Module) -> SamplingState:
    layers = mask_layers(model)
    if not layers:
        raise ValueError("maskllm: the model has no mask layers (call maskllm.add_masks first)")
    return next(iter(layers.values())).state


def learned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The final masks: ``{layer name: bool [out, in]}`` (argmax of every group's logits),
    in the format :func:`semisparse.prune` returns and :func:`semisparse.sparsify` takes."""
    return {name: mod.mask() for name, mod in mask_layers(model).items()}


def remove_masks(model: nn.Module, apply: bool = True) -> dict[str, torch.Tensor]:
    """Put plain ``nn.Linear`` layers back (in place): with ``W * mask`` when ``apply``,
    the untouched dense ``W`` otherwise, and restore the ``requires_grad`` flags the model's
    parameters had before :func:`add_masks`. Returns the learned masks."""
    masks = {}
    layers = mask_layers(model)
    before = next(iter(layers.values())).state.requires_grad_before if layers else {}
    for name, mod in layers.items():
        masks[name] = mod.mask()
        lin = mod.to_linear(apply_mask=apply)
        lin.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lin)
    for n, p in model.named_parameters():  # the requires_grad flags add_masks found
        if n in before:
            p.requires_grad_(before[n])
    return masks


def export(model: nn.Module) -> SparsifyReport:
    """Finish: apply the learned masks and swap the layers for compressed
    :class:`~semisparse.nn.SparseLinear` (2:4 only; other N:M patterns stay dense Linear
    with zeros). Returns the sparsify report."""
    layers = mask_layers(model)
    if not layers:
        raise ValueError("maskllm.export: the model has no mask layers")
    nm = {(mod.n, mod.m) for mod in layers.values()}
    masks = remove_masks(model, apply=True)
    if nm != {(2, 4)}:
        return SparsifyReport(skipped={k: f"pattern {nm} has no compressed kernel (2:4 only)" for k in masks})
    return sparsify(model, masks=masks, targets=list(masks))


@contextlib.contextmanager
def masks_disabled(model: nn.Module):
    """Compute with the dense weights inside the block (e.g. the teacher of distillation)."""
    st = sampling_state(model)
    prev = st.enabled
    st.enabled = False
    try:
        yield model
    finally:
        st.enabled = prev


def changed_fraction(masks: Mapping[str, torch.Tensor], prior: Mapping[str, torch.Tensor], m: int = 4) -> dict[str, float]:
    """Per layer, the fraction of groups whose pattern differs from the prior's."""
    out = {}
    for name, mk in masks.items():
        if name not in prior:
            continue
        a = mk.reshape(-1, m)
        b = prior[name].to(mk.device).bool().reshape(-1, m)
        out[name] = float((a != b).any(-1).float().mean())
    return out


# ------------------------------------------------------------ compact task masks
def _digits_per_byte(c: int) -> int:
    return max(1, int(math.floor(math.log(256) / math.log(c) + 1e-12)))


def pack_masks(masks: Mapping[str, torch.Tensor], pattern: str = "2:4") -> tuple[dict[str, torch.Tensor], dict]:
    """Encode n:m masks as the candidate index of every group, ``d`` base-``C`` digits per
    byte (``C = C(m, n)``; 2:4: C = 6, 3 groups per byte = 0.667 bits per weight).
    Returns ``(tensors, header)`` for :func:`unpack_masks`."""
    n, m = _nm(pattern)
    c = num_patterns(n, m)
    d = _digits_per_byte(c)
    tensors, entries = {}, {}
    for name, mk in masks.items():
        idx = pattern_index(torch.as_tensor(mk).bool().cpu(), n, m, where=f"mask {name!r}").numpy().astype(np.int64)
        g = idx.size
        pad = (-g) % d
        digits = np.concatenate([idx, np.zeros(pad, dtype=np.int64)]).reshape(-1, d)
        weights = c ** np.arange(d, dtype=np.int64)
        packed = (digits * weights).sum(-1).astype(np.uint8)
        tensors[name] = torch.from_numpy(packed)
        entries[name] = {"shape": list(mk.shape), "groups": int(g)}
    header = {"format": TASK_MASKS_FORMAT, "version": 1, "n": n, "m": m, "digits_per_byte": d, "masks": entries}
    return tensors, header


def unpack_masks(tensors: Mapping[str, torch.Tensor], header: Mapping, device="cpu") -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_masks`."""
    if header.get("format") != TASK_MASKS_FORMAT:
        raise ValueError(f"not a semisparse task-masks file (format={header.get('format')!r})")
    n, m, d = int(header["n"]), int(header["m"]), int(header["digits_per_byte"])
    c = num_patterns(n, m)
    if d != _digits_per_byte(c):
        raise ValueError(f"task masks: digits_per_byte={d} does not match {n}:{m} (expected {_digits_per_byte(c)})")
    table = pattern_table(n, m, dtype=torch.bool)
    out = {}
    for name, entry in header["masks"].items():
        if name not in tensors:
            raise ValueError(f"task masks: the header names {name!r} but the file has no such tensor")
        shape, g = list(entry["shape"]), int(entry["groups"])
        packed = tensors[name].numpy().astype(np.int64)
        if packed.size != (g + d - 1) // d or math.prod(shape) != g * m:
            raise ValueError(f"task masks: {name!r}: {packed.size} bytes do not hold {g} groups of shape {shape}")
        if packed.size and int(packed.max()) >= c**d:
            raise ValueError(f"task masks: {name!r} holds a byte >= {c ** d}, not {d} base-{c} digits (corrupted)")
        digits = (packed[:, None] // (c ** np.arange(d, dtype=np.int64))) % c
        idx = torch.from_numpy(digits.reshape(-1)[:g].copy())
        out[name] = table[idx].reshape(shape).to(device)
    return out


def save_task_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike, pattern: str = "2:4", metadata: Mapping | None = None) -> None:
    """Write masks compactly (see :func:`pack_masks`) to one safetensors file, atomically."""
    tensors, header = pack_masks(masks, pattern)
    header["metadata"] = dict(metadata or {})
    save_tensors(tensors, path, header)


def load_task_masks(path: str | os.PathLike, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read :func:`save_task_masks`' file: ``(masks, metadata)``."""
    tensors, header = load_tensors(path)
    masks = unpack_masks(tensors, header, device=device)
    return masks, header.get("metadata", {})


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Make ``masks`` the final masks of the model's mask layers (logits set to select them)."""
    layers = mask_layers(model)
    unknown = sorted(set(masks) - set(layers))
    if unknown:
        raise ValueError(f"maskllm.set_masks: no mask layer named {unknown[:5]}")
    for name, mk in masks.items():
        layers[name].set_mask(mk)


def apply_task_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], *, compress: bool = False, inplace: bool = False) -> nn.Module:
    """A copy of the dense ``model`` (or the model itself with ``inplace``) with ``masks``
    applied (weights zeroed outside them); ``compress=True`` also swaps the layers for
    :class:`~semisparse.nn.SparseLinear`. The dense model is left untouched unless
    ``inplace``, so one set of dense weights serves every task's masks."""
    from ..masks import apply_masks

    out = model if inplace else copy.deepcopy(model)
    apply_masks(out, masks)
    if compress:
        sparsify(out, masks=dict(masks), targets=list(masks))
    return out
