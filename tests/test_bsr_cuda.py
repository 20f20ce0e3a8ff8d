"""CUDA kernels of the block-sparse linear ops (libsemisparse_cuda): bsr_linear,
bsr_linear_grad_input and bsr_linear_grad_values against their pure-torch references on
fresh random inputs (the allocator's free memory poisoned with NaN first, so an output the
kernel never writes cannot pass), every block size and dtype, skewed and empty block rows,
and BlockSparseLinear on CUDA (forward, backward, compile). Skipped unless a CUDA device is
present and the native CUDA library has these kernels."""

from __future__ import annotations

import os

import pytest
import torch

import semisparse.ops.bsr as ops
from conftest import cuda_skip_reason
from semisparse.formats.bsr import BlockSparse
from semisparse.nn.block_sparse_linear import BlockSparseLinear

_SKIP = cuda_skip_reason("bsr_linear")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

linear = torch.ops.semisparse.bsr_linear
grad_input = torch.ops.semisparse.bsr_linear_grad_input
grad_values = torch.ops.semisparse.bsr_linear_grad_values

BLOCKS = ((16, 16), (32, 32), (64, 64), (32, 64), (64, 32))
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _poison() -> None:
    free = torch.cuda.mem_get_info()[0]
    t = torch.full((min(free // 8, 1 << 27),), float("nan"), device="cuda")
    del t


def _tol(dtype, k):
    scale = max(1.0, k ** 0.5)
    return {torch.float64: (1e-10, 1e-10 * scale), torch.float32: (1e-4, 1e-4 * scale),
            torch.bfloat16: (2e-2, 2e-2 * scale), torch.float16: (5e-3, 5e-3 * scale)}[dtype]


def _bsr(n, k, block, density, dtype, gen, skew=False, empty_rows=()):
    bh, bw = block
    mask = torch.rand(n // bh, k // bw, generator=gen, device="cuda") < density
    if skew:  # one dense block row, the rest nearly empty: a load-balance case
        mask[:] = torch.rand(n // bh, k // bw, generator=gen, device="cuda") < 0.05
        mask[0] = True
    for r in empty_rows:
        mask[r] = False
    w = torch.randn(n, k, generator=gen, device="cuda").to(dtype)
    return BlockSparse.from_dense(w, block, mask)


@pytest.fixture
def kernel():
    """Force a path with SEMISPARSE_BSR_KERNEL (auto | mma | simt): a forced 'mma' raises
    rather than falling back, so the tensor-core path is really tested."""
    old = os.environ.get("SEMISPARSE_BSR_KERNEL")

    def set_(name):
        os.environ["SEMISPARSE_BSR_KERNEL"] = name

    yield set_
    if old is None:
        os.environ.pop("SEMISPARSE_BSR_KERNEL", None)
    else:
        os.environ["SEMISPARSE_BSR_KERNEL"] = old


def _check_all(n, k, m, block, density, dtype, seed=0, **kw):
    gen = torch.Generator(device="cuda").manual_seed(seed + n + k + m)
    w = _bsr(n, k, block, density, dtype, gen, **kw)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    gy = torch.randn(m, n, generator=gen, device="cuda").to(dtype)
    b = torch.randn(n, generator=gen, device="cuda").to(dtype)
    args = (w.values, w.crow_indices, w.col_indices)
    for got_fn, ref_fn, red in (
        (lambda: linear(x, *args, n, b), lambda: ops.linear_reference(x, *args, n, b), k),
        (lambda: grad_input(gy, *args, k), lambda: ops.grad_input_reference(gy, *args, k), n),
        (lambda: grad_values(gy, x, w.crow_indices, w.col_indices, *block),
         lambda: ops.grad_values_reference(gy, x, w.crow_indices, w.col_indices, *block), m),
    ):
        ref = ref_fn()
        _poison()
        got = got_fn()
        torch.cuda.synchronize()
        assert got.shape == ref.shape and got.dtype == ref.dtype and got.is_cuda
        assert not torch.isnan(got).any(), "output not fully written"
        rtol, atol = _tol(dtype, red)
        torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 17, 128, 1000])
def test_ops_match_reference(block, dtype, m, kernel):
    kernel("mma" if dtype in (torch.bfloat16, torch.float16) else "simt")
    _check_all(256, 384, m, block, 0.4, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_simt_path_for_half_types(dtype, kernel):
    kernel("simt")
    _check_all(256, 384, 33, (32, 64), 0.4, dtype, seed=9)


def test_deterministic():
    gen = torch.Generator(device="cuda").manual_seed(11)
    w = _bsr(2048, 2048, (64, 64), 0.3, torch.bfloat16, gen, skew=True)
    x = torch.randn(512, 2048, generator=gen, device="cuda").bfloat16()
    runs = [linear(x, w.values, w.crow_indices, w.col_indices, 2048, None) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    gy = torch.randn(512, 2048, generator=gen, device="cuda").bfloat16()
    gv = [grad_values(gy, x, w.crow_indices, w.col_indices, 64, 64) for _ in range(3)]
    assert all(torch.equal(gv[0], r) for r in gv[1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [64, 2048])
def test_large_and_skewed(dtype, m, kernel):
    kernel("mma")
    _check_all(2048, 2048, m, (64, 64), 0.25, dtype, seed=1)
    _check_all(2048, 1024, m, (64, 64), 0.25, dtype, seed=2, skew=True)
    _check_all(1024, 2048, m, (32, 32), 0.5, dtype, seed=3, empty_rows=(0, 5, 7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_empty_cases(dtype):
    _check_all(128, 128, 8, (32, 32), 0.0, dtype)  # no stored block: zeros (plus bias)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = _bsr(128, 128, (32, 32), 0.5, dtype, gen)
    x = torch.zeros(0, 128, device="cuda", dtype=dtype)
    assert linear(x, w.values, w.crow_indices, w.col_indices, 128, None).shape == (0, 128)
    g = grad_values(torch.zeros(0, 128, device="cuda", dtype=dtype), x, w.crow_indices, w.col_indices, 32, 32)
    assert torch.equal(g, torch.zeros_like(w.values))


def test_leading_dims_and_noncontiguous():
    gen = torch.Generator(device="cuda").manual_seed(4)
    w = _bsr(256, 256, (64, 64), 0.5, torch.bfloat16, gen)
    x = torch.randn(3, 256, 5, generator=gen, device="cuda").bfloat16().transpose(1, 2)  # [3, 5, 256] strided
    y = linear(x, w.values, w.crow_indices, w.col_indices, 256, None)
    ref = ops.linear_reference(x.contiguous(), w.values, w.crow_indices, w.col_indices, 256, None)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=3e-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_on_cuda(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).to(dtype)
    mod = BlockSparseLinear.from_dense(lin, block=(64, 64), mask=0.5).cuda()
    ref = BlockSparseLinear.from_dense(lin, block=(64, 64), mask=0.5)
    x = torch.randn(40, 512).to(dtype)
    y = mod(x.cuda())
    torch.testing.assert_close(y.cpu().float(), ref(x).float(), rtol=2e-2, atol=3e-1)
    y.float().square().sum().backward()
    ref(x).float().square().sum().backward()
    for p, q in zip(mod.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.cpu().float(), q.grad.float(), rtol=5e-2, atol=2.0)
    f = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(f(x.cuda()).float(), y.float(), rtol=2e-2, atol=3e-1)
