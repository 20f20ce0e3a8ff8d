"""Token ids from text: calibration windows and evaluation streams."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["tokenize", "calibration_samples", "eval_tokens"]


def _is_hf_tokenizer(tok) -> bool:
    if "transformers" not in sys.modules:  # then tok cannot be one; don't pay the import
        return False
    from transformers import PreTrainedTokenizerBase

    return isinstance(tok, PreTrainedTokenizerBase)


def _is_raw_tokenizer(tok) -> bool:
    if "tokenizers" not in sys.modules:
        return False
    from tokenizers import Tokenizer

    return isinstance(tok, Tokenizer)


def _as_ids(ids, where: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{where}: token ids must be integers, got a {ids.dtype} tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"{where}: expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        return ids.detach().to(device="cpu", dtype=torch.long)
    if isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if len(ids) == 1 and isinstance(ids[0], Sequence) and not isinstance(ids[0], (str, bytes)):
            ids = ids[0]  # a batch of one
        bad = next((x for x in ids if not isinstance(x, int) or isinstance(x, bool)), None)
        if bad is not None:
            raise TypeError(f"{where}: token ids must be ints, found {type(bad).__name__} {bad!r}")
        return torch.tensor(list(ids), dtype=torch.long)
    raise TypeError(f"{where}: expected token ids (a list of ints or a tensor), got {type(ids).__name__}")


def tokenize(text: str, tokenizer, *, add_special_tokens: bool = True) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``torch.long`` tensor.

    ``tokenizer`` is a Hugging Face tokenizer (``PreTrainedTokenizerBase``: called once on
    the whole text, ``add_special_tokens`` passed through, no truncation), a
    ``tokenizers.Tokenizer`` (``encode(text).ids``), or any callable ``str -> list[int]``
    (or returning a mapping with ``"input_ids"``, or a tensor).
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize: text must be a str, got {type(text).__name__}")
    if _is_hf_tokenizer(tokenizer):
        out = tokenizer(text, add_special_tokens=add_special_tokens, truncation=False,
                        return_attention_mask=False, verbose=False)
        ids = out["input_ids"]
    elif _is_raw_tokenizer(tokenizer):
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    elif isinstance(tokenizer, Callable):
        ids = tokenizer(text)
        if isinstance(ids, Mapping):
            if "input_ids" not in ids:
                raise TypeError(f"tokenize: the tokenizer returned a mapping without 'input_ids' (keys {list(ids)})")
            ids = ids["input_ids"]
    else:
        raise TypeError(
            "tokenize: tokenizer must be a Hugging Face tokenizer, a tokenizers.Tokenizer or a callable "
            f"str -> list[int], got {type(tokenizer).__name__}"
        )
    return _as_ids(ids, "tokenize")


def _ids_of(text, tokenizer, where: str, add_special_tokens: bool) -> torch.Tensor:
    if isinstance(text, str):
        if tokenizer is None:
            raise TypeError(f"{where}: a tokenizer is needed to tokenize text")
        return tokenize(text, tokenizer, add_special_tokens=add_special_tokens)
    return _as_ids(text, where)  # already token ids


def _positive_int(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return value


def calibration_samples(
    text: str | torch.Tensor | Sequence[int],
    tokenizer,
    nsamples: int,
    seqlen: int,
    seed: int,
    *,
    add_special_tokens: bool = True,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` consecutive tokens of ``text``, as a
    ``LongTensor[nsamples, seqlen]``.

    The text is tokenized once (see :func:`tokenize`; ``text`` may also be token ids
    already, then ``tokenizer`` is not used). **Rule**: the windows never overlap, so the
    text must hold at least ``nsamples * seqlen`` tokens, else :class:`ValueError` with
    the counts; no token is used twice. The start positions are drawn with a
    ``torch.Generator`` seeded with ``seed`` (same seed, same text -> same samples):
    ``nsamples`` offsets uniform in ``[0, T - nsamples*seqlen]`` are sorted and the i-th
    window starts at ``offset_i + i*seqlen``; the rows are then shuffled.
    """
    where = "calibration_samples"
    nsamples = _positive_int(nsamples, "nsamples", where)
    seqlen = _positive_int(seqlen, "seqlen", where)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{where}: seed must be an int, got {seed!r}")
    ids = _ids_of(text, tokenizer, where, add_special_tokens)
    total = ids.numel()
    need = nsamples * seqlen
    if total < need:
        raise ValueError(
            f"calibration text has {total} tokens, need nsamples x seqlen = {nsamples} x {seqlen} = {need} "
            "(windows do not overlap): use more text, fewer samples or shorter windows"
        )
    g = torch.Generator().manual_seed(seed)
    slack = total - need
    offsets = torch.randint(0, slack + 1, (nsamples,), generator=g).sort().values
    starts = offsets + torch.arange(nsamples) * seqlen
    starts = starts[torch.randperm(nsamples, generator=g)]
    idx = starts.unsqueeze(1) + torch.arange(seqlen).unsqueeze(0)
    return ids[idx]


def eval_tokens(text: str | torch.Tensor | Sequence[int], tokenizer, *, add_special_tokens: bool = True) -> torch.Tensor:
    """The whole ``text`` tokenized once, as a ``LongTensor[1, T]`` (the input of
    :func:`semisparse.eval.perplexity`). Empty token lists are a :class:`ValueError`."""
    ids = _ids_of(text, tokenizer, "eval_tokens", add_special_tokens)
    if ids.numel() == 0:
        raise ValueError("eval_tokens: the text has no tokens")
    return ids.unsqueeze(0)
