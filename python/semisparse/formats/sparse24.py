"""N:M masks and the 2:4 compressed format."""

from __future__ import annotations

import math

import torch

from ..ops import sparse24 as _ops

__all__ = ["nm_mask", "Sparse24", "LAYOUTS"]

LAYOUTS = ("cpu", "cutlass_sm80")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # float64: generic kernels only


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest ``scores`` in every group of ``m``
    consecutive elements along the last dim (ties: the lower index wins).

    For magnitude pruning pass ``weight.abs()``.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"nm_mask: scores must be a tensor, got {type(scores).__name__}")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"nm_mask: expected integers 0 < n <= m, got n={n!r}, m={m!r}")
    if scores.dim() == 0 or scores.shape[-1] % m != 0:
        raise ValueError(
            f"nm_mask: the last dim must be a multiple of m={m}, got shape {tuple(scores.shape)}"
        )
    if scores.is_complex():
        raise TypeError("nm_mask: scores must be real")
    g = scores.detach().reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    if not g.is_floating_point():
        g = g.to(torch.float32)
    # (float64 stays float64: rounding it to float32 could turn distinct scores into ties)
    if g.dtype != torch.float64:
        g = g.float()
    nan = torch.isnan(g)
    g = torch.where(nan, -math.inf, g)  # (nan_to_num would also clamp +-inf to finite values)
    # stable descending sort: equal scores keep the lower index
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices
    # then a stable sort on "is NaN": NaN scores rank lowest (below -inf), so they are
    # pruned first
    order = order.gather(-1, torch.sort(nan.gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
    order = order[..., :n]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=g.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(scores.shape)


# ------------------------------------------------------ CUTLASS sm80 metadata
def _cutlass_meta_offsets(rows: int, ncols: int, device) -> torch.Tensor:
    """Position in CUTLASS's ColumnMajorInterleaved<2> metadata of every int16 word
    (row, col) of the row-major metadata (16-bit element types: rows grouped by 32,
    interleaved by 4, then 2x2 blocks transposed)."""
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, ncols)
    c = torch.arange(ncols, device=device).unsqueeze(0).expand(rows, ncols)
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    swap_up = (r % 2 == 0) & (c % 2 == 1)  # top-right of a 2x2 block -> bottom-left
    swap_dn = (r % 2 == 1) & (c % 2 == 0)
    d = swap_up.long() - swap_dn.long()
    r = r + d
    c = c - d
    return ((c // 2) * rows * 2 + r * 2 + (c % 2)).reshape(-1)


def _meta_cpu_to_cutlass(meta: torch.Tensor, k: int) -> torch.Tensor:
    rows = meta.shape[0]
    words = meta.contiguous().view(torch.int16)  # 4 groups per little-endian int16
    ncols = k // 16
    out = torch.empty(rows * ncols, dtype=torch.int16, device=meta.device)
    out[_cutlass_meta_offsets(rows, ncols, meta.device)] = words.reshape(-1)
    return out.view(rows, ncols)


def _meta_cutlass_to_cpu(meta: torch.Tensor) -> torch.Tensor:
    rows, ncols = meta.shape
    words = meta.reshape(-1)[_cutlass_meta_offsets(rows, ncols, meta.device)]
    return words.view(rows, ncols).contiguous().view(torch.uint8)


# ----------------------------------------------------------------- the format
class Sparse24:
    """A 2:4 semi-structured sparse matrix ``[N, K]`` stored as kept values plus
    2-bit-per-value metadata.

    ``layout="cpu"``: values ``[N, K/2]`` and meta ``[N, ceil(K/8)]`` uint8 (see
    :mod:`semisparse.ops.sparse24`); what the CPU kernels read. ``layout="cutlass_sm80"``
    (fp16/bf16, ``N % 32 == 0``, ``K % 32 == 0``): values ``[N, K/2]`` and meta
    ``[N, K/16]`` int16, bit-identical to
    ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.
    """

    __slots__ = ("values", "meta", "shape", "layout")

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, shape, layout: str = "cpu"):
        if layout not in LAYOUTS:
            raise ValueError(f"Sparse24: layout must be one of {LAYOUTS}, got {layout!r}")
        shape = torch.Size(shape)
        if len(shape) != 2:
            raise ValueError(f"Sparse24: shape must be 2-D (N, K), got {tuple(shape)}")
        n, k = shape
        if tuple(values.shape) != (n, k // 2):
            raise ValueError(f"Sparse24: values must have shape {(n, k // 2)}, got {tuple(values.shape)}")
        if layout == "cutlass_sm80" and (n % 32 or k % 32):
            raise ValueError(
                f"Sparse24: layout='cutlass_sm80' needs rows a multiple of 32 and columns a multiple of 32, "
                f"got shape {tuple(shape)}"
            )
        want = (n, _ops.meta_cols(k)) if layout == "cpu" else (n, k // 16)
        mdt = torch.uint8 if layout == "cpu" else torch.int16
        if tuple(meta.shape) != want or meta.dtype != mdt:
            raise ValueError(
                f"Sparse24: {layout} meta must be {mdt} of shape {want}, got {meta.dtype} {tuple(meta.shape)}"
            )
        if layout == "cpu" and meta.device.type != "meta":
            _ops.check_meta(meta, k, where="Sparse24")
        self.values, self.meta, self.shape, self.layout = values, meta, shape, layout

    # -------------------------------------------------------------- building
    @classmethod
    def from_dense(cls, w: torch.Tensor, layout: str = "cpu", prune: bool = False) -> "Sparse24":
        """Compress a 2-D tensor that is already 2:4 sparse (at most 2 non-zeros in every
        group of 4 along the last dim). With ``prune=True`` the 2 largest-magnitude
        entries of each group are kept instead of raising."""
        if layout not in LAYOUTS:
            raise ValueError(f"Sparse24.from_dense: layout must be one of {LAYOUTS}, got {layout!r}")
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"Sparse24.from_dense: expected a 2-D tensor (N, K), got {got}")
        if w.dtype not in _DTYPES:
            raise TypeError(f"Sparse24.from_dense: dtype must be one of float32, bfloat16, float16, float64, got {w.dtype}")
        n, k = w.shape
        if layout == "cutlass_sm80":
            if w.dtype == torch.float32:
                raise TypeError(
                    "Sparse24.from_dense: layout='cutlass_sm80' takes float16 or bfloat16 "
                    "(CUTLASS treats float32 as 1:2 tf32), got torch.float32"
                )
            # K % 32: the metadata ([N, K/16] int16) is interleaved in 2x2 blocks of words
            # (ColumnMajorInterleaved<2>), so it needs an even number of columns; PyTorch's
            # sparse_semi_structured_from_dense_cutlass fails the same way for K % 32 == 16.
            if n % 32 or k % 32:
                raise ValueError(
                    f"Sparse24.from_dense: layout='cutlass_sm80' needs rows a multiple of 32 and "
                    f"columns a multiple of 32, got shape {tuple(w.shape)}"
                )
        elif k % 4:
            raise ValueError(
                f"Sparse24.from_dense: the last dim must be a multiple of 4, got shape {tuple(w.shape)}"
            )
        w = w.detach()
        if prune:
            w = w * nm_mask(w.abs(), 2, 4)
        else:
            counts = (w != 0).reshape(n, k // 4, 4).sum(-1)
            bad = counts > 2
            if bool(bad.any()):
                r, g = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"Sparse24.from_dense: tensor of shape {tuple(w.shape)} is not 2:4 sparse: the group at "
                    f"row {r}, columns {4 * g}..{4 * g + 3} has {int(counts[r, g])} non-zeros (at most 2 "
                    f"allowed); pass prune=True to keep the 2 largest-magnitude entries of each group"
                )
        values, meta = torch.ops.semisparse.sparse24_compress(w.contiguous())
        if layout == "cutlass_sm80":
            meta = _meta_cpu_to_cutlass(meta, k)
        return cls(values, meta, (n, k), layout)

    # ------------------------------------------------------------- accessors
    def cpu_meta(self) -> torch.Tensor:
        """The metadata in the "cpu" layout (a copy for cutlass_sm80)."""
        return self.meta if self.layout == "cpu" else _meta_cutlass_to_cpu(self.meta)

    def to_dense(self) -> torch.Tensor:
        return torch.ops.semisparse.sparse24_decompress(self.values, self.cpu_meta())

    def to_layout(self, layout: str) -> "Sparse24":
        if layout == self.layout:
            return self
        return Sparse24.from_dense(self.to_dense(), layout=layout)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus metadata."""
        return self.values.numel() * self.values.element_size() + self.meta.numel() * self.meta.element_size()

    def to(self, *args, **kwargs) -> "Sparse24":
        """Like ``Tensor.to``: a dtype applies to the values only; the metadata moves."""
        values = self.values.to(*args, **kwargs)
        meta = self.meta.to(device=values.device)
        return Sparse24(values, meta, self.shape, self.layout)

    def __repr__(self) -> str:
        return (
            f"Sparse24(shape={tuple(self.shape)}, dtype={self.dtype}, layout={self.layout!r}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )
