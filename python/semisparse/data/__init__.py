"""Calibration and evaluation data: text from files, folders or Hugging Face datasets,
and the token tensors the pruning methods and metrics take.

* :func:`load_text` -- a file, a folder of text files, or ``wikitext2`` / ``c4`` /
  ``hf:NAME[:CONFIG][:SPLIT][:FIELD]`` (offline: the local cache only, unless
  ``download=True``);
* :func:`calibration_samples` -- ``LongTensor[nsamples, seqlen]`` of non-overlapping random
  windows (seeded);
* :func:`eval_tokens` -- ``LongTensor[1, T]``, the whole text.
"""

from .samples import calibration_samples, eval_tokens, tokenize
from .sources import DATASET_ALIASES, load_text, parse_dataset_spec

__all__ = ["DATASET_ALIASES", "calibration_samples", "eval_tokens", "load_text", "parse_dataset_spec", "tokenize"]
