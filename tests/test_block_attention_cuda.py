"""CUDA kernels of block-sparse attention (libsemisparse_cuda), forward and backward,
against the pure-torch references and PyTorch's SDPA with the equivalent dense mask: every
mask kind (causal, sliding window, global tokens, random, all, none, rows without any
active block), GQA, head dims 64 and 128 (the tensor-core path) and 32 / 80 (the fallback),
lengths that are not multiples of the blocks, fp16 / bf16 / fp32 / fp64, with the
allocator's free memory poisoned with NaN first. Skipped unless a CUDA device is present and
the native CUDA library has these kernels."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import cuda_skip_reason
from semisparse.ops import block_attention as ba
from semisparse.ops.block_attention import BlockMasks

_SKIP = cuda_skip_reason("block_sparse_attention")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

OP = torch.ops.semisparse.block_sparse_attention
BWD = torch.ops.semisparse.block_sparse_attention_backward

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 5e-5), torch.bfloat16: (2e-2, 3e-2),
       torch.float16: (5e-3, 5e-3)}


def _poison() -> None:
    free = torch.cuda.mem_get_info()[0]
    t = torch.full((min(free // 8, 1 << 27),), float("nan"), device="cuda")
    del t


def _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g, device="cuda").to(dtype)
    return q, k, v


def _mask(kind, B, Hq, Lq, Lk, bq, bk):
    blk = (bq, bk)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if kind == "causal":
        m = BlockMasks.causal(Lq, Lk, blk)
    elif kind == "sliding":
        m = BlockMasks.sliding_window(Lq, Lk, 2 * bk, blk)
    elif kind == "global":
        m = BlockMasks.global_tokens(Lq, Lk, 1, blk) | BlockMasks.sliding_window(Lq, Lk, 0, blk)
    elif kind == "random":
        m = BlockMasks.random(Lq, Lk, 0.3, seed=3, block=blk, batch=B, heads=Hq)
    elif kind == "all":
        m = torch.ones(1, 1, nq, nk, dtype=torch.bool)
    elif kind == "empty_rows":
        m = BlockMasks.random(Lq, Lk, 0.5, seed=5, block=blk, batch=B, heads=1)
        m[:, :, 0] = False
    elif kind == "none":
        m = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    else:
        raise AssertionError(kind)
    return m.cuda()


@pytest.fixture
def kernel(request):
    """Force a path with SEMISPARSE_BLOCK_ATTENTION_KERNEL (auto | flash | simt) for one test:
    a forced 'flash' raises rather than falling back, so the tensor-core path is really tested."""
    old = os.environ.get("SEMISPARSE_BLOCK_ATTENTION_KERNEL")

    def set_(name):
        os.environ["SEMISPARSE_BLOCK_ATTENTION_KERNEL"] = name

    yield set_
    if old is None:
        os.environ.pop("SEMISPARSE_BLOCK_ATTENTION_KERNEL", None)
    else:
        os.environ["SEMISPARSE_BLOCK_ATTENTION_KERNEL"] = old


def _check(B, Hq, Hkv, Lq, Lk, D, bq, bk, kind, causal, dtype, seed=0):
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype, seed)
    m = _mask(kind, B, Hq, Lq, Lk, bq, bk)
    scale = D ** -0.5
    out_ref, lse_ref = ba.block_sparse_attention_reference(q, k, v, m, bq, bk, scale, causal)
    _poison()
    out, lse = OP(q, k, v, m, bq, bk, scale, causal)
    torch.cuda.synchronize()
    assert out.shape == out_ref.shape and out.dtype == dtype and lse.shape == lse_ref.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), out_ref.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(lse.double(), lse_ref.double(), rtol=rtol, atol=atol)
    # backward against the reference backward (which the CPU tests check against SDPA)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    go = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    ref = ba.block_sparse_attention_backward_reference(go, q, k, v, out_ref, lse_ref, m, bq, bk, scale, causal)
    _poison()
    got = BWD(go, q, k, v, out, lse, m, bq, bk, scale, causal)
    torch.cuda.synchronize()
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.double(), r.double(), rtol=rtol * 4, atol=atol * 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("kind", ["causal", "sliding", "global", "random", "all", "empty_rows", "none"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("path", ["flash", "simt"])
def test_fast_path(dtype, D, kind, causal, path, kernel):
    kernel(path)
    _check(2, 4, 2, 300, 260, D, 64, 64, kind, causal, dtype)


@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 64), (128, 128), (128, 64), (48, 80)])
def test_block_sizes(bq, bk, kernel):
    kernel("flash")
    _check(1, 2, 1, 257, 384, 64, bq, bk, "random", False, torch.bfloat16, seed=2)
    _check(1, 2, 2, 256, 256, 128, bq, bk, "causal", True, torch.float16, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [32, 64])
def test_fallback_dtypes(dtype, D):
    _check(1, 2, 1, 130, 100, D, 32, 32, "random", True, dtype, seed=4)


@pytest.mark.parametrize("D", [32, 80])
def test_fallback_head_dims(D):
    _check(1, 2, 1, 130, 100, D, 64, 64, "sliding", False, torch.bfloat16, seed=5)


def test_matches_sdpa_long():
    dtype, D, L, blk = torch.bfloat16, 128, 2048, 128
    q, k, v = _inputs(1, 8, 2, L, L, D, dtype, seed=6)
    m = BlockMasks.random(L, L, 0.1, seed=1, block=(blk, blk), batch=1, heads=8).cuda() | \
        BlockMasks.sliding_window(L, L, 0, (blk, blk)).cuda()
    out, _ = OP(q, k, v, m, blk, blk, D ** -0.5, True)
    dense = BlockMasks.to_dense(m, L, L, (blk, blk), causal=True)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=3e-2)


def test_autograd_and_compile():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 256, 256, 64, torch.bfloat16, seed=7))
    m = _mask("random", 1, 2, 256, 256, 64, 64)
    f = torch.compile(lambda q, k, v: ba.block_sparse_attention(q, k, v, m, (64, 64), causal=True), fullgraph=True)
    out = f(q, k, v)
    out.float().sum().backward()
    q2, k2, v2 = (t.detach().cpu().requires_grad_() for t in (q, k, v))
    ref = ba.block_sparse_attention(q2, k2, v2, m.cpu(), (64, 64), causal=True)
    ref.float().sum().backward()
    torch.testing.assert_close(out.cpu().float(), ref.float(), rtol=2e-2, atol=3e-2)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.cpu().float(), b.grad.float(), rtol=5e-2, atol=5e-2)
