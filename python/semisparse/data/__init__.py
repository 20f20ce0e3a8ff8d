"""Calibration and evaluation data: text from files, folders or Hugging Face datasets,
and the token tensors the pruning methods and metrics take.

* :func:`load_text` -- a file, a folder of text files, or ``wikitext2`` / ``c4`` /
  ``hf:NAME[:CONFIG][:SPLIT][:FIELD]`` (offline: the local cache only, unless
  ``download=True``);
* :func:`calibration_samples` -- ``LongTensor[nsamples, seqlen]`` of non-overlapping random
  windows (seeded);
* :func:`eval_tokens` -- ``LongTensor[1, T]``, the whole text;
* :func:`load_calibration_images` -- float32 ``[B, C, H, W]`` image batches for image models
  (a folder of images or ``digits``), preprocessed like the model's inputs.
"""

from .images import IMAGE_DATASETS, IMAGE_EXTENSIONS, find_images, load_calibration_images
from .samples import calibration_samples, eval_tokens, tokenize
from .sources import DATASET_ALIASES, load_text, parse_dataset_spec

__all__ = [
    "DATASET_ALIASES",
    "IMAGE_DATASETS",
    "IMAGE_EXTENSIONS",
    "calibration_samples",
    "eval_tokens",
    "find_images",
    "load_calibration_images",
    "load_text",
    "parse_dataset_spec",
    "tokenize",
]
