from .sparse24 import LAYOUTS, Sparse24, nm_mask

__all__ = ["LAYOUTS", "Sparse24", "nm_mask"]
