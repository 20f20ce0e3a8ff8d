"""The semisparse::sparse24_* ops against their pure-torch references, opcheck and
gradcheck. The linear checks run under every CPU SIMD path (the ``isa`` fixture)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from conftest import DTYPES, KERNEL_DTYPES, assert_bit_equal, canon_zero, random_24, sparse24_dense
from semisparse.ops import sparse24 as ops

compress = torch.ops.semisparse.sparse24_compress
decompress = torch.ops.semisparse.sparse24_decompress
linear = torch.ops.semisparse.sparse24_linear

MS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 100, 131)  # 131: every GEMM path, with tails
KS = (20, 36, 100, 64, 256, 528)
LEADING = ((), (3,), (2, 3))
VALID_CODES = (4, 8, 9, 12, 13, 14)  # (0,1) (0,2) (1,2) (0,3) (1,3) (2,3)


def random_compressed(n, k, dtype, gen=None, garbage_padding=False):
    """Random values and a random *valid* meta (any of the six patterns per group)."""
    values = torch.randn(n, k // 2, generator=gen, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 6, (n, k // 4), generator=gen)
    codes = torch.tensor(VALID_CODES, dtype=torch.uint8)[idx]
    if codes.shape[1] % 2:
        pad = (
            torch.randint(0, 16, (n, 1), generator=gen, dtype=torch.uint8)
            if garbage_padding
            else torch.zeros(n, 1, dtype=torch.uint8)
        )
        codes = torch.cat([codes, pad], 1)
    pairs = codes.reshape(n, -1, 2)
    meta = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return values, meta


def assert_linear_close(y, ref, x, w, bias, dtype):
    """|y - ref| within a tolerance relative to the magnitude |x| @ |W|^T + |b|."""
    assert y.shape == ref.shape and y.dtype == ref.dtype == dtype
    mag = x.double().abs() @ w.double().abs().t()
    if bias is not None:
        mag = mag + bias.double().abs()
    rel = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    err = (y.double() - ref.double()).abs()
    bound = rel * mag + 1e-30
    bad = err > bound
    assert not bool(bad.any()), (
        f"max err {err.max().item():.3g}, max allowed {bound[bad].min().item():.3g}, "
        f"{int(bad.sum())} of {bad.numel()} outside"
    )


# ------------------------------------------------------------------ compress
@given(w=sparse24_dense(max_n=40, max_k=160))
def test_compress_matches_reference(w):
    v, m = compress(w)
    rv, rm = ops.compress_reference(w)
    assert_bit_equal(v, rv)
    assert torch.equal(m, rm) and m.dtype == torch.uint8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 4), (5, 20), (17, 36), (64, 528), (3, 100)])
def test_compress_matches_reference_dense_input(dtype, n, k):
    """On input that is not 2:4 the op and the reference agree too (same code table)."""
    w = torch.randn(n, k, dtype=torch.float64).to(dtype)
    w[torch.rand(n, k) < 0.3] = 0.0
    w[torch.rand(n, k) < 0.1] = -0.0
    v, m = compress(w)
    rv, rm = ops.compress_reference(w)
    assert_bit_equal(v, rv)
    assert torch.equal(m, rm)


def test_compress_meta_codes_and_empty():
    v, m = compress(torch.zeros(0, 8))
    assert v.shape == (0, 4) and m.shape == (0, 1)
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    v, m = compress(w)
    assert ops.codes_from_meta(m, 12).tolist() == [[ops.CODE_FROM_MASK[0], 4, ops.CODE_FROM_MASK[8]]]
    assert v.tolist() == [[0.0, 0.0, 1.0, 2.0, 0.0, 3.0]]


def test_compress_errors():
    with pytest.raises(RuntimeError, match="multiple of 4"):
        compress(torch.zeros(3, 6))
    with pytest.raises(RuntimeError, match="2-D"):
        compress(torch.zeros(3, 4, 4))
    with pytest.raises(RuntimeError):
        compress(torch.zeros(3, 8, dtype=torch.int32))


# ---------------------------------------------------------------- decompress
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 4), (7, 20), (16, 36), (33, 100), (64, 528)])
def test_decompress_matches_reference(dtype, n, k, gen):
    values, meta = random_compressed(n, k, dtype, gen, garbage_padding=True)
    d = decompress(values, meta)
    assert_bit_equal(d, ops.decompress_reference(values, meta))
    # and compressing it again gives the values back (all kept values non-zero here)
    v2, m2 = compress(d)
    values_nz = canon_zero(values)
    if bool((values_nz != 0).all()):
        assert_bit_equal(v2, values_nz)
        assert torch.equal(ops.codes_from_meta(m2, k), ops.codes_from_meta(meta, k))


@given(w=sparse24_dense(max_n=40, max_k=160))
def test_decompress_round_trip_property(w):
    v, m = compress(w)
    assert_bit_equal(decompress(v, m), canon_zero(w))
    assert_bit_equal(ops.decompress_reference(v, m), canon_zero(w))


def test_decompress_errors():
    v, m = random_compressed(4, 16, torch.float32)
    with pytest.raises(RuntimeError, match="meta"):
        decompress(v, m[:, :1])
    with pytest.raises(RuntimeError, match="uint8"):
        decompress(v, m.to(torch.int16))
    with pytest.raises(RuntimeError):
        decompress(v[:, :3], m)  # K = 6 is not a multiple of 4


# ------------------------------------------------------------------- linear
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_linear_matches_reference(isa, dtype, k, bias, gen):
    """Every M (rows of x) in MS, x 2-D and 3-D, against linear_reference."""
    for i, m in enumerate(MS):
        n = (1, 8, 9, 65, 130)[i % 5]
        values, meta = random_compressed(n, k, dtype, gen)
        b = torch.randn(n, generator=gen).to(dtype) if bias else None
        w = ops.decompress_reference(values, meta)
        for shape in ((m, k), (2, m, k)):
            x = torch.randn(*shape, generator=gen).to(dtype)
            y = linear(x, values, meta, b)
            ref = ops.linear_reference(x, values, meta, b)
            assert y.shape == (*shape[:-1], n)
            assert_linear_close(y, ref, x, w, b, dtype)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("leading", LEADING, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_leading_shapes(isa, dtype, leading, bias, gen):
    for k in KS:
        for n in (1, 5, 64, 70):
            values, meta = random_compressed(n, k, dtype, gen)
            b = torch.randn(n, generator=gen).to(dtype) if bias else None
            x = torch.randn(*leading, k, generator=gen).to(dtype)
            y = linear(x, values, meta, b)
            assert y.shape == (*leading, n)
            ref = ops.linear_reference(x, values, meta, b)
            assert_linear_close(y, ref, x, ops.decompress_reference(values, meta), b, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("k", (20, 64, 528))
def test_linear_identity_returns_weight(isa, dtype, k):
    """x = I: y = W^T exactly (every output is one kept value times 1)."""
    w = random_24(70, k, dtype, underfill=0.2)
    v, m = compress(w)
    for rows in (1, 4, 5, k):
        x = torch.eye(k, dtype=dtype)[:rows]
        y = linear(x, v, m)
        assert_bit_equal(y, canon_zero(w.t()[:rows]).contiguous())


def test_linear_non_contiguous_and_empty(isa):
    values, meta = random_compressed(24, 64, torch.float32)
    x = torch.randn(64, 10).t()  # non-contiguous
    vt = values.t().contiguous().t()
    b = torch.randn(48)[::2]
    y = linear(x, vt, meta, b)
    ref = ops.linear_reference(x.contiguous(), values, meta, b.contiguous())
    assert_linear_close(y, ref, x, ops.decompress_reference(values, meta), b, torch.float32)
    y0 = linear(torch.randn(0, 64), values, meta, None)
    assert y0.shape == (0, 24)
    y0 = linear(torch.randn(2, 0, 64), values, meta, None)
    assert y0.shape == (2, 0, 24)


def test_linear_special_values(isa):
    """inf and NaN in x propagate like in the reference; zeros in pruned positions never
    multiply a non-finite x (the kernel reads only kept columns)."""
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    v, m = compress(w)
    x = torch.tensor([[1.0, torch.inf, 1.0, torch.nan, 1.0, 1.0, 1.0, 1.0]])
    y = linear(x, v, m)
    assert y.tolist() == [[10.0]]
    x[0, 0] = torch.inf
    assert linear(x, v, m).tolist() == [[torch.inf]]
    x[0, 2] = -torch.inf
    assert bool(torch.isnan(linear(x, v, m)).all())


def test_linear_errors():
    values, meta = random_compressed(8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="K=16"):
        linear(torch.randn(2, 12), values, meta)
    with pytest.raises(RuntimeError, match="dtype"):
        linear(torch.randn(2, 16, dtype=torch.float64), values, meta)
    with pytest.raises(RuntimeError, match="bias"):
        linear(torch.randn(2, 16), values, meta, torch.randn(7))
    with pytest.raises(RuntimeError, match="bias"):
        linear(torch.randn(2, 16), values, meta, torch.randn(8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="meta"):
        linear(torch.randn(2, 16), values, meta[:, :1])


# ------------------------------------------------------------------ opcheck
OPCHECK_DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
@pytest.mark.parametrize("k", (20, 64))
def test_opcheck_compress_decompress(dtype, k):
    w = random_24(6, k, dtype, underfill=0.3)
    torch.library.opcheck(compress, (w,))
    v, m = compress(w)
    torch.library.opcheck(decompress, (v, m))
    torch.library.opcheck(decompress, (v.clone().requires_grad_(), m))


@pytest.mark.parametrize("dtype", OPCHECK_DTYPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    "x_grad,v_grad", [(True, False), (False, True), (True, True), (False, False)], ids=["gx", "gv", "gxgv", "nograd"]
)
@pytest.mark.parametrize("xshape", [(20,), (3, 20), (2, 5, 20)], ids=["1d", "2d", "3d"])
def test_opcheck_linear(dtype, bias, x_grad, v_grad, xshape):
    values, meta = random_compressed(6, 20, dtype)
    x = torch.randn(*xshape).to(dtype).requires_grad_(x_grad)
    v = values.clone().requires_grad_(v_grad)
    b = torch.randn(6).to(dtype).requires_grad_(v_grad) if bias else None
    torch.library.opcheck(linear, (x, v, meta, b))


# ---------------------------------------------------------------- autograd
@pytest.mark.parametrize("xshape", [(12,), (3, 12), (2, 3, 12)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck_float64(xshape, bias):
    g = torch.Generator().manual_seed(3)
    values, meta = random_compressed(5, 12, torch.float64, g)
    x = torch.randn(*xshape, dtype=torch.float64, generator=g, requires_grad=True)
    v = values.clone().requires_grad_()
    inputs = [x, v]
    if bias:
        inputs.append(torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True))

    def f(x, v, *b):
        return linear(x, v, meta, b[0] if b else None)

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_gradcheck_decompress_float64():
    """decompress is differentiable in values (so SparseLinear.weight carries a gradient)."""
    values, meta = random_compressed(5, 20, torch.float64)
    v = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: decompress(v, meta), (v,))
    # its gradient is the dense gradient at the kept positions
    g = torch.randn(5, 20, dtype=torch.float64)
    (gv,) = torch.autograd.grad(decompress(v, meta), (v,), g)
    assert torch.equal(gv, g.gather(1, ops.kept_columns(meta, 20)))


def test_meta_gets_no_gradient():
    values, meta = random_compressed(5, 12, torch.float64)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    v = values.clone().requires_grad_()
    y = linear(x, v, meta, None)
    y.sum().backward()
    assert meta.grad is None and not meta.requires_grad
    assert v.grad.shape == v.shape and x.grad.shape == x.shape
    with pytest.raises(RuntimeError):
        meta.requires_grad_()  # meta is an integer tensor: it cannot carry a gradient


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("xshape", [(36,), (7, 36), (2, 5, 36)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_backward_matches_reference_autograd(isa, dtype, xshape, bias):
    g = torch.Generator().manual_seed(11)
    values, meta = random_compressed(9, 36, dtype, g)
    x0 = torch.randn(*xshape, generator=g).to(dtype)
    b0 = torch.randn(9, generator=g).to(dtype) if bias else None
    gy = torch.randn(*xshape[:-1], 9, generator=g).to(dtype)

    def run(fn):
        x = x0.clone().requires_grad_()
        v = values.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        y = fn(x, v, meta, b)
        y.backward(gy)
        return y.detach(), x.grad, v.grad, (b.grad if bias else None)

    y, gx, gv, gb = run(linear)
    ry, rgx, rgv, rgb = run(ops.linear_reference)
    w = ops.decompress_reference(values, meta)
    assert_linear_close(y, ry, x0, w, b0, dtype)
    rel = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    # dx = gy @ W, dv = (gy^T @ x) at the kept positions, db = sum(gy)
    mag_x = gy.double().abs() @ w.double().abs()
    gy2, x2 = gy.double().reshape(-1, 9).abs(), x0.double().reshape(-1, 36).abs()
    mag_v = (gy2.t() @ x2).gather(1, ops.kept_columns(meta, 36))
    for got, want, mag in ((gx, rgx, mag_x), (gv, rgv, mag_v)):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        assert bool(((got.double() - want.double()).abs() <= rel * mag + 1e-30).all())
    if bias:
        assert gb.shape == (9,)
        torch.testing.assert_close(gb.double(), rgb.double(), rtol=rel, atol=rel * gy2.sum(0).max().item())
    # values' gradient is exactly the masked dense-weight gradient
    wd = w.clone().double().requires_grad_()
    torch.nn.functional.linear(x0.double(), wd).backward(gy.double())
    assert torch.allclose(gv.double(), wd.grad.gather(1, ops.kept_columns(meta, 36)), rtol=rel, atol=rel * mag_v.max().item())


def test_needs_input_grad_subsets():
    values, meta = random_compressed(4, 8, torch.float32)
    x = torch.randn(3, 8, requires_grad=True)
    y = linear(x, values, meta)  # values without grad
    (gx,) = torch.autograd.grad(y.sum(), (x,))
    assert torch.allclose(gx, torch.ones(3, 4) @ ops.decompress_reference(values, meta))
    v = values.clone().requires_grad_()
    b = torch.zeros(4, requires_grad=True)
    y = linear(x.detach(), v, meta, b)
    gv, gb = torch.autograd.grad(y.sum(), (v, b))
    assert torch.equal(gb, torch.full((4,), 3.0))
    assert gv.shape == v.shape
