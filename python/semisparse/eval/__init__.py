"""Evaluation metrics: :func:`perplexity` (sliding-window, Hugging Face method) for causal
language models and :func:`fidelity` (mean cosine similarity of last hidden states to a
dense reference) for encoders without a language-model head."""

from .metrics import fidelity, perplexity, perplexity_windows

__all__ = ["fidelity", "perplexity", "perplexity_windows"]
