"""CUDA kernels of sparse24_compress / sparse24_decompress (libsemisparse_cuda): bit for bit
equal to the CPU op. Skipped unless a CUDA device is present and the native CUDA library
is loaded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from conftest import DTYPES, assert_bit_equal, cuda_skip_reason, random_24, sparse24_dense
from semisparse.ops import sparse24 as ops


_SKIP = cuda_skip_reason()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

compress = torch.ops.semisparse.sparse24_compress
decompress = torch.ops.semisparse.sparse24_decompress


def _check_compress(w_cpu: torch.Tensor, w_cuda: torch.Tensor | None = None) -> None:
    """CUDA compress and decompress of w agree bit for bit with the CPU op."""
    if w_cuda is None:
        w_cuda = w_cpu.cuda()
    v_ref, m_ref = compress(w_cpu)
    v, m = compress(w_cuda)
    assert v.is_cuda and m.is_cuda
    assert_bit_equal(v.cpu(), v_ref)
    assert_bit_equal(m.cpu(), m_ref)
    d_ref = decompress(v_ref, m_ref)
    d = decompress(v, m)
    assert d.is_cuda
    assert_bit_equal(d.cpu(), d_ref)


# ------------------------------------------------------------ compress / decompress
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("k", [4, 12, 4096])
@pytest.mark.parametrize("underfill", [0.0, 0.4])
@pytest.mark.parametrize("neg_zero", [False, True])
def test_matches_cpu(dtype, n, k, underfill, neg_zero):
    g = torch.Generator().manual_seed(n * 100003 + k)
    w = random_24(n, k, dtype, generator=g, underfill=underfill, neg_zero=neg_zero)
    _check_compress(w)


@given(w=sparse24_dense())
def test_matches_cpu_property(w):
    _check_compress(w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_group_pattern_and_zero_sign(dtype):
    """All 16 non-zero masks (masks with 3-4 non-zeros keep the first two, as on the CPU)
    x zeros stored as +0.0 / -0.0 x kept values of both signs; odd group count per row."""
    groups = []
    for mask in range(16):
        for zero in (0.0, -0.0):
            for sign in (1.0, -1.0):
                groups.append([sign * (i + 1.5) if mask >> i & 1 else zero for i in range(4)])
    groups.append([0.0, -0.0, 0.0, -0.0])  # odd count: the last meta byte is half used
    w = torch.tensor(groups, dtype=torch.float64).reshape(1, -1).to(dtype)
    w = torch.cat([w, -w, w.flip(1)])  # 3 rows
    _check_compress(w)
    v, m = compress(w.cuda())
    codes = ops.codes_from_meta(m.cpu(), w.shape[1])[0]
    expected = [ops.CODE_FROM_MASK[mask] for mask in range(16) for _ in range(4)] + [14]
    assert codes.tolist() == expected
    # zeros of either sign come out as +0.0
    vb = v.cpu().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[v.element_size()])
    assert not bool(((v.cpu() == 0) & (vb != 0)).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4, 12, 40])
def test_decompress_arbitrary_meta(dtype, k):
    """Any meta byte (even codes with idx0 >= idx1, and the unused high nibble when K % 8
    == 4) decodes exactly as on the CPU; values are copied bit for bit (NaN, -0.0, inf)."""
    g = torch.Generator().manual_seed(k)
    n = 9
    vals = torch.randn(n, k // 2, generator=g, dtype=torch.float64).to(dtype)
    vals[0, 0] = float("nan")
    vals[1, :2] = -0.0
    vals[2, 1] = float("-inf")
    meta = torch.randint(0, 256, (n, ops.meta_cols(k)), generator=g, dtype=torch.uint8)
    d_ref = decompress(vals, meta)
    d = decompress(vals.cuda(), meta.cuda())
    assert_bit_equal(d.cpu(), d_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_grid_stride(dtype):
    """More meta bytes than threads in the grid: the grid-stride loop runs several rounds."""
    g = torch.Generator().manual_seed(7)
    w = random_24(4099, 4096, dtype, generator=g, underfill=0.1, neg_zero=True)
    _check_compress(w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_and_non_contiguous(dtype):
    """Misaligned base pointers take the scalar path; non-contiguous inputs are copied."""
    n, k = 5, 12
    g = torch.Generator().manual_seed(3)
    w = random_24(n, k, dtype, generator=g, underfill=0.3, neg_zero=True)
    v_ref, m_ref = compress(w)
    d_ref = decompress(v_ref, m_ref)

    base = torch.zeros(n * k + 1, dtype=dtype, device="cuda")
    w_odd = base[1:].view(n, k)  # storage offset 1: not 4-element aligned
    w_odd.copy_(w.cuda())
    v, m = compress(w_odd)
    assert_bit_equal(v.cpu(), v_ref)
    assert_bit_equal(m.cpu(), m_ref)

    vbase = torch.zeros(n * k // 2 + 1, dtype=dtype, device="cuda")
    v_odd = vbase[1:].view(n, k // 2)  # not 2-element aligned
    v_odd.copy_(v_ref.cuda())
    assert_bit_equal(decompress(v_odd, m_ref.cuda()).cpu(), d_ref)

    w_t = w.cuda().t().contiguous().t()  # same values, column-major strides
    assert not w_t.is_contiguous()
    v, m = compress(w_t)
    assert_bit_equal(v.cpu(), v_ref)
    assert_bit_equal(m.cpu(), m_ref)
    v_t = v_ref.cuda().t().contiguous().t()
    m_t = m_ref.cuda().t().contiguous().t()
    assert_bit_equal(decompress(v_t, m_t).cpu(), d_ref)


@pytest.mark.parametrize("shape", [(0, 8), (3, 0), (0, 0)])
def test_empty(shape):
    w = torch.zeros(shape, device="cuda")
    v, m = compress(w)
    assert tuple(v.shape) == (shape[0], shape[1] // 2) and v.is_cuda
    assert tuple(m.shape) == (shape[0], ops.meta_cols(shape[1])) and m.dtype == torch.uint8
    d = decompress(v, m)
    assert tuple(d.shape) == shape and d.is_cuda


def test_current_stream():
    """The kernels run on the current stream: no synchronisation needed around them."""
    g = torch.Generator().manual_seed(11)
    w = random_24(257, 1024, torch.float32, generator=g, underfill=0.2)
    v_ref, m_ref = compress(w)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = w.cuda(non_blocking=False)
        for _ in range(20):  # queue work ahead of the kernel on s
            x = x * 1.0
        v, m = compress(x)
        d = decompress(v, m)
    s.synchronize()
    assert_bit_equal(v.cpu(), v_ref)
    assert_bit_equal(m.cpu(), m_ref)
    assert_bit_equal(d.cpu(), decompress(v_ref, m_ref))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    g = torch.Generator().manual_seed(5)
    w = random_24(33, 64, torch.float16, generator=g, underfill=0.2)
    v_ref, m_ref = compress(w)
    with torch.cuda.device(0):
        v, m = compress(w.to("cuda:1"))
        d = decompress(v, m)
    assert v.device == m.device == d.device == torch.device("cuda:1")
    assert_bit_equal(v.cpu(), v_ref)
    assert_bit_equal(m.cpu(), m_ref)
    assert_bit_equal(d.cpu(), decompress(v_ref, m_ref))


# ------------------------------------------------------------------- errors
def test_errors():
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16"):
        compress(torch.zeros(2, 8, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="multiple of 4"):
        compress(torch.zeros(2, 6, device="cuda"))
    with pytest.raises(RuntimeError, match="2-D"):
        compress(torch.zeros(2, 2, 8, device="cuda"))
    v, m = compress(torch.zeros(2, 8, device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        decompress(v, m.cpu())
    with pytest.raises(RuntimeError, match="uint8"):
        decompress(v, m.to(torch.int32))
    with pytest.raises(RuntimeError, match="shape"):
        decompress(v, torch.zeros(2, 3, dtype=torch.uint8, device="cuda"))


# ------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(1)
    w = random_24(7, 12, dtype, generator=g, underfill=0.3, neg_zero=True).cuda()
    torch.library.opcheck(compress.default, (w,))
    v, m = compress(w)
    torch.library.opcheck(decompress.default, (v, m))
