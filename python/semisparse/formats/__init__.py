from .bsr import BlockSparse
from .sparse24 import LAYOUTS, Sparse24, nm_mask

__all__ = ["BlockSparse", "LAYOUTS", "Sparse24", "nm_mask"]
