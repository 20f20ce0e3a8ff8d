"""CUDA kernels of the layout-aware 2:4 ops (libsemisparse_cuda): sparse24_pack /
sparse24_unpack bit for bit equal to the CPU kernels; sparse24_mm through every path
(small-M kernel, CUTLASS sm80 / sm90a GEMM, unpack + cuBLAS fallback, forced with
SEMISPARSE_SPARSE24_KERNEL) against the float32 reference on fresh random inputs, with the
allocator's free memory poisoned with NaN first so an unwritten output cannot pass; and
SparseLinear on CUDA. Skipped unless a CUDA device is present and the native CUDA library
is loaded."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import assert_bit_equal, cuda_skip_reason, linear_tol, random_24
from semisparse.formats.sparse24 import Sparse24, preferred_layout
from semisparse.nn import SparseLinear
from semisparse.ops import sparse24 as ops

_SKIP = cuda_skip_reason("sparse24_mm")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

pack = torch.ops.semisparse.sparse24_pack
unpack = torch.ops.semisparse.sparse24_unpack
mm = torch.ops.semisparse.sparse24_mm

HALF = (torch.float16, torch.bfloat16)


def _cc() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def _layouts() -> list[str]:
    """The GPU layouts whose CUTLASS kernel this device runs."""
    out = []
    if _cc()[0] in (8, 9):
        out.append("cutlass_sm80")
    if _cc() == (9, 0):
        out.append("cutlass_sm90")
    return out


def _poison() -> None:
    """Fill free cached blocks with NaN so outputs the kernel never writes show up."""
    free = torch.cuda.mem_get_info()[0]
    n = min(free // 4, 1 << 28)  # up to 1 GiB of NaN, then released into the cache
    t = torch.full((n // 2,), float("nan"), device="cuda")
    del t


class _Kernel:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.old = os.environ.get("SEMISPARSE_SPARSE24_KERNEL")
        os.environ["SEMISPARSE_SPARSE24_KERNEL"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("SEMISPARSE_SPARSE24_KERNEL", None)
        else:
            os.environ["SEMISPARSE_SPARSE24_KERNEL"] = self.old


# ------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (128, 320), (4096, 1024)])
def test_pack_unpack_match_cpu(layout, dtype, prune, shape):
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    if prune:
        w = torch.randn(n, k, generator=g).to(dtype)
        w[0, :4] = float("nan")
        w[1, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0])
        w[2, :4] = torch.tensor([0.0, -0.0, 0.0, 3.0])
    else:
        w = random_24(n, k, dtype, generator=g, underfill=0.3, neg_zero=True)
    v_ref, m_ref = pack(w, layout, prune)
    _poison()
    v, m = pack(w.cuda(), layout, prune)
    assert v.is_cuda and m.is_cuda
    assert_bit_equal(torch.nan_to_num(v.cpu(), nan=7.0), torch.nan_to_num(v_ref, nan=7.0))
    assert torch.equal(m.cpu(), m_ref)
    _poison()
    d = unpack(v, m, layout)
    assert_bit_equal(torch.nan_to_num(d.cpu(), nan=7.0), torch.nan_to_num(unpack(v_ref, m_ref, layout), nan=7.0))


@pytest.mark.parametrize("layout", ["cutlass_sm80", "cutlass_sm90"])
def test_sparse24_from_dense_on_gpu(layout):
    w = random_24(256, 256, torch.bfloat16, generator=torch.Generator().manual_seed(1)).cuda()
    s = Sparse24.from_dense(w, layout=layout)
    assert s.values.is_cuda and s.meta.is_cuda and s.layout == layout
    assert torch.equal(s.to_dense(), w + 0.0)
    s2 = Sparse24.from_dense(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16), layout=layout, prune=True)
    assert torch.equal(s2.to_dense().cpu(), ops.prune_reference(s2.to_dense().cpu()))


# ------------------------------------------------------------------- the GEMM
def _check_mm(layout, dtype, m_rows, n, k, activation, with_bias, kernel, seed=0):
    """Inputs are made on the GPU (fresh per call); the reference is the pure-torch
    mm_reference (fp32, run on the GPU too) reading the packed weight through the Python
    layout code, so a kernel that misreads the layout fails."""
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + m_rows * 31 + n + k)
    w = torch.randn(n, k, generator=g, device="cuda").to(dtype)
    w = ops.prune_reference(w)
    x = torch.randn(m_rows, k, generator=g, device="cuda").to(dtype)
    b = torch.randn(n, generator=g, device="cuda").to(dtype) if with_bias else None
    v, meta = ops.pack_reference(w, layout)
    y_ref = ops.mm_reference(x, v, meta, layout, b, activation)
    _poison()
    with _Kernel(kernel):
        y = mm(x, v, meta, layout, b, activation)
    torch.cuda.synchronize()
    assert y.shape == (m_rows, n) and y.dtype == dtype
    assert not torch.isnan(y).any(), "output not fully written"
    rtol, atol = linear_tol(dtype, k)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m_rows", [1, 2, 3, 8, 13, 16])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(64, 64), (256, 512), (4096, 4096)])
def test_small_m_kernel(dtype, m_rows, activation, shape):
    for layout in _layouts():
        _check_mm(layout, dtype, m_rows, *shape, activation, activation != "none", "small_m")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m_rows", [17, 64, 100, 128, 300, 2048])
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("shape", [(128, 128), (256, 512), (4096, 4096), (1024, 8192)])
def test_cutlass_kernel(dtype, m_rows, activation, shape):
    layouts = _layouts()
    if not layouts:
        pytest.skip("no CUTLASS kernel for this device")
    for layout in layouts:
        _check_mm(layout, dtype, m_rows, *shape, activation, m_rows % 2 == 0, "cutlass")


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_fallback_path(layout, activation):
    dtype = torch.bfloat16
    _check_mm(layout, dtype, 37, 128, 192 if layout == "cpu" else 128, activation, True, "fallback")


@pytest.mark.parametrize("m_rows", [1, 16, 17, 512])
def test_auto_dispatch_every_layout(m_rows):
    for layout in _layouts() + ["cpu"]:
        _check_mm(layout, torch.bfloat16, m_rows, 512, 1024, "silu", True, "auto", seed=3)


def test_misaligned_view_falls_back_correctly():
    layout = (_layouts() or ["cpu"])[-1]
    w = random_24(128, 128, torch.float16, generator=torch.Generator().manual_seed(4))
    v, meta = pack(w.cuda(), layout)
    base = torch.randn(4 * 128 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(4, 128)  # 2-byte offset: no 16-byte vector loads
    y = mm(x, v, meta, layout, None, "none")
    y_ref = ops.mm_reference(x.cpu(), v.cpu(), meta.cpu(), layout)
    torch.testing.assert_close(y.cpu().float(), y_ref.float(), rtol=5e-3, atol=5e-2)


def test_forced_kernel_that_does_not_fit_raises():
    if not _layouts():
        pytest.skip("no GPU layout on this device")
    layout = _layouts()[0]
    v, meta = pack(torch.zeros(64, 64, device="cuda", dtype=torch.half), layout)
    with _Kernel("small_m"), pytest.raises(RuntimeError, match="does not fit"):
        mm(torch.zeros(64, 64, device="cuda", dtype=torch.half), v, meta, layout)


def test_backward_on_cuda():
    for layout in _layouts():
        g = torch.Generator().manual_seed(8)
        w = random_24(256, 256, torch.bfloat16, generator=g)
        v, meta = pack(w, layout)
        x = torch.randn(33, 256, generator=g).bfloat16()
        b = torch.randn(256, generator=g).bfloat16()
        gy = torch.randn(33, 256, generator=g).bfloat16()
        got = [t.cuda().requires_grad_() for t in (x, v, b)]
        mm(got[0], got[1], meta.cuda(), layout, got[2], "gelu").backward(gy.cuda())
        want = [t.clone().requires_grad_() for t in (x, v, b)]
        mm(want[0], want[1], meta, layout, want[2], "gelu").backward(gy)
        for a, r in zip(got, want):
            torch.testing.assert_close(a.grad.cpu().float(), r.grad.float(), rtol=3e-2, atol=3e-1)


# ---------------------------------------------------------------- SparseLinear
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m_rows", [1, 16, 200])
def test_sparse_linear_on_cuda(dtype, m_rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).to(dtype)
    mod = SparseLinear.from_dense(lin).cuda()
    assert mod.layout == preferred_layout("cuda", dtype, 256, 512) != "cpu"
    assert mod.meta_gpu.numel() > 0 and mod.meta_gpu.is_cuda
    ref = SparseLinear.from_dense(lin)
    x = torch.randn(m_rows, 512).to(dtype)
    y = mod(x.cuda())
    rtol, atol = linear_tol(dtype, 512)
    torch.testing.assert_close(y.cpu().float(), ref(x).float(), rtol=rtol, atol=atol)
    y.float().sum().backward()
    ref(x).float().sum().backward()
    torch.testing.assert_close(mod.values.grad.cpu().float(), ref.values.grad.float(), rtol=5e-2, atol=5e-1)
    f = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(f(x.cuda()).float(), mod(x.cuda()).float(), rtol=rtol, atol=atol)
    back = mod.cpu()
    assert back.layout == "cpu" and back.meta_gpu.numel() == 0
