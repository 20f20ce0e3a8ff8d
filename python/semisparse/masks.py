"""Pruning masks on disk: bit-packed (8 masks entries per byte) in one safetensors file with
a JSON header; written atomically, never unpickled.

A mask is a bool tensor of the shape of the module's ``weight`` (``True`` = kept), keyed by
module name, as :func:`semisparse.prune` returns them: ``nn.Linear`` ``[out, in]``,
``transformers`` ``Conv1D`` ``[in, out]`` (its weight is stored transposed, so its N:M
groups run along dim 0).

File layout: one ``uint8`` tensor per mask, named like the module, holding the mask's
bits flattened in row-major order, least significant bit first
(``numpy.packbits(..., bitorder="little")``), the unused high bits of the last byte
zero. The ``"semisparse"`` header entry is JSON::

    {"format": "semisparse.masks", "version": 1,
     "masks": {"model.layers.0.mlp.up_proj": {"shape": [64, 32], "kept": 1024}, ...},
     "pattern": "2:4", "method": "wanda",            # when given
     "metadata": {...}}                              # the caller's metadata
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .io import load_tensors, save_tensors

__all__ = ["save_masks", "load_masks", "apply_masks", "MASKS_FORMAT"]

MASKS_FORMAT = "semisparse.masks"
_VERSION = 1


def _as_bool(mask, name: str, where: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: mask {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask.detach()
    if mask.is_complex():
        raise TypeError(f"{where}: mask {name!r} must be bool (or 0/1), got dtype {mask.dtype}")
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        v = mask[bad].flatten()[0].item()
        raise ValueError(f"{where}: mask {name!r} ({mask.dtype}) must hold only 0 and 1 (or be bool), found {v}")
    return mask.detach() != 0


def _merge_metadata(metadata, pattern, method, where: str) -> dict:
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where}: metadata must be a dict, got {type(metadata).__name__}")
    metadata = dict(metadata)
    for key, value in (("pattern", pattern), ("method", method)):
        if value is None:
            continue
        if key in metadata and metadata[key] != value:
            raise ValueError(f"{where}: {key}={value!r} conflicts with metadata[{key!r}]={metadata[key]!r}")
        metadata[key] = value
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where}: metadata must be JSON-serialisable: {e}") from None
    return metadata


def save_masks(
    masks: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping | None = None,
    *,
    pattern: str | None = None,
    method: str | None = None,
) -> None:
    """Write ``masks`` (``{module name: bool tensor}``, any shapes) to ``path`` as one
    bit-packed safetensors file, atomically (temp file + fsync + rename).

    ``metadata`` (a JSON-serialisable dict) is stored as is; its ``"pattern"`` and
    ``"method"`` entries (or the ``pattern`` / ``method`` arguments, which must not
    contradict them) are also written at the top of the header. Masks may be bool or hold
    only 0 and 1. :func:`load_masks` returns exactly these masks and metadata.
    """
    where = "save_masks"
    if not isinstance(masks, Mapping):
        raise TypeError(f"{where}: masks must be a dict {{module name: bool tensor}}, got {type(masks).__name__}")
    if not masks:
        raise ValueError(f"{where}: masks is empty: nothing to save")
    metadata = _merge_metadata(metadata, pattern, method, where)
    tensors, entries = {}, {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where}: mask names must be non-empty strings, got {name!r}")
        m = _as_bool(mask, name, where).cpu().contiguous()
        packed = np.packbits(m.reshape(-1).numpy(), bitorder="little")
        tensors[name] = torch.from_numpy(packed)
        entries[name] = {"shape": list(m.shape), "kept": int(m.sum())}
    header = {"format": MASKS_FORMAT, "version": _VERSION, "masks": entries, "metadata": metadata}
    for key in ("pattern", "method"):
        if key in metadata:
            header[key] = metadata[key]
    save_tensors(tensors, path, header)


def load_masks(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_masks`: ``(masks, metadata)`` with bool masks of
    the saved shapes on ``device``, and the saved metadata dict.

    Raises :class:`FileNotFoundError` for a missing file and :class:`ValueError` for a file
    that is not a semisparse masks file (any other safetensors file, or not safetensors)
    or whose contents disagree with its header (truncated, wrong sizes, bit counts).
    """
    where = f"load_masks({os.fspath(path)})"
    tensors, header = load_tensors(path)
    if header.get("format") != MASKS_FORMAT:
        raise ValueError(
            f"{where}: not a semisparse masks file (header format={header.get('format')!r}, expected {MASKS_FORMAT!r})"
        )
    if not isinstance(header.get("version"), int) or header["version"] > _VERSION:
        raise ValueError(f"{where}: format version {header.get('version')!r}; this semisparse reads <= {_VERSION}")
    entries = header.get("masks")
    metadata = header.get("metadata", {})
    if not isinstance(entries, dict) or not isinstance(metadata, dict):
        raise ValueError(f"{where}: corrupted header: 'masks' and 'metadata' must be JSON objects")
    if set(entries) != set(tensors):
        missing, extra = sorted(set(entries) - set(tensors)), sorted(set(tensors) - set(entries))
        raise ValueError(f"{where}: header and tensors disagree: in the header only {missing}, tensors only {extra}")
    out = {}
    for name, entry in entries.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        kept = entry.get("kept") if isinstance(entry, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or not isinstance(kept, int)
        ):
            raise ValueError(f"{where}: corrupted header entry for {name!r}: {entry!r}")
        numel = math.prod(shape)
        packed = tensors[name]
        if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
            raise ValueError(
                f"{where}: mask {name!r}: expected {(numel + 7) // 8} packed bytes (uint8) for shape {tuple(shape)}, "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        arr = packed.numpy()
        if numel % 8 and arr[-1] >> (numel % 8):
            raise ValueError(f"{where}: mask {name!r}: padding bits of the last byte are set (corrupted file)")
        bits = np.unpackbits(arr, count=numel, bitorder="little").astype(bool)
        m = torch.from_numpy(bits).reshape(shape)
        if int(m.sum()) != kept:
            raise ValueError(f"{where}: mask {name!r} keeps {int(m.sum())} entries, the header says {kept} (corrupted)")
        out[name] = m.to(device)
    return out, metadata


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero, in place, the weights of ``model`` where their mask is ``False``
    (``weight.masked_fill_(~mask, 0)``; pruned entries become +0.0).

    Every name must be a module of ``model`` with a ``weight`` of the mask's shape. A
    weight shared with another module (tied embeddings) is refused: pruning it would
    silently prune the other module too.
    """
    where = "apply_masks"
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    todo = []
    for name, mask in masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: {name!r} is not a module of the model") from None
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{where}: module {name!r} ({type(mod).__name__}) has no weight tensor")
        m = _as_bool(mask, name, where)
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(
                f"{where}: mask {name!r} has shape {tuple(m.shape)}, the module's weight {tuple(w.shape)} "
                f"({type(mod).__name__}); masks have the weight's shape"
            )
        shared = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"{where}: the weight of {name!r} is shared with {', '.join(shared)}; not pruning it")
        todo.append((w, m))
    with torch.no_grad():
        for w, m in todo:
            w.masked_fill_(~m.to(w.device), 0)
