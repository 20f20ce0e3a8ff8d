"""Block-sparse scaled dot-product attention: schemas (defined once, here), fake kernels,
autograd formulas, the pure-torch references and block-mask builders.

Attention restricted to a block mask over (query block, key block)::

    s[i, j]  = scale * q[i] . k[j]            (fp32 accumulate; fp64 for fp64 inputs)
    allowed  = block_mask[i // block_q, j // block_k]  and  (not causal or j <= i)
    out[i]   = sum_j softmax_j(s[i, allowed]) v[j]
    lse[i]   = logsumexp_j(s[i, allowed])

Shapes: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lk, D]``, ``v [B, Hkv, Lk, Dv]`` (GQA:
``Hq % Hkv == 0``, query head ``h`` reads key/value head ``h // (Hq // Hkv)``, as
``F.scaled_dot_product_attention(..., enable_gqa=True)``), ``block_mask`` bool
``[B or 1, Hq or 1, ceil(Lq / block_q), ceil(Lk / block_k)]`` (broadcast over batch/heads).
The lengths need not be multiples of the block sizes. ``causal`` masks ``key > query``
element-wise, top-left aligned (``torch.tril``, as SDPA's ``is_causal``).

Rows (queries) with no allowed key give ``out = 0`` and ``lse = -inf``; their gradients
are 0 (never NaN). ``lse`` is float32 (float64 for float64 inputs); the backward
recomputes the probabilities from ``q``, ``k`` and ``lse``.

Ops (``torch.ops.semisparse``):

* ``block_sparse_attention(q, k, v, block_mask, block_q, block_k, scale, causal=False)
  -> (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq])``;
* ``block_sparse_attention_backward(grad_out, q, k, v, out, lse, block_mask, block_q,
  block_k, scale, causal=False) -> (dq, dk, dv)``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BlockMasks",
    "block_sparse_attention",
    "block_sparse_attention_backward_reference",
    "block_sparse_attention_reference",
    "check_block_attention_args",
    "dense_mask_from_block_mask",
]

_lib = torch.library.Library("semisparse", "FRAGMENT")  # noqa: TOR901
_lib.define(
    "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block_q, int block_k, "
    "float scale, bool causal=False) -> (Tensor out, Tensor lse)"
)
_lib.define(
    "block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor block_mask, int block_q, int block_k, float scale, bool causal=False) "
    "-> (Tensor dq, Tensor dk, Tensor dv)"
)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- validation
def check_block_attention_args(q, k, v, block_mask, block_q, block_k, scale, op: str) -> None:
    """Raise (``torch._check``) on bad arguments, with the op's name in the message."""
    torch._check(q.dim() == 4, lambda: f"{op}: q must be 4-D [B, Hq, Lq, D], got shape {tuple(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"{op}: k must be 4-D [B, Hkv, Lk, D], got shape {tuple(k.shape)}")
    torch._check(v.dim() == 4, lambda: f"{op}: v must be 4-D [B, Hkv, Lk, Dv], got shape {tuple(v.shape)}")
    torch._check(
        q.dtype in _FLOATS, lambda: f"{op}: q must be float32/bfloat16/float16/float64, got {q.dtype}"
    )
    torch._check(
        k.dtype == q.dtype and v.dtype == q.dtype,
        lambda: f"{op}: q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}",
    )
    torch._check(
        k.device == q.device and v.device == q.device and block_mask.device == q.device,
        lambda: f"{op}: q, k, v and block_mask must be on one device, got {q.device}, {k.device}, "
        f"{v.device}, {block_mask.device}",
    )
    B, Hq, Lq, D = q.shape
    torch._check(
        k.shape[0] == B and v.shape[0] == B,
        lambda: f"{op}: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}",
    )
    torch._check(
        k.shape[3] == D, lambda: f"{op}: q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}"
    )
    torch._check(
        v.shape[1] == k.shape[1] and v.shape[2] == k.shape[2],
        lambda: f"{op}: k and v must have the same [B, Hkv, Lk], got k {tuple(k.shape)}, v {tuple(v.shape)}",
    )
    Hkv = k.shape[1]
    torch._check(
        Hkv >= 1 and Hq % Hkv == 0,
        lambda: f"{op}: the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hkv})",
    )
    torch._check(
        isinstance(block_q, int) and isinstance(block_k, int) and block_q >= 1 and block_k >= 1,
        lambda: f"{op}: block sizes must be >= 1, got block_q={block_q}, block_k={block_k}",
    )
    torch._check(math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")
    torch._check(block_mask.dtype == torch.bool, lambda: f"{op}: block_mask must be bool, got {block_mask.dtype}")
    Lk = k.shape[2]
    nq, nk = _cdiv(Lq, block_q), _cdiv(Lk, block_k)
    torch._check(
        block_mask.dim() == 4
        and block_mask.shape[0] in (1, B)
        and block_mask.shape[1] in (1, Hq)
        and block_mask.shape[2] == nq
        and block_mask.shape[3] == nk,
        lambda: f"{op}: block_mask must have shape [{B} or 1, {Hq} or 1, ceil(Lq/block_q) = {nq}, "
        f"ceil(Lk/block_k) = {nk}], got {tuple(block_mask.shape)}",
    )


def _check_backward_args(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale, op):
    check_block_attention_args(q, k, v, block_mask, block_q, block_k, scale, op)
    want = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    torch._check(
        tuple(grad_out.shape) == want and tuple(out.shape) == want,
        lambda: f"{op}: grad_out and out must have shape {want}, got {tuple(grad_out.shape)}, {tuple(out.shape)}",
    )
    torch._check(
        grad_out.dtype == q.dtype and out.dtype == q.dtype,
        lambda: f"{op}: grad_out and out must have q's dtype {q.dtype}, got {grad_out.dtype}, {out.dtype}",
    )
    torch._check(
        tuple(lse.shape) == tuple(q.shape[:3]) and lse.dtype == _lse_dtype(q.dtype),
        lambda: f"{op}: lse must be {_lse_dtype(q.dtype)} of shape {tuple(q.shape[:3])}, "
        f"got {lse.dtype} {tuple(lse.shape)}",
    )


# ------------------------------------------------------------- dense masks
def dense_mask_from_block_mask(block_mask, lq: int, lk: int, block_q: int, block_k: int, causal=False):
    """The element mask ``[Bm, Hm, Lq, Lk]`` (True = attend) equivalent to a block mask."""
    m = block_mask.repeat_interleave(block_q, dim=-2).repeat_interleave(block_k, dim=-1)[..., :lq, :lk]
    if causal:
        m = m & torch.ones(lq, lk, dtype=torch.bool, device=block_mask.device).tril()
    return m


# ----------------------------------------------------------------- references
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1) if t.shape[1] != hq else t


def _probs(q, k, block_mask, block_q, block_k, scale, causal, lse=None):
    acc = _acc(q.dtype)
    lq, lk = q.shape[2], k.shape[2]
    mask = dense_mask_from_block_mask(block_mask, lq, lk, block_q, block_k, causal)
    s = (q.to(acc) @ _expand_kv(k, q.shape[1]).to(acc).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
    dead = torch.isneginf(lse).unsqueeze(-1)
    p = torch.where(dead, torch.zeros((), dtype=acc, device=q.device), torch.exp(s - lse.unsqueeze(-1)))
    return p, lse


def block_sparse_attention_reference(q, k, v, block_mask, block_q, block_k, scale, causal=False):
    """Materialises the scores; any device. Returns (out in q's dtype, lse)."""
    p, lse = _probs(q, k, block_mask, block_q, block_k, scale, causal)
    out = p @ _expand_kv(v, q.shape[1]).to(p.dtype)
    return out.to(q.dtype), lse.to(_lse_dtype(q.dtype))


def block_sparse_attention_backward_reference(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale,
                                              causal=False):
    acc = _acc(q.dtype)
    p, _ = _probs(q, k, block_mask, block_q, block_k, scale, causal, lse=lse.to(acc))
    go = grad_out.to(acc)
    ve = _expand_kv(v, q.shape[1]).to(acc)
    ke = _expand_kv(k, q.shape[1]).to(acc)
    delta = (go * out.to(acc)).sum(-1, keepdim=True)
    dp = go @ ve.transpose(-1, -2)
    ds = p * (dp - delta)
    dq = (ds @ ke) * scale
    dk = (ds.transpose(-1, -2) @ q.to(acc)) * scale
    dv = p.transpose(-1, -2) @ go
    B, hkv = k.shape[0], k.shape[1]
    g = q.shape[1] // hkv
    dk = dk.reshape(B, hkv, g, *dk.shape[2:]).sum(2)
    dv = dv.reshape(B, hkv, g, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------- default (reference) kernels
def _fwd_default(q, k, v, block_mask, block_q, block_k, scale, causal=False):
    check_block_attention_args(q, k, v, block_mask, block_q, block_k, scale, "block_sparse_attention")
    return block_sparse_attention_reference(q, k, v, block_mask, block_q, block_k, scale, causal)


def _bwd_default(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale, causal=False):
    _check_backward_args(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale,
                         "block_sparse_attention_backward")
    return block_sparse_attention_backward_reference(grad_out, q, k, v, out, lse, block_mask, block_q, block_k,
                                                     scale, causal)


_lib.impl("block_sparse_attention", _fwd_default, "CompositeExplicitAutograd")
_lib.impl("block_sparse_attention_backward", _bwd_default, "CompositeExplicitAutograd")


# ------------------------------------------------------------- fake kernels
@torch.library.register_fake("semisparse::block_sparse_attention")
def _fwd_fake(q, k, v, block_mask, block_q, block_k, scale, causal=False):
    check_block_attention_args(q, k, v, block_mask, block_q, block_k, scale, "block_sparse_attention")
    B, Hq, Lq, _ = q.shape
    out = q.new_empty(B, Hq, Lq, v.shape[3])
    lse = q.new_empty(B, Hq, Lq, dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("semisparse::block_sparse_attention_backward")
def _bwd_fake(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale, causal=False):
    _check_backward_args(grad_out, q, k, v, out, lse, block_mask, block_q, block_k, scale,
                         "block_sparse_attention_backward")
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


# ---------------------------------------------------------------- autograd
def _setup(ctx, inputs, output):
    q, k, v, block_mask, block_q, block_k, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_mask)
    ctx.args = (block_q, block_k, scale, causal)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, block_mask = ctx.saved_tensors
    block_q, block_k, scale, causal = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.semisparse.block_sparse_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, block_mask, block_q, block_k, scale, causal
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("semisparse::block_sparse_attention", _backward, setup_context=_setup)


# -------------------------------------------------------------- functional
def block_sparse_attention(q, k, v, block_mask, block=(64, 64), scale=None, causal=False) -> torch.Tensor:
    """Block-sparse SDPA; returns ``out [B, Hq, Lq, Dv]``. ``block_mask`` is a bool tensor
    ``[B or 1, Hq or 1, ceil(Lq/block_q), ceil(Lk/block_k)]`` (2-D / 3-D are left-padded
    with 1s), e.g. from :class:`BlockMasks`. ``scale`` defaults to ``1/sqrt(D)``."""
    block_q, block_k = (block, block) if isinstance(block, int) else tuple(block)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    while block_mask.dim() < 4:
        block_mask = block_mask.unsqueeze(0)
    out, _ = torch.ops.semisparse.block_sparse_attention(
        q, k, v, block_mask, int(block_q), int(block_k), float(scale), bool(causal)
    )
    return out


# ------------------------------------------------------------- mask builders
def _blocks(block):
    return (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))


def _diff_ranges(lq, lk, block, device):
    """Per block (i, j): the range [lo, hi] of query - key over its elements."""
    bq, bk = _blocks(block)
    nq, nk = _cdiv(lq, bq), _cdiv(lk, bk)
    qa = torch.arange(nq, device=device) * bq
    qb = torch.clamp(qa + bq - 1, max=lq - 1)
    ka = torch.arange(nk, device=device) * bk
    kb = torch.clamp(ka + bk - 1, max=lk - 1)
    lo = qa[:, None] - kb[None, :]
    hi = qb[:, None] - ka[None, :]
    return lo, hi


class BlockMasks:
    """Builders of bool block masks ``[1, 1, ceil(Lq/block_q), ceil(Lk/block_k)]``
    (``random`` can give ``[B, H, ...]``). Combine them with ``|`` and ``&``."""

    @staticmethod
    def causal(lq: int, lk: int, block=(64, 64), device=None) -> torch.Tensor:
        """Blocks holding at least one (query, key <= query) pair (top-left aligned)."""
        _, hi = _diff_ranges(lq, lk, block, device)
        return (hi >= 0)[None, None]

    @staticmethod
    def sliding_window(lq: int, lk: int, window: int, block=(64, 64), causal=False, device=None) -> torch.Tensor:
        """Blocks holding a pair with ``|query - key| <= window`` (``0 <= query - key <= window``
        if causal)."""
        lo, hi = _diff_ranges(lq, lk, block, device)
        lo_w = 0 if causal else -window
        return ((hi >= lo_w) & (lo <= window))[None, None]

    @staticmethod
    def global_tokens(lq: int, lk: int, g: int, block=(64, 64), device=None) -> torch.Tensor:
        """The first ``g`` query blocks and the first ``g`` key blocks dense."""
        bq, bk = _blocks(block)
        m = torch.zeros(_cdiv(lq, bq), _cdiv(lk, bk), dtype=torch.bool, device=device)
        m[:g, :] = True
        m[:, :g] = True
        return m[None, None]

    @staticmethod
    def random(lq: int, lk: int, density: float, seed: int = 0, block=(64, 64), batch: int = 1, heads: int = 1,
               device=None) -> torch.Tensor:
        """Each block active with probability ``density`` (CPU generator ``seed``)."""
        bq, bk = _blocks(block)
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(batch, heads, _cdiv(lq, bq), _cdiv(lk, bk), generator=g) < density
        return m.to(device) if device is not None else m

    @staticmethod
    def from_dense_mask(mask: torch.Tensor, block=(64, 64)) -> torch.Tensor:
        """A block is active if any element of the bool mask ``[.., Lq, Lk]`` is."""
        bq, bk = _blocks(block)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        lq, lk = mask.shape[-2:]
        nq, nk = _cdiv(lq, bq), _cdiv(lk, bk)
        m = torch.nn.functional.pad(mask, (0, nk * bk - lk, 0, nq * bq - lq))
        return m.reshape(*m.shape[:-2], nq, bq, nk, bk).any(dim=-1).any(dim=-2)

    @staticmethod
    def to_dense(block_mask, lq: int, lk: int, block=(64, 64), causal=False) -> torch.Tensor:
        """The equivalent element mask (for SDPA)."""
        bq, bk = _blocks(block)
        return dense_mask_from_block_mask(block_mask, lq, lk, bq, bk, causal)
