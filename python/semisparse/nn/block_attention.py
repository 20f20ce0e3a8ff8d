"""``BlockSparseAttention``: multi-head (GQA) self/cross attention whose scores are
restricted to a block mask, on ``semisparse::block_sparse_attention``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.block_attention import block_sparse_attention

__all__ = ["BlockSparseAttention"]


class BlockSparseAttention(nn.Module):
    """q/k/v/o projections around block-sparse scaled dot-product attention.

    ``forward(x, block_mask, kv=None, causal=False)``: ``x [B, Lq, E]`` (``kv [B, Lk, E]``
    for cross attention, else ``x``); ``block_mask`` bool ``[B or 1, H or 1,
    ceil(Lq/block_q), ceil(Lk/block_k)]`` (2-D/3-D left-padded with 1s), e.g. from
    ``semisparse.ops.block_attention.BlockMasks``. Returns ``[B, Lq, E]``.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, block=(64, 64),
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.block = (block, block) if isinstance(block, int) else tuple(block)
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor, kv: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        kv = x if kv is None else kv
        B, Lq, _ = x.shape
        Lk = kv.shape[1]
        q = self.q_proj(x).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(B, Lk, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = block_sparse_attention(q, k, v, block_mask, self.block, scale=1.0 / math.sqrt(self.head_dim),
                                     causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(B, Lq, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"block={self.block}")
