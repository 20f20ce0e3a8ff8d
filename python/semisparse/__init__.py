"""semisparse: semi-structured (2:4) and block sparsity for PyTorch transformers."""

from . import ops  # defines the op schemas and loads the native libraries
from ._native import cpu_isa, set_cpu_isa
from ._native import status as native_status
from .formats import BlockSparse, Sparse24, nm_mask
from .nn import BlockSparseAttention, BlockSparseLinear, SparseLinear
from .pruning import parse_pattern, prune
from .sparsify import SparsifyReport, sparsify
from .data import calibration_samples, eval_tokens, load_text
from .eval import fidelity, perplexity
from .hf import load_pretrained, save_pretrained
from .masks import apply_masks, load_masks, save_masks
from . import dsformer, flora, lpvit, maskllm, train  # noqa: E402  (the methods; the shared training loop)

__version__ = "0.1.0"

__all__ = [
    "BlockSparse",
    "BlockSparseAttention",
    "BlockSparseLinear",
    "Sparse24",
    "SparseLinear",
    "SparsifyReport",
    "apply_masks",
    "calibration_samples",
    "dsformer",
    "eval_tokens",
    "fidelity",
    "flora",
    "load_masks",
    "load_pretrained",
    "lpvit",
    "maskllm",
    "load_text",
    "perplexity",
    "save_masks",
    "save_pretrained",
    "cpu_isa",
    "native_status",
    "nm_mask",
    "ops",
    "parse_pattern",
    "prune",
    "set_cpu_isa",
    "sparsify",
    "train",
    "__version__",
]
