"""Running a model block by block on calibration data.

The pieces ``prune`` uses for the calibrated methods:

- :func:`find_blocks`: the model's repeated blocks (``model.layers``, ``transformer.h``...).
- :func:`calibration_samples`: the ``calib`` argument as a list of single-sequence samples.
- :func:`capture_block_inputs`: one model forward per sample that records what every block
  is called with (hidden states, attention masks, position embeddings, ...) while running
  only the first block.
- :class:`BlockRunner`: re-runs one block on every sample, with the recorded arguments.
- :func:`calibration_mode`: eval mode, no caches, no autograd; restored on exit.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Sample",
    "find_blocks",
    "is_prunable",
    "is_conv1d",
    "calibration_samples",
    "calibration_mode",
    "capture_block_inputs",
    "BlockInputs",
    "module_device",
]

CALIB_HELP = (
    "calib must be a tensor [n, seqlen] of token ids (n samples, each passed to the model as "
    "model(ids[i:i+1])), or an iterable of such tensors or of dicts of model inputs "
    "(input_ids, attention_mask, ...)"
)


# ------------------------------------------------------------------ layers
def is_conv1d(mod: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2): a linear layer storing ``[in, out]``.
    Looked up without importing transformers: a model holding one has imported it."""
    utils = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(utils, "Conv1D", None) if utils is not None else None
    return cls is not None and isinstance(mod, cls)


def is_prunable(mod: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a transformers ``Conv1D``."""
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def find_blocks(model: nn.Module) -> tuple[str | None, nn.ModuleList | None]:
    """The model's list of repeated blocks: among the ``nn.ModuleList`` s whose children all
    have one class and each hold a Linear/Conv1D layer, the one with the most parameters
    (ties: the first in module order). ``(None, None)`` when there is none."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(c) for c in mod}
        if len(kinds) != 1:
            continue
        if not all(any(is_prunable(s) for s in c.modules()) for c in mod):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    return (best[1], best[2]) if best is not None else (None, None)


def module_device(mod: nn.Module, default: torch.device | None = None) -> torch.device:
    for t in mod.parameters():
        return t.device
    for t in mod.buffers():
        return t.device
    return default if default is not None else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its input embeddings' device, else its first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Module):
            return module_device(emb, module_device(model))
    return module_device(model)


# ----------------------------------------------------------------- samples
@dataclass
class Sample:
    """One calibration sample: the model is called as ``model(*args, **kwargs)``.
    ``token_mask`` (bool ``[1, seqlen]``, on CPU) marks the real tokens when the sample has
    an ``attention_mask``: statistics skip padding."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


def _rows_of_tensor(t: torch.Tensor, where: str) -> list[Sample]:
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"prune: {where}: expected a non-empty tensor [n, seqlen], got shape {tuple(t.shape)}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    return [Sample(args=(t[i : i + 1],)) for i in range(t.shape[0])]


def _rows_of_dict(d: Mapping, where: str) -> list[Sample]:
    key = next((k for k in ("input_ids", "inputs_embeds") if isinstance(d.get(k), torch.Tensor)), None)
    if key is None:
        raise ValueError(f"prune: {where}: a dict of model inputs needs an 'input_ids' tensor; got keys {sorted(d)}")
    lead = d[key]
    if lead.dim() == 0 or lead.numel() == 0:
        raise ValueError(f"prune: {where}: '{key}' must be a non-empty [n, seqlen] tensor, got shape {tuple(lead.shape)}")
    single = lead.dim() == (1 if key == "input_ids" else 2)
    d = {k: (v.unsqueeze(0) if single and isinstance(v, torch.Tensor) and v.dim() >= 1 else v) for k, v in d.items()}
    b = d[key].shape[0]
    out = []
    for i in range(b):
        kw = {
            k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v)
            for k, v in d.items()
        }
        am = kw.get("attention_mask")
        tm = None
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            tm = am.detach().to("cpu") != 0
        out.append(Sample(kwargs=kw, token_mask=tm))
    return out


def calibration_samples(calib) -> list[Sample]:
    """Normalise ``calib`` to a list of samples of batch 1 (every row of every tensor/dict
    becomes one sample, so the model always runs on one sequence at a time).

    Accepts a tensor ``[n, seqlen]`` (token ids; ``[seqlen]`` is one sample; any tensor
    is passed positionally, so a float tensor works for models taking features), a dict
    of model inputs (a tokenizer's ``BatchEncoding``), or an iterable of either.
    """
    if calib is None:
        raise ValueError(f"prune: this method needs calibration data; {CALIB_HELP}")
    if isinstance(calib, torch.Tensor):
        samples = _rows_of_tensor(calib, "calib")
    elif isinstance(calib, Mapping):
        samples = _rows_of_dict(calib, "calib")
    elif isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise ValueError(f"prune: {CALIB_HELP}; got {type(calib).__name__}")
    else:
        samples = []
        for i, item in enumerate(calib):
            if isinstance(item, torch.Tensor):
                samples += _rows_of_tensor(item, f"calib[{i}]")
            elif isinstance(item, Mapping):
                samples += _rows_of_dict(item, f"calib[{i}]")
            else:
                raise ValueError(f"prune: {CALIB_HELP}; calib[{i}] is a {type(item).__name__}")
    if not samples:
        raise ValueError(f"prune: calib holds no samples; {CALIB_HELP}")
    return samples


# -------------------------------------------------------------- structures
def to_device(obj, device):
    """``obj`` with every tensor in nested tuples/lists/dicts moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        items = [to_device(o, device) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _is_cache(obj) -> bool:
    return any(c.__name__.endswith("Cache") for c in type(obj).__mro__)


class _Store:
    """Keeps the recorded block arguments on ``device``: a tensor met twice in one sample
    (the same mask passed to every block) is stored once, and one equal to a recently
    stored tensor (the same position embeddings for every sample) reuses it."""

    def __init__(self, device):
        self.device = device
        self.memo: dict[int, tuple[object, torch.Tensor]] = {}
        self.recent: dict[tuple, list[torch.Tensor]] = {}

    def new_sample(self):
        self.memo = {}

    def put(self, obj):
        if isinstance(obj, torch.Tensor):
            if id(obj) in self.memo:
                return self.memo[id(obj)][1]
            t = obj.detach().to(self.device)
            key = (tuple(t.shape), t.dtype)
            for cand in self.recent.get(key, ()):
                if torch.equal(cand, t):
                    t = cand
                    break
            else:
                lst = self.recent.setdefault(key, [])
                lst.insert(0, t)
                del lst[4:]
            self.memo[id(obj)] = (obj, t)  # holding obj keeps its id unique
            return t
        if _is_cache(obj):
            return None
        if isinstance(obj, tuple):
            items = [self.put(o) for o in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
        if isinstance(obj, list):
            return [self.put(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.put(v) for k, v in obj.items()}
        return obj


def hidden_of(out):
    """The hidden states a block returns: the output itself, or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple"):
        first = out[0]
        if isinstance(first, torch.Tensor):
            return first
    raise TypeError(f"prune: cannot find the hidden states in a block's output of type {type(out).__name__}")


# ----------------------------------------------------------------- capture
class _Captured(Exception):
    """Raised inside the model once every block's arguments are recorded."""


@dataclass
class BlockInputs:
    """What the blocks are called with, per sample.

    ``hidden[i]``: the first block's input hidden states for sample ``i`` (replaced by
    each block's outputs as the blocks are processed). ``calls[k][i]``: ``(args, kwargs,
    slot)`` for block ``k``: the other arguments, with ``slot`` the position
    (int) or keyword (str) of the hidden states. ``order``: the block indices in the order
    the model calls them.
    """

    hidden: list[torch.Tensor]
    calls: dict[int, list[tuple[tuple, dict, int | str]]]
    order: list[int]


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict, int | str]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], (None,) + tuple(args[1:]), dict(kwargs), 0
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        kw = dict(kwargs)
        h = kw.pop("hidden_states")
        return h, tuple(args), kw, "hidden_states"
    raise TypeError(
        "prune: a block was called without a tensor first argument or a 'hidden_states' keyword; "
        "cannot tell which argument carries the hidden states"
    )


def _sanitize_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if k in _CACHE_KWARGS:
            v = None
        elif k == "use_cache":
            v = False
        out[k] = v
    return out


def call_model(model: nn.Module, sample: Sample, device) -> object:
    return model(*to_device(sample.args, device), **to_device(sample.kwargs, device))


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, samples: list[Sample], device, store_device
) -> BlockInputs:
    """Run the model once per sample, recording every block's call arguments.

    Every block's ``forward`` is temporarily replaced by a recorder. The first block the
    model calls runs for real (so the model receives a well-formed output); the others
    record their arguments and return that same output, and once all blocks are recorded
    a private exception stops the forward (so the head and the later blocks do not run).
    Recording each block's own arguments (not only the first block's) matters for models
    that pass different masks to different blocks (sliding-window layers). Caches in the
    arguments are dropped and ``use_cache`` is set to False.
    """
    n = len(blocks)
    store = _Store(store_device)
    hidden: list[torch.Tensor] = []
    calls: dict[int, list] = {k: [] for k in range(n)}
    order: list[int] = []
    state: dict = {}

    def recorder(k, forward):
        def record(*args, **kwargs):
            rec = state["rec"]
            if k not in rec:
                rec[k] = (args, kwargs)
                state["order"].append(k)
            if state["template"] is None:
                state["template"] = forward(*args, **kwargs)
            if len(rec) == n:
                raise _Captured
            return state["template"]

        return record

    saved = []
    try:
        for k, blk in enumerate(blocks):
            saved.append((blk, "forward" in blk.__dict__, blk.__dict__.get("forward")))
            blk.forward = recorder(k, blk.forward)
        for i, sample in enumerate(samples):
            state.update(rec={}, order=[], template=None)
            store.new_sample()
            try:
                call_model(model, sample, device)
            except _Captured:
                pass
            rec, seen = state["rec"], state["order"]
            state.clear()
            if not seen:
                raise RuntimeError(f"prune: the model's forward on calibration sample {i} called none of its blocks")
            if i == 0:
                order = seen
            elif seen != order:
                raise RuntimeError(
                    f"prune: the model called its blocks in a different order on sample {i} "
                    f"({seen}) than on sample 0 ({order})"
                )
            for k in order:
                args, kwargs = rec[k]
                h, rest, kw, slot = _split_hidden(args, kwargs)
                if k == order[0]:
                    hidden.append(h.detach().to(store_device, copy=True))
                calls[k].append((store.put(rest), store.put(_sanitize_kwargs(kw)), slot))
            del rec
    finally:
        for blk, had, fwd in saved:
            if had:
                blk.forward = fwd
            else:
                blk.__dict__.pop("forward", None)
    return BlockInputs(hidden=hidden, calls={k: v for k, v in calls.items() if v}, order=order)


def run_block(block: nn.Module, h: torch.Tensor, call: tuple[tuple, dict, int | str], device) -> torch.Tensor:
    """Run ``block`` on hidden states ``h`` (copied to ``device``) with a recorded call."""
    args, kwargs, slot = call
    h = h.to(device, copy=True)  # a copy: a block that edits its input in place cannot corrupt the stored one
    args = list(to_device(args, device))
    kwargs = to_device(kwargs, device)
    if isinstance(slot, int):
        args[slot] = h
    else:
        kwargs[slot] = h
    return hidden_of(block(*args, **kwargs))


# -------------------------------------------------------------------- mode
@contextmanager
def calibration_mode(model: nn.Module):
    """Eval mode (no dropout), ``use_cache=False`` on every config found, ``torch.no_grad``;
    each module's training flag and each config's ``use_cache`` are restored on exit,
    also on error."""
    modes = [(m, m.training) for m in model.modules()]
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache") and all(cfg is not c for c, _ in configs):
            configs.append((cfg, cfg.use_cache))
    try:
        model.eval()
        for cfg, _ in configs:
            cfg.use_cache = False
        with torch.no_grad():
            yield
    finally:
        for cfg, v in configs:
            cfg.use_cache = v
        for m, t in modes:
            m.training = t
