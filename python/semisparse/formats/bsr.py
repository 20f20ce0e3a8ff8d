"""The block-sparse (BSR) format of a 2-D weight, with torch's BSR conventions."""

from __future__ import annotations

import torch

from ..ops import bsr as _ops

__all__ = ["BlockSparse"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _block_pair(block) -> tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    try:
        bh, bw = (int(b) for b in block)
    except (TypeError, ValueError):
        raise ValueError(f"BlockSparse: block must be an int or a pair (bh, bw), got {block!r}") from None
    if bh <= 0 or bw <= 0:
        raise ValueError(f"BlockSparse: block sizes must be positive, got ({bh}, {bw})")
    return bh, bw


def _check_divides(shape, bh: int, bw: int, where: str) -> None:
    n, k = shape
    if n % bh or k % bw:
        raise ValueError(
            f"{where}: block ({bh}, {bw}) does not divide the weight shape ({n}, {k}) "
            f"(N % bh = {n % bh}, K % bw = {k % bw}); pad the weight or choose another block"
        )


def block_norms(w: torch.Tensor, block) -> torch.Tensor:
    """The L2 norm of every block of ``w`` [N, K]: ``[N/bh, K/bw]`` (fp32, fp64 for fp64)."""
    bh, bw = _block_pair(block)
    _check_divides(tuple(w.shape), bh, bw, "block_norms")
    n, k = w.shape
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    b = w.detach().to(acc).reshape(n // bh, bh, k // bw, bw)
    return b.square().sum((1, 3)).sqrt()


def topk_block_mask(w: torch.Tensor, block, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * blocks)`` blocks of largest L2 norm (ties: lower
    flat index first)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"BlockSparse: sparsity must be in [0, 1], got {sparsity}")
    norms = block_norms(w, block)
    total = norms.numel()
    keep = int(round((1.0 - float(sparsity)) * total))
    flat = norms.flatten()
    order = torch.sort(torch.nan_to_num(flat, nan=-1.0), descending=True, stable=True).indices[:keep]
    mask = torch.zeros(total, dtype=torch.bool, device=w.device)
    mask[order] = True
    return mask.reshape(norms.shape)


class BlockSparse:
    """A ``[N, K]`` weight stored as blocks ``(bh, bw)``: ``values [nnz, bh, bw]``,
    ``crow_indices [N/bh + 1]`` int64, ``col_indices [nnz]`` int64 (sorted within a
    block row)."""

    def __init__(self, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"BlockSparse: shape must be 2-D (N, K), got {shape}")
        if not isinstance(values, torch.Tensor) or values.dim() != 3:
            raise ValueError(
                f"BlockSparse: values must be a 3-D tensor [nnz, bh, bw], got "
                f"{tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__}"
            )
        if values.dtype not in _DTYPES:
            raise ValueError(f"BlockSparse: values must be float32/bfloat16/float16/float64, got {values.dtype}")
        bh, bw = int(values.shape[1]), int(values.shape[2])
        if bh <= 0 or bw <= 0:
            raise ValueError(f"BlockSparse: block sizes must be positive, got ({bh}, {bw})")
        _check_divides(shape, bh, bw, "BlockSparse")
        nbr, nbc = shape[0] // bh, shape[1] // bw
        for name, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int64:
                raise ValueError(
                    f"BlockSparse: {name} must be a 1-D int64 tensor, got "
                    + (f"{t.dim()}-D {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__)
                )
            if t.device != values.device:
                raise ValueError(f"BlockSparse: {name} is on {t.device} but values is on {values.device}")
        if crow_indices.shape[0] != nbr + 1:
            raise ValueError(
                f"BlockSparse: crow_indices must have N/bh + 1 = {nbr + 1} entries, got {crow_indices.shape[0]}"
            )
        nnz = values.shape[0]
        if col_indices.shape[0] != nnz:
            raise ValueError(
                f"BlockSparse: col_indices has {col_indices.shape[0]} entries but values holds {nnz} blocks"
            )
        crow = crow_indices.cpu()
        if int(crow[0]) != 0 or int(crow[-1]) != nnz:
            raise ValueError(
                f"BlockSparse: crow_indices must start at 0 and end at nnz={nnz}, got {int(crow[0])} .. {int(crow[-1])}"
            )
        counts = crow[1:] - crow[:-1]
        if bool((counts < 0).any()):
            r = int((counts < 0).nonzero()[0])
            raise ValueError(f"BlockSparse: crow_indices must be non-decreasing (block row {r})")
        col = col_indices.cpu()
        if nnz:
            if bool(((col < 0) | (col >= nbc)).any()):
                i = int(((col < 0) | (col >= nbc)).nonzero()[0])
                raise ValueError(
                    f"BlockSparse: col_indices[{i}] = {int(col[i])} is out of range [0, {nbc}) (K/bw)"
                )
            rows = _ops.block_rows(crow)
            same_row = rows[1:] == rows[:-1]
            bad = same_row & (col[1:] <= col[:-1])
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(
                    f"BlockSparse: col_indices must be strictly increasing within a block row "
                    f"(block row {int(rows[i])}: {int(col[i])} then {int(col[i + 1])})"
                )
        self.values = values
        self.crow_indices = crow_indices
        self.col_indices = col_indices
        self.shape = shape
        self.block = (bh, bw)

    # --------------------------------------------------------------- build
    @classmethod
    def from_dense(cls, w: torch.Tensor, block=(32, 32), mask=None) -> "BlockSparse":
        """``mask``: ``None`` (keep the blocks that are not all zero), a bool block mask
        ``[N/bh, K/bw]``, or a float sparsity in [0, 1] (keep the blocks of largest L2 norm)."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError("BlockSparse.from_dense: w must be a 2-D tensor")
        if w.dtype not in _DTYPES:
            raise ValueError(f"BlockSparse.from_dense: w must be float32/bfloat16/float16/float64, got {w.dtype}")
        bh, bw = _block_pair(block)
        n, k = w.shape
        _check_divides((n, k), bh, bw, "BlockSparse.from_dense")
        nbr, nbc = n // bh, k // bw
        blocks = w.detach().reshape(nbr, bh, nbc, bw).permute(0, 2, 1, 3)
        if mask is None:
            bmask = (blocks != 0).flatten(2).any(-1)
        elif isinstance(mask, torch.Tensor):
            if tuple(mask.shape) != (nbr, nbc):
                raise ValueError(
                    f"BlockSparse.from_dense: block mask must have shape (N/bh, K/bw) = ({nbr}, {nbc}), "
                    f"got {tuple(mask.shape)}"
                )
            bmask = mask.to(device=w.device, dtype=torch.bool)
        elif isinstance(mask, (float, int)) and not isinstance(mask, bool):
            bmask = topk_block_mask(w, (bh, bw), float(mask))
        else:
            raise ValueError(
                f"BlockSparse.from_dense: mask must be None, a bool block mask or a float sparsity, got {type(mask).__name__}"
            )
        idx = bmask.nonzero()  # row-major: sorted by row, then column
        values = blocks[idx[:, 0], idx[:, 1]].contiguous()
        counts = bmask.sum(1)
        crow = torch.zeros(nbr + 1, dtype=torch.int64, device=w.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(values, crow, idx[:, 1].contiguous().to(torch.int64), (n, k))

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "BlockSparse":
        """From a torch ``sparse_bsr`` tensor."""
        return cls(t.values(), t.crow_indices().to(torch.int64), t.col_indices().to(torch.int64), t.shape)

    # ------------------------------------------------------------- views
    def to_dense(self) -> torch.Tensor:
        return _ops.to_dense_reference(self.values, self.crow_indices, self.col_indices, *self.shape)

    def to_torch(self) -> torch.Tensor:
        return torch.sparse_bsr_tensor(
            self.crow_indices, self.col_indices, self.values, self.shape, check_invariants=True
        )

    def block_mask(self) -> torch.Tensor:
        bh, bw = self.block
        m = torch.zeros(self.shape[0] // bh, self.shape[1] // bw, dtype=torch.bool, device=self.values.device)
        m[_ops.block_rows(self.crow_indices), self.col_indices] = True
        return m

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        bh, bw = self.block
        total = (self.shape[0] // bh) * (self.shape[1] // bw)
        return self.nnz_blocks / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.crow_indices, self.col_indices))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> "BlockSparse":
        """Like ``Tensor.to``: the dtype applies to the values only, the device to all."""
        values = self.values.to(*args, **kwargs)
        dev = values.device
        return BlockSparse(values, self.crow_indices.to(dev), self.col_indices.to(dev), self.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _ops.bsr_linear(x, self.values, self.crow_indices, self.col_indices, self.shape[0], bias)

    def __repr__(self) -> str:
        return (
            f"BlockSparse(shape={self.shape}, block={self.block}, nnz_blocks={self.nnz_blocks}, "
            f"density={self.density:.3f}, dtype={self.values.dtype}, device={self.values.device})"
        )
