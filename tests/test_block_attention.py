"""semisparse::block_sparse_attention{,_backward}: native CPU kernels and the pure-torch
reference vs F.scaled_dot_product_attention with the equivalent dense mask."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import semisparse.ops  # noqa: F401  (loads the native library)
import torch
import torch.nn.functional as F
from conftest import native_loaded
from semisparse.ops import block_attention as ba
from semisparse.ops.block_attention import BlockMasks

OP = torch.ops.semisparse.block_sparse_attention
BWD = torch.ops.semisparse.block_sparse_attention_backward

TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}


def test_native_kernel_registered():
    if os.environ.get("SEMISPARSE_REQUIRE_NATIVE") != "1" and not native_loaded():
        pytest.skip("native library not loaded")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("semisparse::block_sparse_attention", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("semisparse::block_sparse_attention_backward", "CPU")


def test_native_library_loaded_before_the_schema():
    # the library's registrations do not need the schema first: a fresh process loads the
    # native library (semisparse.ops) and only then defines the schema
    code_after = (
        "import torch, semisparse.ops, semisparse.ops.block_attention;"
        "assert torch._C._dispatch_has_kernel_for_dispatch_key('semisparse::block_sparse_attention', 'CPU')"
    )
    env = dict(os.environ)
    if not native_loaded():
        pytest.skip("native library not loaded")
    r = subprocess.run([sys.executable, "-c", code_after], check=False, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ helpers
def _inputs(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def _sdpa(q, k, v, block_mask, bq, bk, scale, causal):
    """SDPA in fp64 (fp32 accumulate is the claim; fp64 is the ground truth) with the dense
    mask; fully masked rows (NaN in SDPA) -> 0."""
    lq, lk = q.shape[2], k.shape[2]
    dense = BlockMasks.to_dense(block_mask, lq, lk, (bq, bk), causal=causal)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=True)
    dead = ~dense.any(-1, keepdim=True)
    return torch.where(dead, torch.zeros((), dtype=out.dtype), out)


def _masks(kind, B, Hq, Lq, Lk, bq, bk):
    blk = (bq, bk)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if kind == "causal":
        return BlockMasks.causal(Lq, Lk, blk)
    if kind == "sliding":
        return BlockMasks.sliding_window(Lq, Lk, 2 * bk, blk)
    if kind == "sliding_causal":
        return BlockMasks.sliding_window(Lq, Lk, bk, blk, causal=True)
    if kind == "global":
        return BlockMasks.global_tokens(Lq, Lk, 1, blk) | BlockMasks.sliding_window(Lq, Lk, 0, blk)
    if kind == "random":
        return BlockMasks.random(Lq, Lk, 0.3, seed=3, block=blk, batch=B, heads=Hq)
    if kind == "user":
        g = torch.Generator().manual_seed(7)
        return torch.rand(1, Hq, nq, nk, generator=g) < 0.5
    if kind == "all":
        return torch.ones(1, 1, nq, nk, dtype=torch.bool)
    if kind == "empty_rows":  # some query blocks without any active key block, one row all empty
        m = BlockMasks.random(Lq, Lk, 0.5, seed=5, block=blk, batch=B, heads=1)
        m[:, :, 0] = False
        m[0, 0, -1] = False
        return m
    if kind == "none":
        return torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    raise AssertionError(kind)


KINDS = ("causal", "sliding", "sliding_causal", "global", "random", "user", "all", "empty_rows", "none")


def _run(q, k, v, m, bq, bk, scale, causal):
    out, lse = OP(q, k, v, m, bq, bk, scale, causal)
    return out, lse


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_vs_sdpa_mask_kinds(kind, causal):
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 77, 90, 24
    bq, bk = 16, 32
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D)
    m = _masks(kind, B, Hq, Lq, Lk, bq, bk)
    scale = 0.3
    out, lse = _run(q, k, v, m, bq, bk, scale, causal)
    ref = _sdpa(q.double(), k.double(), v.double(), m, bq, bk, scale, causal)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.shape == (B, Hq, Lq, D) and lse.shape == (B, Hq, Lq)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    assert not torch.isnan(out).any()
    # lse: -inf exactly on rows without keys, logsumexp of the allowed scores elsewhere
    dense = BlockMasks.to_dense(m, Lq, Lk, (bq, bk), causal=causal).expand(B, Hq, Lq, Lk)
    s = (q.double() @ k.double().repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
    ref_lse = torch.logsumexp(s.masked_fill(~dense, float("-inf")), -1)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    live = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(lse.double()[live], ref_lse[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape",
    [
        # B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk
        (1, 1, 1, 64, 64, 64, 64, 64, 64),
        (1, 8, 2, 130, 200, 32, 32, 64, 64),  # GQA 4, lengths not multiple of the blocks
        (2, 6, 3, 33, 17, 16, 8, 8, 4),  # Dv != D, small blocks
        (1, 2, 1, 5, 300, 7, 5, 3, 50),  # odd dims (padding), block_k > 16 not a multiple
        (1, 4, 4, 100, 40, 80, 48, 128, 7),  # one query block larger than Lq
        (1, 2, 2, 1, 1, 1, 1, 1, 1),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes_gqa(shape, causal):
    B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk = shape
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv)
    m = BlockMasks.random(Lq, Lk, 0.6, seed=1, block=(bq, bk), batch=B, heads=Hq)
    m[..., 0, 0] = True
    out, _ = _run(q, k, v, m, bq, bk, D**-0.5, causal)
    ref = _sdpa(q.double(), k.double(), v.double(), m, bq, bk, D**-0.5, causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("mshape", [(1, 1), (2, 1), (1, 4), (2, 4)])
def test_mask_broadcast(mshape):
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 2, 4, 1, 40, 50, 16, 16, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D)
    g = torch.Generator().manual_seed(11)
    m = torch.rand(*mshape, 3, 4, generator=g) < 0.5
    out, _ = _run(q, k, v, m, bq, bk, 0.25, False)
    ref = _sdpa(q.double(), k.double(), v.double(), m, bq, bk, 0.25, False)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-5)
    # the broadcast mask gives the same result as the expanded one
    out2, _ = _run(q, k, v, m.expand(B, Hq, 3, 4).contiguous(), bq, bk, 0.25, False)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_dtypes(dtype, causal):
    B, Hq, Hkv, Lq, Lk, D, bq, bk = 1, 4, 2, 70, 70, 32, 16, 16
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, dtype=dtype)
    m = _masks("random", B, Hq, Lq, Lk, bq, bk)
    out, lse = _run(q, k, v, m, bq, bk, D**-0.5, causal)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = _sdpa(q.double(), k.double(), v.double(), m, bq, bk, D**-0.5, causal)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)


def test_fp32_matches_sdpa_fp32():
    # the claim in the issue: numerics of SDPA in fp32
    q, k, v = _inputs(1, 4, 4, 200, 200, 64)
    m = _masks("random", 1, 4, 200, 200, 64, 64)
    out, _ = _run(q, k, v, m, 64, 64, 0.125, True)
    ref = _sdpa(q, k, v, m, 64, 64, 0.125, True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_isa_paths_agree(isa):
    q, k, v = _inputs(1, 4, 2, 100, 130, 64, requires_grad=True)
    m = _masks("random", 1, 4, 100, 130, 32, 32)
    out = ba.block_sparse_attention(q, k, v, m, (32, 32), causal=True)
    ref = _sdpa(q.detach().double(), k.detach().double(), v.detach().double(), m, 32, 32, 64**-0.5, True)
    torch.testing.assert_close(out.detach().double(), ref, rtol=1e-5, atol=2e-5)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = _sdpa(qd, kd, vd, m, 32, 32, 64**-0.5, True)
    gr = torch.autograd.grad(r, (qd, kd, vd), go.double())
    for a, b in zip(g, gr):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_reference_matches_native():
    q, k, v = _inputs(2, 4, 2, 50, 60, 16, dtype=torch.float64)
    m = _masks("empty_rows", 2, 4, 50, 60, 16, 16)
    out, lse = _run(q, k, v, m, 16, 16, 0.2, True)
    rout, rlse = ba.block_sparse_attention_reference(q, k, v, m, 16, 16, 0.2, True)
    torch.testing.assert_close(out, rout)
    torch.testing.assert_close(lse, rlse)
    go = torch.randn_like(out)
    g = BWD(go, q, k, v, out, lse, m, 16, 16, 0.2, True)
    rg = ba.block_sparse_attention_backward_reference(go, q, k, v, out, lse, m, 16, 16, 0.2, True)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------- backward
@pytest.mark.parametrize("kind", ["causal", "random", "global", "empty_rows", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_fp32_vs_sdpa(kind, causal):
    B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk = 2, 4, 2, 45, 70, 16, 24, 16, 32
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, requires_grad=True)
    m = _masks(kind, B, Hq, Lq, Lk, bq, bk)
    out = ba.block_sparse_attention(q, k, v, m, (bq, bk), scale=0.3, causal=causal)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _sdpa(qd, kd, vd, m, bq, bk, 0.3, causal)
    gr = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for a, b in zip(g, gr):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_backward_fp32_vs_sdpa_autograd_fp32():
    q, k, v = _inputs(1, 4, 2, 128, 128, 64, requires_grad=True)
    m = _masks("random", 1, 4, 128, 128, 32, 32) | BlockMasks.causal(128, 128, (32, 32))
    out = ba.block_sparse_attention(q, k, v, m, (32, 32), causal=True)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = _sdpa(qr, kr, vr, m, 32, 32, 0.125, True)
    gr = torch.autograd.grad(ref, (qr, kr, vr), go)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["random", "empty_rows"])
def test_gradcheck_fp64(causal, kind):
    B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk = 1, 4, 2, 11, 13, 5, 3, 4, 3
    q, k, v = _inputs(B, Hq, Hkv, Lq, Lk, D, Dv, dtype=torch.float64, requires_grad=True)
    m = _masks(kind, B, Hq, Lq, Lk, bq, bk)
    fn = lambda q, k, v: ba.block_sparse_attention(q, k, v, m, (bq, bk), scale=0.7, causal=causal)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_half(dtype):
    q, k, v = _inputs(1, 2, 1, 40, 40, 32, dtype=dtype, requires_grad=True)
    m = _masks("random", 1, 2, 40, 40, 16, 16)
    out = ba.block_sparse_attention(q, k, v, m, (16, 16), causal=True)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _sdpa(qd, kd, vd, m, 16, 16, 32**-0.5, True)
    gr = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for a, b in zip(g, gr):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=5e-2, atol=5e-2)


def test_fully_masked_gradients_are_zero():
    q, k, v = _inputs(1, 2, 2, 20, 20, 8, requires_grad=True)
    m = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    out = ba.block_sparse_attention(q, k, v, m, (16, 16))
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


# ------------------------------------------------------------ opcheck / compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(dtype, causal):
    q, k, v = _inputs(1, 4, 2, 33, 40, 16, dtype=dtype, requires_grad=True)
    m = _masks("random", 1, 4, 33, 40, 16, 16)
    torch.library.opcheck(OP, (q, k, v, m, 16, 16, 0.25, causal))
    out, lse = OP(q.detach(), k.detach(), v.detach(), m, 16, 16, 0.25, causal)
    go = torch.randn_like(out)
    torch.library.opcheck(BWD, (go, q.detach(), k.detach(), v.detach(), out, lse, m, 16, 16, 0.25, causal))


def test_compile_fullgraph():
    q, k, v = _inputs(1, 4, 2, 64, 64, 16, requires_grad=True)
    m = _masks("random", 1, 4, 64, 64, 16, 16)

    def f(q, k, v, m):
        return ba.block_sparse_attention(q, k, v, m, (16, 16), causal=True) * 2

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = cf(q, k, v, m)
    ref = f(q, k, v, m)
    torch.testing.assert_close(out, ref)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    gr = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_compile_inductor():
    q, k, v = _inputs(1, 2, 2, 32, 32, 16)
    m = _masks("causal", 1, 2, 32, 32, 16, 16)
    cf = torch.compile(lambda q, k, v: ba.block_sparse_attention(q, k, v, m, (16, 16), causal=True), fullgraph=True)
    torch.testing.assert_close(cf(q, k, v), ba.block_sparse_attention(q, k, v, m, (16, 16), causal=True))


# ----------------------------------------------------------------- bad input
def _bad(q, k, v, m, bq=16, bk=16, match=""):
    with pytest.raises((RuntimeError, ValueError), match=match):
        OP(q, k, v, m, bq, bk, 0.5, False)


def test_bad_inputs():
    q, k, v = _inputs(2, 4, 2, 32, 48, 16)
    m = torch.ones(1, 1, 2, 3, dtype=torch.bool)
    _bad(q[0], k, v, m, match="q must be 4-D")
    _bad(q, k[:1], v[:1], m, match="batch sizes differ")
    _bad(q, k[..., :8], v, m, match="head dims differ")
    _bad(q, k, v[:, :, :40], m, match="k and v must have the same")
    _bad(q[:, :3], k, v, m, match=r"multiple of the key/value heads")
    _bad(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool), match="block_mask must have shape")
    _bad(q, k, v, torch.ones(3, 1, 2, 3, dtype=torch.bool), match="block_mask must have shape")
    _bad(q, k, v, torch.ones(1, 2, 2, 3, dtype=torch.bool), match="block_mask must have shape")
    _bad(q, k, v, torch.ones(2, 3, dtype=torch.bool), match="block_mask must have shape")
    _bad(q, k, v, m.float(), match="block_mask must be bool")
    _bad(q, k.double(), v, m, match="same dtype")
    _bad(q.int(), k.int(), v.int(), m, match="float32/bfloat16/float16/float64")
    _bad(q, k, v, m, bq=0, match="block sizes must be >= 1")


def test_bad_backward_inputs():
    q, k, v = _inputs(1, 2, 2, 32, 32, 16)
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    out, lse = OP(q, k, v, m, 16, 16, 0.5, False)
    with pytest.raises((RuntimeError, ValueError), match="grad_out"):
        BWD(out[:, :, :5], q, k, v, out, lse, m, 16, 16, 0.5, False)
    with pytest.raises((RuntimeError, ValueError), match="lse"):
        BWD(out, q, k, v, out, lse.double(), m, 16, 16, 0.5, False)


def test_reference_checks_too():
    # the CompositeExplicitAutograd fallback (meta device) validates the same way
    q, k, v = (t.to("meta") for t in _inputs(1, 3, 2, 8, 8, 4))
    with pytest.raises((RuntimeError, ValueError), match="multiple of the key/value heads"):
        OP(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool, device="meta"), 8, 8, 1.0, False)


# --------------------------------------------------------------- mask builders
def test_mask_builders():
    L, blk = 200, (32, 32)
    nb = 7
    c = BlockMasks.causal(L, L, blk)
    assert c.shape == (1, 1, nb, nb) and torch.equal(c[0, 0], torch.ones(nb, nb, dtype=torch.bool).tril())
    dense_causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(BlockMasks.from_dense_mask(dense_causal, blk), c)
    i = torch.arange(L)
    d = i[:, None] - i[None, :]
    for w, causal in [(0, False), (40, False), (40, True), (100, True)]:
        dense = (d.abs() <= w) if not causal else ((d >= 0) & (d <= w))
        got = BlockMasks.sliding_window(L, L, w, blk, causal=causal)
        assert torch.equal(got, BlockMasks.from_dense_mask(dense, blk)), (w, causal)
    gt = BlockMasks.global_tokens(L, L, 2, blk)[0, 0]
    assert gt[:2].all() and gt[:, :2].all() and not gt[2:, 2:].any()
    r = BlockMasks.random(L, 300, 0.3, seed=1, block=blk, batch=2, heads=3)
    assert r.shape == (2, 3, 7, 10) and r.dtype == torch.bool
    assert torch.equal(r, BlockMasks.random(L, 300, 0.3, seed=1, block=blk, batch=2, heads=3))
    # from_dense_mask: non-multiple sizes, batch/head dims kept
    dm = torch.rand(2, 3, 50, 70) < 0.01
    bm = BlockMasks.from_dense_mask(dm, (16, 16))
    assert bm.shape == (2, 3, 4, 5)
    for a in range(4):
        for b in range(5):
            assert torch.equal(bm[:, :, a, b], dm[:, :, a * 16 : (a + 1) * 16, b * 16 : (b + 1) * 16].any(-1).any(-1))


def test_from_dense_mask_covers_the_dense_mask():
    # the block mask is the smallest block cover of the element mask
    dm = torch.rand(60, 60, generator=torch.Generator().manual_seed(2)) < 0.02
    bm = BlockMasks.from_dense_mask(dm, (16, 16))
    cover = BlockMasks.to_dense(bm, 60, 60, (16, 16))[0, 0]
    assert torch.equal(cover & dm, dm)
    assert not bm.all()  # sparse enough that some blocks are empty
    assert torch.equal(BlockMasks.from_dense_mask(cover, (16, 16)), bm)


# --------------------------------------------------------------------- module
def test_module_matches_sdpa():
    from semisparse.nn.block_attention import BlockSparseAttention

    torch.manual_seed(0)
    mod = BlockSparseAttention(64, 8, num_kv_heads=2, block=(16, 16))
    x = torch.randn(2, 50, 64, requires_grad=True)
    m = BlockMasks.causal(50, 50, (16, 16)) | BlockMasks.random(50, 50, 0.3, seed=4, block=(16, 16), heads=8)
    y = mod(x, m, causal=True)
    assert y.shape == (2, 50, 64)
    B, L, H, Hk, hd = 2, 50, 8, 2, 8
    q = mod.q_proj(x).view(B, L, H, hd).transpose(1, 2)
    k = mod.k_proj(x).view(B, L, Hk, hd).transpose(1, 2)
    v = mod.v_proj(x).view(B, L, Hk, hd).transpose(1, 2)
    ref = _sdpa(q, k, v, m, 16, 16, hd**-0.5, True)
    ref = mod.o_proj(ref.transpose(1, 2).reshape(B, L, 64))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, [x, *mod.parameters()], gy)
    gr = torch.autograd.grad(ref, [x, *mod.parameters()], gy)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        BlockSparseAttention(64, 8, num_kv_heads=3)


def test_zero_value_dim_still_gives_lse():
    """Dv == 0: out is empty but lse is still the logsumexp of the allowed scores."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 70, 16, generator=g), torch.randn(1, 1, 50, 16, generator=g)
    v = torch.randn(1, 1, 50, 0)
    m = torch.rand(1, 2, 3, 2, generator=g) < 0.6
    for causal in (False, True):
        out, lse = OP(q, k, v, m, 32, 32, 0.25, causal)
        out_ref, lse_ref = ba.block_sparse_attention_reference(q, k, v, m, 32, 32, 0.25, causal)
        assert out.shape == out_ref.shape == (1, 2, 70, 0)
        torch.testing.assert_close(lse, lse_ref)
