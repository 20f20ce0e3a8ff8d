"""The layout-aware 2:4 ops (sparse24_pack / sparse24_unpack / sparse24_mm) on the CPU:
native kernels against the Python references, the cutlass_sm80 layout against PyTorch's
CUTLASS conversion, the cutlass_sm90 index math, autograd, opcheck, bad input, and
SparseLinear running through a GPU layout (forced on the CPU, where the same op serves it).
The CUDA kernels of these ops are tested in test_sparse24_gemm_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

import semisparse
from conftest import assert_bit_equal, bits, linear_tol, native_loaded, random_24
from semisparse.formats.sparse24 import Sparse24, preferred_layout
from semisparse.nn import SparseLinear
from semisparse.ops import sparse24 as ops

pack = torch.ops.semisparse.sparse24_pack
unpack = torch.ops.semisparse.sparse24_unpack
mm = torch.ops.semisparse.sparse24_mm

GPU_LAYOUTS = ("cutlass_sm80", "cutlass_sm90")
HALF = (torch.float16, torch.bfloat16)


def _nan_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal, except that any NaN matches any NaN (payloads are not specified)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    na, nb = torch.isnan(a), torch.isnan(b)
    assert torch.equal(na, nb)
    assert torch.equal(bits(torch.where(na, torch.zeros((), dtype=a.dtype), a)),
                       bits(torch.where(nb, torch.zeros((), dtype=b.dtype), b)))


def _special(n: int, k: int, dtype, seed: int) -> torch.Tensor:
    """Dense (not 2:4) values with ties, NaN, +-inf and zeros of both signs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    w[0, :4] = float("nan")
    w[1, :4] = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # all tied
    w[2, :4] = torch.tensor([0.0, -0.0, 0.0, 3.0], dtype=torch.float64)
    w[3, :4] = torch.tensor([float("inf"), float("nan"), -float("inf"), 2.0], dtype=torch.float64)
    w[4, 4:8] = torch.tensor([-0.0, -0.0, -0.0, -0.0], dtype=torch.float64)
    w[5, :4] = torch.tensor([float("nan"), 1.0, float("nan"), float("nan")], dtype=torch.float64)
    return w.to(dtype)


def _shapes(layout):
    return {"cpu": [(8, 8), (7, 12), (33, 100)], "cutlass_sm80": [(32, 32), (64, 96), (96, 160)],
            "cutlass_sm90": [(64, 64), (128, 192), (192, 128)]}[layout]


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("rows,k", [(32, 32), (64, 128), (96, 64), (256, 512)])
@pytest.mark.parametrize("dtype", HALF)
def test_sm80_matches_pytorch_cutlass_conversion(rows, k, dtype):
    w = random_24(rows, k, dtype, generator=torch.Generator().manual_seed(rows + k))
    v_ref, m_ref = sparse_semi_structured_from_dense_cutlass(w)
    v, m = pack(w, "cutlass_sm80")
    assert_bit_equal(v, v_ref)
    assert torch.equal(m, m_ref)
    assert torch.equal(ops.meta_from_cpu(pack(w, "cpu")[1], "cutlass_sm80", rows, k), m_ref)


@pytest.mark.parametrize("rows,k", [(64, 64), (128, 64), (64, 256), (192, 320)])
def test_sm90_offsets_are_a_permutation_of_whole_atoms(rows, k):
    off = ops._sm90_byte_offsets(rows, k // 8, "cpu")
    assert sorted(off.tolist()) == list(range(rows * k // 8))
    # each 64 x 64 tile owns one contiguous 512-byte atom: [K/64, N/64, 512]
    o = off.view(rows, k // 8)
    for r0 in range(0, rows, 64):
        for c0 in range(0, k // 8, 8):
            atom = o[r0:r0 + 64, c0:c0 + 8]
            base = ((c0 // 8) * (rows // 64) + r0 // 64) * 512
            assert sorted(atom.reshape(-1).tolist()) == list(range(base, base + 512))


def test_sm90_atom_spot_values():
    """A few addresses of the E atom written out by hand from CUTLASS's
    Sm90GemmSparseConfig (16-bit, tile K 64): modes (k%16:1)(m/8%2:16)(k/32:32)(m%8:64)
    (k/16%2:512)(m/16:1024), in 1-bit units."""
    off = ops._sm90_byte_offsets(128, 16, "cpu").view(128, 16)
    assert int(off[0, 0]) == 0 and int(off[0, 1]) == 1  # columns 0..7, 8..15
    assert int(off[8, 0]) == 16 // 8  # m/8 % 2
    assert int(off[0, 4]) == 32 // 8  # k = 32
    assert int(off[1, 0]) == 64 // 8  # m % 8
    assert int(off[0, 2]) == 512 // 8  # k = 16
    assert int(off[16, 0]) == 1024 // 8  # m / 16
    assert int(off[64, 0]) == 512  # next atom along M
    assert int(off[0, 8]) == 128 * 64 // 8  # next atom along K


@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("dtype", HALF + (torch.float32,))
@pytest.mark.parametrize("prune", [False, True])
def test_pack_native_matches_reference(layout, dtype, prune):
    if layout != "cpu" and dtype == torch.float32:
        pytest.skip("GPU layouts are 16-bit only")
    for i, (n, k) in enumerate(_shapes(layout)):
        w = _special(n, k, dtype, i) if prune else random_24(n, k, dtype, generator=torch.Generator().manual_seed(i),
                                                              underfill=0.3, neg_zero=True)
        v, m = pack(w, layout, prune)
        v_ref, m_ref = ops.pack_reference(w, layout, prune)
        _nan_bits_equal(v, v_ref)
        assert m.dtype == m_ref.dtype and torch.equal(m, m_ref)
        d = unpack(v, m, layout)
        _nan_bits_equal(d, ops.unpack_reference(v, m, layout))
        want = ops.prune_reference(w) if prune else w
        _nan_bits_equal(d, torch.where(want == 0, torch.zeros((), dtype=dtype), want))


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_layouts_hold_the_same_codes(layout):
    w = random_24(128, 128, torch.bfloat16, generator=torch.Generator().manual_seed(3), underfill=0.2)
    v_cpu, m_cpu = pack(w, "cpu")
    v, m = pack(w, layout)
    assert_bit_equal(v, v_cpu)
    assert torch.equal(ops.meta_to_cpu(m, layout, 128, 128), m_cpu)
    s = Sparse24.from_dense(w, layout=layout)
    assert s.layout == layout and torch.equal(s.to_dense(), w + 0.0)
    back = s.to_layout("cpu")
    assert torch.equal(back.meta, m_cpu)
    other = "cutlass_sm90" if layout == "cutlass_sm80" else "cutlass_sm80"
    assert torch.equal(s.to_layout(other).to_dense(), s.to_dense())


def test_prune_ties_nan_and_signed_zero():
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0, float("nan"), 2.0, float("nan"), -0.0]])
    v, m = pack(w, "cpu", True)
    # ties keep the lower indices; NaN ranks below -0.0
    assert v[0, :2].tolist() == [1.0, -1.0]
    assert v[0, 2].item() == 2.0 and bits(v[0, 3:4]).item() == 0  # (the kept -0.0 counts as zero)
    # the second group keeps 2.0 and -0.0: one non-zero, encoded as compress encodes it
    assert int(m[0, 0]) == (0 | 1 << 2) | (ops.CODE_FROM_MASK[0b0010] << 4)


# ------------------------------------------------------------------ sparse24_mm
@pytest.mark.parametrize("layout", ops.LAYOUTS)
@pytest.mark.parametrize("dtype", HALF + (torch.float32,))
@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_native_matches_reference(layout, dtype, activation, with_bias):
    if layout != "cpu" and dtype == torch.float32:
        pytest.skip("GPU layouts are 16-bit only")
    n, k = _shapes(layout)[1]
    g = torch.Generator().manual_seed(7)
    w = random_24(n, k, dtype, generator=g)
    v, m = pack(w, layout)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    for shape in [(1, k), (5, k), (2, 3, k), (k,)]:
        x = torch.randn(*shape, generator=g).to(dtype)
        y = mm(x, v, m, layout, b, activation)
        y_ref = ops.mm_reference(x, v, m, layout, b, activation)
        assert y.shape == y_ref.shape == (*shape[:-1], n)
        rtol, atol = linear_tol(dtype, k)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)


def test_mm_empty_and_zero_k():
    v, m = pack(torch.zeros(64, 64, dtype=torch.bfloat16), "cutlass_sm90")
    assert mm(torch.zeros(0, 64, dtype=torch.bfloat16), v, m, "cutlass_sm90").shape == (0, 64)
    b = torch.randn(3, dtype=torch.float32)
    v0, m0 = pack(torch.zeros(3, 0), "cpu")
    y = mm(torch.zeros(2, 0), v0, m0, "cpu", b, "relu")
    torch.testing.assert_close(y, torch.relu(b).expand(2, 3))


@pytest.mark.parametrize("activation", ops.ACTIVATIONS)
def test_mm_gradcheck_float64(activation):
    g = torch.Generator().manual_seed(11)
    w = random_24(6, 16, torch.float64, generator=g)
    v, m = pack(w, "cpu")
    v = v.requires_grad_()
    x = torch.randn(3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: mm(x, v, m, "cpu", b, activation), (x, v, b))
    assert torch.autograd.gradgradcheck is not None


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
@pytest.mark.parametrize("activation", ["none", "gelu", "silu"])
def test_mm_backward_gpu_layouts_match_dense_autograd(layout, activation):
    g = torch.Generator().manual_seed(5)
    n, k = _shapes(layout)[1]
    w = random_24(n, k, torch.bfloat16, generator=g)
    v, m = pack(w, layout)
    x = torch.randn(4, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    gy = torch.randn(4, n, generator=g).bfloat16()
    vv, xx, bb = (t.clone().requires_grad_() for t in (v, x, b))
    mm(xx, vv, m, layout, bb, activation).backward(gy)
    # the same in float64 through differentiable torch ops
    v64, x64, b64 = (t.double().requires_grad_() for t in (v, x, b))
    dense = ops.unpack_reference(v64, m, layout)
    ops._activate(torch.nn.functional.linear(x64, dense, b64), activation).backward(gy.double())
    for got, want in ((xx.grad, x64.grad), (vv.grad, v64.grad), (bb.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * math.sqrt(k))


def test_unpack_backward_is_a_gather():
    w = random_24(64, 64, torch.float16, generator=torch.Generator().manual_seed(2))
    v, m = pack(w, "cutlass_sm90")
    v = v.float().half().requires_grad_()
    gd = torch.randn(64, 64).half()
    unpack(v, m, "cutlass_sm90").backward(gd)
    cols = ops.kept_columns(ops.meta_to_cpu(m, "cutlass_sm90", 64, 64), 64)
    assert torch.equal(v.grad, gd.gather(1, cols))


@pytest.mark.skipif(not native_loaded(), reason="native CPU library not loaded")
@pytest.mark.parametrize("layout", ops.LAYOUTS)
def test_opcheck(layout):
    dtype = torch.float32 if layout == "cpu" else torch.bfloat16
    n, k = _shapes(layout)[1]
    w = random_24(n, k, dtype, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(pack, (w, layout, False))
    torch.library.opcheck(pack, (w, layout, True))
    v, m = pack(w, layout)
    torch.library.opcheck(unpack, (v.clone().requires_grad_(), m, layout))
    x = torch.randn(3, k).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_()
    torch.library.opcheck(mm, (x, v.clone().requires_grad_(), m, layout, b, "silu"))
    torch.library.opcheck(mm, (x, v, m, layout, None, "none"))


def test_mm_under_compile():
    w = random_24(64, 128, torch.bfloat16, generator=torch.Generator().manual_seed(9))
    v, m = pack(w, "cutlass_sm90")
    x = torch.randn(6, 128).bfloat16()
    f = torch.compile(lambda x: mm(x, v, m, "cutlass_sm90", None, "relu"), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), mm(x, v, m, "cutlass_sm90", None, "relu"))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: pack(torch.zeros(64, 64, dtype=torch.bfloat16), "sm80"), "layout must be one of"),
        (lambda: pack(torch.zeros(64, 64), "cutlass_sm80"), "float16 or bfloat16"),
        (lambda: pack(torch.zeros(48, 64, dtype=torch.half), "cutlass_sm90"), "N a multiple of 64, got N=48"),
        (lambda: pack(torch.zeros(64, 48, dtype=torch.half), "cutlass_sm80"), "K a multiple of 32, got K=48"),
        (lambda: pack(torch.zeros(4, 6), "cpu"), "K a multiple of 4, got K=6"),
        (lambda: pack(torch.zeros(4, 4, 4), "cpu"), "2-D"),
        (lambda: unpack(torch.zeros(64, 32, dtype=torch.half), torch.zeros(64, 8, dtype=torch.uint8), "cutlass_sm90"),
         "meta must be"),
        (lambda: unpack(torch.zeros(64, 32, dtype=torch.half), torch.zeros(64, 3, dtype=torch.int16), "cutlass_sm80"),
         "meta must be"),
        (lambda: mm(torch.zeros(2, 64, dtype=torch.half), *pack(torch.zeros(64, 64, dtype=torch.half), "cutlass_sm80"),
                    "cutlass_sm80", None, "tanh"), "activation must be one of"),
        (lambda: mm(torch.zeros(2, 32, dtype=torch.half), *pack(torch.zeros(64, 64, dtype=torch.half), "cutlass_sm80"),
                    "cutlass_sm80"), "K=64"),
        (lambda: mm(torch.zeros(2, 64, dtype=torch.bfloat16), *pack(torch.zeros(64, 64, dtype=torch.half), "cutlass_sm80"),
                    "cutlass_sm80"), "dtype"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()


def test_from_dense_auto_layout_on_cpu():
    w = random_24(64, 64, torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert preferred_layout("cpu", torch.bfloat16, 64, 64) == "cpu"
    assert Sparse24.from_dense(w, layout="auto").layout == "cpu"


# ------------------------------------------------- SparseLinear through a GPU layout
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_sparse_linear_gpu_layout_path(layout, monkeypatch, tmp_path):
    """The module logic of the CUDA path (meta_gpu kept in step with meta, forward through
    sparse24_mm, backward, compile, state dict), run on the CPU by forcing the layout."""
    import semisparse.nn.sparse_linear as sl

    monkeypatch.setattr(sl, "preferred_layout", lambda device, dtype, n, k: layout)
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64).bfloat16()
    ref = SparseLinear.from_dense(lin)
    monkeypatch.setattr(sl, "preferred_layout", lambda device, dtype, n, k: "cpu")
    ref._sync_layout()
    assert ref.layout == "cpu" and ref.meta_gpu.numel() == 0
    monkeypatch.setattr(sl, "preferred_layout", lambda device, dtype, n, k: layout)
    mod = SparseLinear.from_dense(lin)
    assert mod.layout == layout
    assert torch.equal(ops.meta_to_cpu(mod.meta_gpu, layout, 64, 128), mod.meta)
    assert "meta_gpu" not in mod.state_dict()
    x = torch.randn(3, 5, 128).bfloat16()
    y, y_ref = mod(x), ref(x)
    rtol, atol = linear_tol(torch.bfloat16, 128)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=rtol, atol=atol)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    torch.testing.assert_close(mod.values.grad.float(), ref.values.grad.float(), rtol=5e-2, atol=5e-1)
    torch.testing.assert_close(mod.bias.grad.float(), ref.bias.grad.float(), rtol=5e-2, atol=5e-1)
    # a loaded state dict re-derives meta_gpu
    other = SparseLinear.from_dense(torch.nn.Linear(128, 64).bfloat16())
    other.load_state_dict(mod.state_dict())
    assert torch.equal(other.meta_gpu, mod.meta_gpu)
    mod.save(tmp_path / "m.safetensors")
    back = SparseLinear.load(tmp_path / "m.safetensors")
    assert back.layout == layout and torch.equal(back(x), mod(x))
    f = torch.compile(mod, backend="eager", fullgraph=True)
    torch.testing.assert_close(f(x), mod(x))


def test_sparse_linear_torchscript():
    mod = SparseLinear.from_dense(torch.nn.Linear(64, 32))
    scripted = torch.jit.script(mod)
    x = torch.randn(3, 64)
    torch.testing.assert_close(scripted(x), mod(x))


@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_sparse24_to_float32_leaves_the_gpu_layout(layout):
    w = random_24(64, 128, torch.bfloat16, generator=torch.Generator().manual_seed(1))
    s = Sparse24.from_dense(w, layout=layout)
    f = s.to(torch.float32)
    assert f.layout == "cpu" and f.dtype == torch.float32
    assert torch.equal(f.to_dense(), s.to_dense().float())
    assert s.to(torch.float16).layout == layout


def test_sparse_linear_meta_edit_then_sync(monkeypatch):
    import semisparse.nn.sparse_linear as sl

    monkeypatch.setattr(sl, "preferred_layout", lambda device, dtype, n, k: "cutlass_sm80")
    mod = SparseLinear.from_dense(torch.nn.Linear(64, 32).half())
    other = SparseLinear.from_dense(torch.nn.Linear(64, 32).half())
    with torch.no_grad():
        mod.meta.copy_(other.meta)
    mod._sync_layout()
    assert torch.equal(mod.meta_gpu, ops.meta_from_cpu(other.meta, "cutlass_sm80", 32, 64))
