"""Quality metrics of a (pruned) model: perplexity for language models, fidelity (cosine
similarity of the last hidden states to a dense reference) for encoders."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["perplexity", "fidelity", "perplexity_windows"]


# ------------------------------------------------------------------ helpers
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(*models: nn.Module):
    """Put the models in eval mode (no dropout) for the duration, then restore."""
    was = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, t in zip(models, was):
            m.train(t)


def _call_kwargs(model: nn.Module) -> dict:
    # Hugging Face models build a KV cache by default: useless here, and memory
    cfg = getattr(model, "config", None)
    return {"use_cache": False} if cfg is not None and hasattr(cfg, "use_cache") else {}


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"perplexity: the model returned {type(out).__name__}; expected an output with .logits "
        "(a causal language model) or a logits tensor"
    )


def _int_tokens(tokens, where: str) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{where}: tokens must be a LongTensor, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{where}: tokens must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2:
        raise ValueError(f"{where}: tokens must be [T] or [N, T], got shape {tuple(tokens.shape)}")
    return tokens.long()


def perplexity_windows(length: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the sliding-window perplexity of one sequence of ``length`` tokens:
    ``(begin, end, first)`` -- the model sees tokens ``[begin, end)`` and the targets
    ``[first, end)`` are scored (each predicted from the logits one position earlier).

    Every token but the first of the sequence is scored at most once; with
    ``stride == seqlen`` (non-overlapping windows) the first token of each window has no
    context in its window and is not scored, as in the Hugging Face recipe.
    """
    windows = []
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + seqlen, length)
        first = max(prev_end, begin + 1)
        if end > first:
            windows.append((begin, end, first))
        prev_end = end
        if end == length:
            break
    return windows


# --------------------------------------------------------------- perplexity
@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    stride: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    *,
    progress: bool = True,
) -> float:
    """Perplexity of a causal language model on ``tokens`` (``LongTensor[1, T]`` or
    ``[T]``; ``[N, T]`` is N independent sequences), by the Hugging Face "perplexity of
    fixed-length models" method.

    Windows of ``seqlen`` tokens start every ``stride`` tokens (default ``seqlen``:
    non-overlapping); in each window only the tokens not scored by an earlier window are
    scored (see :func:`perplexity_windows`), so a token is never counted twice and with
    ``stride < seqlen`` every scored token has at least ``seqlen - stride`` tokens of
    context. A trailing partial window is evaluated, not dropped. The cross-entropy of
    each token is computed from float32 logits and summed in float64; the result is
    ``exp(total / number of scored tokens)``. With ``seqlen >= T`` this is exactly the
    cross-entropy of the whole sequence in one pass.

    ``model(input_ids)`` must return ``.logits`` (``[B, L, vocab]``) or a logits tensor.
    ``batch_size`` windows of equal length run together. ``device``: where the tokens go
    (default: the device of the model's first parameter). The model is put in eval mode
    for the call (then restored) and run under ``torch.no_grad``.

    Note: the SparseGPT/Wanda scripts drop the trailing partial window and divide by
    ``nsamples * seqlen`` (counting the unscored first token of each window), so their
    numbers differ slightly from this one at ``stride == seqlen``.
    """
    where = "perplexity"
    tokens = _int_tokens(tokens, where)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"{where}: seqlen must be an integer >= 2, got {seqlen!r}")
    stride = seqlen if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= seqlen:
        raise ValueError(f"{where}: stride must be an integer in 1..seqlen={seqlen}, got {stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive integer, got {batch_size!r}")
    if tokens.shape[1] < 2:
        raise ValueError(f"{where}: need at least 2 tokens per sequence to score one, got shape {tuple(tokens.shape)}")
    device = torch.device(device) if device is not None else _model_device(model)

    windows = [(r, *w) for r in range(tokens.shape[0]) for w in perplexity_windows(tokens.shape[1], seqlen, stride)]
    # consecutive windows of the same length run as one batch
    batches: list[list[tuple[int, int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and (batches[-1][0][2] - batches[-1][0][1]) == (w[2] - w[1]):
            batches[-1].append(w)
        else:
            batches.append([w])

    kwargs = _call_kwargs(model)
    nll = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model), tqdm(total=len(windows), desc="perplexity", unit="window", disable=None if progress else True) as bar:
        for batch in batches:
            x = torch.stack([tokens[r, b:e] for r, b, e, _ in batch]).to(device)
            logits = _logits(model(x, **kwargs))
            if logits.shape[:2] != x.shape:
                raise ValueError(
                    f"{where}: the model returned logits of shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
                    "expected [batch, length, vocab]"
                )
            for i, (r, b, e, first) in enumerate(batch):
                pred = logits[i, first - 1 - b : e - 1 - b].float()
                target = x[i, first - b : e - b]
                ce = F.cross_entropy(pred, target, reduction="none")
                nll += ce.double().sum().cpu()
                count += e - first
            bar.update(len(batch))
    return math.exp(nll.item() / count)


# ----------------------------------------------------------------- fidelity
def _last_hidden(model: nn.Module, inputs: dict, state: dict) -> torch.Tensor:
    """The last hidden state of ``model(**inputs)``: ``.last_hidden_state``, else
    ``.hidden_states[-1]`` (asking for ``output_hidden_states=True`` when needed), else a
    tensor output."""
    kwargs = dict(inputs)
    if state.get("ask_hidden"):
        kwargs["output_hidden_states"] = True
    out = model(**kwargs)
    if isinstance(out, torch.Tensor):
        return out
    get = (lambda k: out.get(k)) if isinstance(out, Mapping) else (lambda k: getattr(out, k, None))
    h = get("last_hidden_state")
    if isinstance(h, torch.Tensor):
        return h
    hs = get("hidden_states")
    if hs is not None and len(hs):
        return hs[-1]
    if not state.get("ask_hidden"):
        state["ask_hidden"] = True
        return _last_hidden(model, inputs, state)
    raise TypeError(
        f"fidelity: {type(model).__name__} returned {type(out).__name__} without last_hidden_state or hidden_states"
    )


def _fidelity_batches(data, seqlen: int | None, batch_size: int) -> Iterable[dict]:
    if isinstance(data, torch.Tensor):
        ids = _int_tokens(data, "fidelity")
        if seqlen is None:
            chunks = [ids[i] for i in range(ids.shape[0])]
        else:
            chunks = [ids[r, s : s + seqlen] for r in range(ids.shape[0]) for s in range(0, ids.shape[1], seqlen)]
        batch: list[torch.Tensor] = []
        for c in chunks:
            if batch and (len(batch) == batch_size or batch[0].numel() != c.numel()):
                yield {"input_ids": torch.stack(batch)}
                batch = []
            batch.append(c)
        if batch:
            yield {"input_ids": torch.stack(batch)}
        return
    if isinstance(data, Mapping):
        raise TypeError("fidelity: pass a tensor of token ids or an iterable of batches (tensors or dicts), not one dict")
    for item in data:
        if isinstance(item, torch.Tensor):
            yield {"input_ids": _int_tokens(item, "fidelity")}
        elif isinstance(item, Mapping):
            if "input_ids" not in item and "inputs_embeds" not in item:
                raise ValueError(f"fidelity: a batch dict needs 'input_ids', got keys {list(item)}")
            yield dict(item)
        else:
            raise TypeError(f"fidelity: a batch must be a LongTensor or a dict of model inputs, got {type(item).__name__}")


@torch.no_grad()
def fidelity(
    model: nn.Module,
    reference_model: nn.Module,
    tokens_or_batches,
    *,
    seqlen: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Mean cosine similarity between the last hidden states of ``model`` (e.g. a pruned
    encoder) and ``reference_model`` (its dense original), over all token positions; 1.0
    means the same representations. For models without a language-model head (BERT, ViT
    encoders), where perplexity does not apply.

    ``tokens_or_batches``: a ``LongTensor`` ``[N, T]`` (or ``[T]``), cut into chunks of
    ``seqlen`` tokens (default: whole rows) and batched ``batch_size`` at a time; or an
    iterable of batches, each a ``LongTensor [B, L]`` or a dict of model inputs (e.g.
    with ``attention_mask``: padded positions, mask 0, are not counted).

    The last hidden state is ``output.last_hidden_state``, else
    ``output.hidden_states[-1]`` (with ``output_hidden_states=True``). Cosines are
    computed and averaged in float64. Inputs go to ``device`` (default: each model's own
    parameter device). Both models run in eval mode (restored afterwards), without
    gradients.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"fidelity: batch_size must be a positive integer, got {batch_size!r}")
    if seqlen is not None and (isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1):
        raise ValueError(f"fidelity: seqlen must be a positive integer or None, got {seqlen!r}")
    devs = [torch.device(device) if device is not None else _model_device(m) for m in (model, reference_model)]
    states: tuple[dict, dict] = ({}, {})
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    n_batches = None
    if isinstance(tokens_or_batches, torch.Tensor):
        n_batches = sum(1 for _ in _fidelity_batches(tokens_or_batches, seqlen, batch_size))
    with _eval_mode(model, reference_model), tqdm(total=n_batches, desc="fidelity", unit="batch",
                                                   disable=None if progress else True) as bar:
        for inputs in _fidelity_batches(tokens_or_batches, seqlen, batch_size):
            hs = []
            for m, dev, st in zip((model, reference_model), devs, states):
                moved = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                hs.append(_last_hidden(m, moved, st))
            a, b = hs
            if a.shape != b.shape:
                raise ValueError(
                    f"fidelity: hidden states of model {tuple(a.shape)} and reference {tuple(b.shape)} differ in shape"
                )
            cos = F.cosine_similarity(a.double(), b.to(a.device).double(), dim=-1)  # [B, L]
            mask = inputs.get("attention_mask")
            if mask is not None:
                keep = mask.to(cos.device).bool()
                if keep.shape != cos.shape:
                    raise ValueError(
                        f"fidelity: attention_mask shape {tuple(keep.shape)} does not match the hidden states "
                        f"{tuple(cos.shape[:2])}"
                    )
                cos = cos[keep]
            total += cos.sum().cpu()
            count += cos.numel()
            bar.update(1)
    if count == 0:
        raise ValueError("fidelity: no tokens to compare (empty input or all positions masked)")
    return total.item() / count
