"""N:M masks and the 2:4 compressed format."""

from __future__ import annotations

import math

import torch

from ..ops import sparse24 as _ops

__all__ = ["nm_mask", "Sparse24", "LAYOUTS", "preferred_layout"]

LAYOUTS = _ops.LAYOUTS
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


# ----------------------------------------------------------------- the format
def preferred_layout(device, dtype: torch.dtype, n: int, k: int) -> str:
    """The layout whose kernels run fastest for an ``[n, k]`` 2:4 matrix of ``dtype`` on
    ``device``: ``"cutlass_sm90"`` on compute capability 9.0 when the shape fits,
    ``"cutlass_sm80"`` on 8.x and 9.0 (the CUTLASS 2.x kernel is built for both),
    ``"cpu"`` otherwise (on a GPU that means unpack + cuBLAS)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0) and n % 64 == 0 and k % 64 == 0:
        return "cutlass_sm90"
    if major in (8, 9) and n % 32 == 0 and k % 32 == 0:
        return "cutlass_sm80"
    return "cpu"


class Sparse24:
    """A 2:4 semi-structured sparse matrix ``[N, K]`` stored as kept values plus
    2-bit-per-value metadata.

    ``values`` is ``[N, K/2]`` (the kept entries of each group of 4, in column order) in
    every layout; ``meta`` depends on the layout (see :mod:`semisparse.ops.sparse24`):

    * ``"cpu"``: uint8 ``[N, ceil(K/8)]``; what the CPU kernels read.
    * ``"cutlass_sm80"`` (fp16/bf16, ``N % 32 == 0``, ``K % 32 == 0``): int16 ``[N, K/16]``,
      bit-identical to
      ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``.
    * ``"cutlass_sm90"`` (fp16/bf16, ``N % 64 == 0``, ``K % 64 == 0``): uint8
      ``[K/64, N/64, 512]``, CUTLASS 3.x's sm90 metadata layout.

    ``from_dense`` / ``to_dense`` run on the tensor's device (CUDA kernels for CUDA tensors).
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
        _ops.check_layout_shape(layout, n, k, values.dtype, "Sparse24")
        want, mdt = _ops.layout_meta_spec(layout, n, k)
        if tuple(meta.shape) != want or meta.dtype != mdt:
            raise ValueError(
                f"Sparse24: {layout} meta must be {mdt} of shape {want}, got {meta.dtype} {tuple(meta.shape)}"
            )
        if meta.device.type != "meta":
            _ops.check_meta(_ops.meta_to_cpu(meta, layout, n, k), k, where="Sparse24")
        self.values, self.meta, self.shape, self.layout = values, meta, shape, layout

    # -------------------------------------------------------------- building
    @classmethod
    def from_dense(cls, w: torch.Tensor, layout: str = "cpu", prune: bool = False) -> "Sparse24":
        """Compress a 2-D tensor that is already 2:4 sparse (at most 2 non-zeros in every
        group of 4 along the last dim). With ``prune=True`` the 2 largest-magnitude
        entries of each group are kept instead of raising (ties: the lower index; NaN is
        pruned first). ``layout="auto"`` picks :func:`preferred_layout` for ``w``'s device.
        Runs on ``w``'s device."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"Sparse24.from_dense: expected a 2-D tensor (N, K), got {got}")
        if layout == "auto":
            layout = preferred_layout(w.device, w.dtype, *w.shape)
        if layout not in LAYOUTS:
            raise ValueError(f"Sparse24.from_dense: layout must be one of {LAYOUTS + ('auto',)}, got {layout!r}")
        if w.dtype not in _DTYPES:
            raise TypeError(f"Sparse24.from_dense: dtype must be one of float32, bfloat16, float16, float64, got {w.dtype}")
        n, k = w.shape
        if layout != "cpu" and w.dtype == torch.float32:
            raise TypeError(
                f"Sparse24.from_dense: layout={layout!r} takes float16 or bfloat16 "
                "(CUTLASS treats float32 as 1:2 tf32), got torch.float32"
            )
        _ops.check_layout_shape(layout, n, k, w.dtype, "Sparse24.from_dense")
        w = w.detach()
        if not prune:
            counts = (w != 0).reshape(n, k // 4, 4).sum(-1)
            bad = counts > 2
            if bool(bad.any()):
                r, g = (int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"Sparse24.from_dense: tensor of shape {tuple(w.shape)} is not 2:4 sparse: the group at "
                    f"row {r}, columns {4 * g}..{4 * g + 3} has {int(counts[r, g])} non-zeros (at most 2 "
                    f"allowed); pass prune=True to keep the 2 largest-magnitude entries of each group"
                )
        values, meta = torch.ops.semisparse.sparse24_pack(w.contiguous(), layout, prune)
        return cls(values, meta, (n, k), layout)

    # ------------------------------------------------------------- accessors
    def cpu_meta(self) -> torch.Tensor:
        """The metadata in the "cpu" layout (a reordered copy for the GPU layouts)."""
        return _ops.meta_to_cpu(self.meta, self.layout, *self.shape)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[N, K]`` matrix (pruned positions +0.0), on the values' device."""
        return torch.ops.semisparse.sparse24_unpack(self.values, self.meta, self.layout)

    def to_layout(self, layout: str) -> "Sparse24":
        """The same matrix in another layout (the values are shared: only the metadata moves)."""
        if layout == self.layout:
            return self
        n, k = self.shape
        _ops.check_layout_shape(layout, n, k, self.dtype, "Sparse24.to_layout")
        meta = _ops.meta_from_cpu(self.cpu_meta().contiguous(), layout, n, k)
        return Sparse24(self.values, meta, self.shape, layout)

    def matmul_t(self, x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
        """``activation(x @ self^T + bias)`` with the fused kernel of this layout."""
        return torch.ops.semisparse.sparse24_mm(x, self.values, self.meta, self.layout, bias, activation)

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
        """Like ``Tensor.to``: a dtype applies to the values only; the metadata moves. A dtype
        the layout does not take (float32 / float64 for the GPU layouts) gives layout "cpu"."""
        values = self.values.to(*args, **kwargs)
        layout, meta = self.layout, self.meta
        if layout != "cpu" and values.dtype not in (torch.float16, torch.bfloat16):
            layout, meta = "cpu", self.cpu_meta()
        return Sparse24(values, meta.to(device=values.device), self.shape, layout)

    def __repr__(self) -> str:
        return (
            f"Sparse24(shape={tuple(self.shape)}, dtype={self.dtype}, layout={self.layout!r}, "
            f"device={self.device}, nbytes={self.nbytes})"
        )
