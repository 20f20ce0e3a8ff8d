"""BlockSparseLinear: a drop-in ``nn.Linear`` whose weight is stored block-sparse (BSR)."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.bsr import BlockSparse
from ..io import load_module_file, save_module_file
from ..ops import bsr as _ops

__all__ = ["BlockSparseLinear"]

_FORMAT = "semisparse.BlockSparseLinear"
_FORMAT_VERSION = 1


class BlockSparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` block-sparse.

    Parameters: ``values`` ``[nnz, bh, bw]`` (trainable: the kept blocks; the block
    pattern is fixed) and ``bias`` like ``nn.Linear``; buffers ``crow_indices``
    ``[out/bh + 1]`` and ``col_indices`` ``[nnz]`` (int64, torch's BSR convention).
    ``weight`` returns the dense (decompressed) weight.
    """

    __constants__ = ["in_features", "out_features", "block"]

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, block=(32, 32), nnz_blocks: int = 0,
        device=None, dtype=None,
    ):
        super().__init__()
        bh, bw = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
        if bh <= 0 or bw <= 0 or out_features % bh or in_features % bw:
            raise ValueError(
                f"BlockSparseLinear: block ({bh}, {bw}) does not divide the weight shape ({out_features}, {in_features})"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.block = (bh, bw)
        self.values = nn.Parameter(torch.zeros(nnz_blocks, bh, bw, **factory))
        self.register_buffer("crow_indices", torch.zeros(out_features // bh + 1, dtype=torch.int64, device=device))
        self.register_buffer("col_indices", torch.zeros(nnz_blocks, dtype=torch.int64, device=device))
        if nnz_blocks:
            # a valid placeholder pattern: the first nnz_blocks blocks in row-major order
            nbc = in_features // bw
            idx = torch.arange(nnz_blocks, device=device)
            self.col_indices.copy_(idx % nbc)
            counts = torch.bincount(idx // nbc, minlength=out_features // bh)
            self.crow_indices[1:] = torch.cumsum(counts, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    # ---------------------------------------------------------------- build
    @classmethod
    def from_dense(cls, linear: nn.Linear, block=(32, 32), mask=None) -> "BlockSparseLinear":
        """Build from an ``nn.Linear``. ``mask``: ``None`` (keep the blocks that are not all
        zero), a bool block mask ``[out/bh, in/bw]``, or a float block sparsity (keep the
        blocks of largest L2 norm)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"BlockSparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        bs = BlockSparse.from_dense(w, block, mask)
        return cls.from_block_sparse(bs, None if linear.bias is None else linear.bias.detach(),
                                     requires_grad=linear.weight.requires_grad)

    @classmethod
    def from_block_sparse(cls, bs: BlockSparse, bias: torch.Tensor | None = None, requires_grad: bool = True):
        n, k = bs.shape
        mod = cls(k, n, bias=bias is not None, block=bs.block, nnz_blocks=bs.nnz_blocks,
                  device=bs.values.device, dtype=bs.values.dtype)
        with torch.no_grad():
            mod.values.copy_(bs.values)
            mod.crow_indices.copy_(bs.crow_indices)
            mod.col_indices.copy_(bs.col_indices)
            if bias is not None:
                mod.bias.copy_(bias)
        mod.values.requires_grad_(requires_grad)
        return mod

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # the number of stored blocks comes from the state dict: resize, then validate the pattern
        v = state_dict.get(prefix + "values")
        crow = state_dict.get(prefix + "crow_indices")
        col = state_dict.get(prefix + "col_indices")
        if all(isinstance(t, torch.Tensor) for t in (v, crow, col)):
            BlockSparse(v, crow.to(v.device), col.to(v.device), (self.out_features, self.in_features))
            if v.shape != self.values.shape:
                self.values = nn.Parameter(
                    self.values.new_empty(v.shape), requires_grad=self.values.requires_grad
                )
            if col.shape != self.col_indices.shape:
                self.col_indices = self.col_indices.new_empty(col.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.semisparse.bsr_linear(
            input, self.values, self.crow_indices, self.col_indices, self.out_features, self.bias
        )

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` (decompressed on every access; differentiable)."""
        return _ops.to_dense_reference(
            self.values, self.crow_indices, self.col_indices, self.out_features, self.in_features
        )

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    def sparse(self) -> BlockSparse:
        return BlockSparse(self.values.detach(), self.crow_indices, self.col_indices,
                           (self.out_features, self.in_features))

    def block_mask(self) -> torch.Tensor:
        return self.sparse().block_mask()

    def mask(self) -> torch.Tensor:
        """The fixed pattern as a bool ``[out, in]`` tensor."""
        bh, bw = self.block
        return self.block_mask().repeat_interleave(bh, 0).repeat_interleave(bw, 1)

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        bh, bw = self.block
        total = (self.out_features // bh) * (self.in_features // bw)
        dens = self.nnz_blocks / total if total else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, nnz_blocks={self.nnz_blocks}, density={dens:.3f}")

    # ------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write this module to one safetensors file (state dict plus a JSON header), atomically."""
        meta = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "block": list(self.block),
            "nnz_blocks": self.nnz_blocks,
            "dtype": str(self.values.dtype).removeprefix("torch."),
        }
        save_module_file(self, path, _FORMAT, _FORMAT_VERSION, meta)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "BlockSparseLinear":
        tensors, meta = load_module_file(path, _FORMAT, _FORMAT_VERSION, "BlockSparseLinear.load", device)
        mod = cls(meta["in_features"], meta["out_features"], bias=meta["bias"], block=tuple(meta["block"]),
                  nnz_blocks=int(meta["nnz_blocks"]), device=device, dtype=getattr(torch, meta["dtype"]))
        mod.load_state_dict(tensors, strict=True)
        return mod
