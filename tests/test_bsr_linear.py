"""Block-sparse (BSR) linear: the BlockSparse format, the semisparse::bsr_linear* ops against
their pure-torch references (every CPU SIMD path via the ``isa`` fixture), opcheck,
gradcheck, and the BlockSparseLinear module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import semisparse
import semisparse.ops.bsr as ops  # defines the schemas (after semisparse loaded the library)
from conftest import native_loaded
from semisparse.formats.bsr import BlockSparse
from semisparse.nn.block_sparse_linear import BlockSparseLinear

linear = torch.ops.semisparse.bsr_linear
grad_input = torch.ops.semisparse.bsr_linear_grad_input
grad_values = torch.ops.semisparse.bsr_linear_grad_values

BLOCKS = ((16, 16), (32, 32), (64, 64), (32, 64), (64, 32))
MS = (1, 3, 8, 17, 64, 200)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
OPS = ("bsr_linear", "bsr_linear_grad_input", "bsr_linear_grad_values")


def random_bsr(n, k, block, density=0.5, dtype=torch.float32, gen=None, empty_rows=()):
    bh, bw = block
    mask = torch.rand(n // bh, k // bw, generator=gen) < density
    for r in empty_rows:
        mask[r] = False
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    return BlockSparse.from_dense(w, block, mask)


def rel_bound(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]


def assert_close_mag(out, ref, mag, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    err = (out.double() - ref.double()).abs()
    bound = rel_bound(dtype) * mag + 1e-30
    bad = err > bound
    assert not bool(bad.any()), f"max err {err.max().item():.3g}, {int(bad.sum())} of {bad.numel()} outside"


# ------------------------------------------------------------- native loading
def test_native_kernels_registered():
    if not native_loaded():
        pytest.skip("native CPU library not loaded")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"semisparse::{op}", "CPU"), op


def test_native_kernels_registered_fresh_process():
    """The library is loaded by ``semisparse.ops`` before ``ops.bsr`` defines the schemas: the
    CPU kernels registered first must still attach to the schemas defined later."""
    if not native_loaded():
        pytest.skip("native CPU library not loaded")
    code = (
        "import torch, semisparse\n"
        "import semisparse.ops.bsr\n"
        "print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f'semisparse::{o}', 'CPU') for o in "
        f"{OPS!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


# ------------------------------------------------------------------- format
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("nb", [(1, 1), (3, 5), (5, 3)])
def test_format_round_trip(block, nb):
    bh, bw = block
    n, k = nb[0] * bh, nb[1] * bw
    bs = random_bsr(n, k, block, 0.5, empty_rows=(0,))
    dense = bs.to_dense()
    assert dense.shape == (n, k)
    back = BlockSparse.from_dense(dense, block)  # all-zero blocks dropped
    assert torch.equal(back.block_mask(), bs.block_mask())
    assert torch.equal(back.values, bs.values)
    assert torch.equal(back.crow_indices, bs.crow_indices) and torch.equal(back.col_indices, bs.col_indices)
    assert back.crow_indices.dtype == back.col_indices.dtype == torch.int64
    # torch's BSR agrees
    t = dense.to_sparse_bsr(block)
    tm = BlockSparse.from_dense(dense, block, bs.block_mask())
    assert torch.equal(t.to_dense(), tm.to_dense())
    assert torch.equal(tm.to_torch().to_dense(), dense)


def test_format_full_and_empty():
    w = torch.randn(64, 96)
    full = BlockSparse.from_dense(w, (32, 32))
    assert full.nnz_blocks == 6 and full.density == 1.0
    assert torch.equal(full.to_dense(), w)
    empty = BlockSparse.from_dense(torch.zeros(64, 96), (32, 32))
    assert empty.nnz_blocks == 0 and empty.density == 0.0 and empty.values.shape == (0, 32, 32)
    assert torch.equal(empty.crow_indices, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(empty.to_dense(), torch.zeros(64, 96))
    x = torch.randn(5, 96)
    assert torch.equal(empty.linear(x), torch.zeros(5, 64))
    b = torch.randn(64)
    assert torch.equal(empty.linear(x, b), b.expand(5, 64))
    # nbytes: values + indices
    assert full.nbytes == 6 * 32 * 32 * 4 + 3 * 8 + 6 * 8


def test_format_mask_and_sparsity():
    w = torch.randn(128, 128)
    scale = torch.arange(16, dtype=torch.float32).reshape(4, 4) + 1
    w = w * scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
    bs = BlockSparse.from_dense(w, (32, 32), 0.75)
    assert bs.nnz_blocks == 4
    norms = w.reshape(4, 32, 4, 32).square().sum((1, 3))
    expect = torch.zeros(16, dtype=torch.bool)
    expect[norms.flatten().topk(4).indices] = True
    assert torch.equal(bs.block_mask(), expect.reshape(4, 4))
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[1, 2] = m[3, 0] = True
    bs2 = BlockSparse.from_dense(w, 32, m)
    assert torch.equal(bs2.block_mask(), m)
    assert torch.equal(bs2.to_dense(), w * m.repeat_interleave(32, 0).repeat_interleave(32, 1))
    assert BlockSparse.from_dense(w, 32, 0.0).nnz_blocks == 16
    assert BlockSparse.from_dense(w, 32, 1.0).nnz_blocks == 0
    h = bs2.to(torch.bfloat16)
    assert h.values.dtype == torch.bfloat16 and h.col_indices.dtype == torch.int64


def test_format_bad_inputs():
    w = torch.randn(64, 96)
    with pytest.raises(ValueError, match=r"block \(64, 64\) does not divide the weight shape \(64, 96\)"):
        BlockSparse.from_dense(w, (64, 64))
    with pytest.raises(ValueError, match=r"block \(32, 20\) does not divide"):
        BlockSparse.from_dense(w, (32, 20))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        BlockSparse.from_dense(w, (0, 32))
    with pytest.raises(ValueError, match=r"block mask must have shape \(N/bh, K/bw\) = \(2, 3\)"):
        BlockSparse.from_dense(w, 32, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        BlockSparse.from_dense(w, 32, 1.5)
    bs = BlockSparse.from_dense(w, 32)
    v, crow, col = bs.values, bs.crow_indices, bs.col_indices
    with pytest.raises(ValueError, match="crow_indices must have N/bh \\+ 1 = 3 entries"):
        BlockSparse(v, crow[:-1], col, (64, 96))
    with pytest.raises(ValueError, match="crow_indices must be a 1-D int64 tensor"):
        BlockSparse(v, crow.int(), col, (64, 96))
    with pytest.raises(ValueError, match="col_indices has 5 entries but values holds 6 blocks"):
        BlockSparse(v, crow, col[:5], (64, 96))
    bad = col.clone()
    bad[2] = 3
    with pytest.raises(ValueError, match=r"col_indices\[2\] = 3 is out of range \[0, 3\)"):
        BlockSparse(v, crow, bad, (64, 96))
    bad = col.clone()
    bad[0], bad[1] = 1, 0
    with pytest.raises(ValueError, match="strictly increasing within a block row"):
        BlockSparse(v, crow, bad, (64, 96))
    with pytest.raises(ValueError, match="must start at 0 and end at nnz=6"):
        BlockSparse(v, torch.tensor([0, 3, 5]), col, (64, 96))
    with pytest.raises(ValueError, match="non-decreasing"):
        BlockSparse(v, torch.tensor([0, 7, 6]), torch.zeros(6, dtype=torch.int64), (64, 96))
    with pytest.raises(ValueError, match="values must be a 3-D tensor"):
        BlockSparse(v[0], crow, col, (64, 96))


def test_op_bad_inputs():
    bs = random_bsr(64, 96, (32, 32), 1.0)
    v, crow, col = bs.values, bs.crow_indices, bs.col_indices
    x = torch.randn(3, 96)
    with pytest.raises(RuntimeError, match="not a multiple of the block height"):
        linear(x, v, crow, col, 60)
    with pytest.raises(RuntimeError, match="crow_indices must have 4 entries"):
        linear(x, v, crow, col, 96)
    with pytest.raises(RuntimeError, match="multiple of the block width 32"):
        linear(torch.randn(3, 90), v, crow, col, 64)
    with pytest.raises(RuntimeError, match="dtype"):
        linear(x.double(), v, crow, col, 64)
    bad = col.clone()
    bad[0] = 7
    with pytest.raises(RuntimeError, match="out of range"):
        linear(x, v, crow, bad, 64)
    with pytest.raises(RuntimeError, match="bias"):
        linear(x, v, crow, col, 64, torch.randn(63))


# ---------------------------------------------------------------------- ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_ops_match_reference(isa, dtype, m):
    gen = torch.Generator().manual_seed(m * 7 + DTYPES.index(dtype))
    for block, (n, k) in (((32, 32), (160, 96)), ((16, 16), (48, 80)), ((64, 32), (128, 96)), ((32, 64), (96, 128))):
        bs = random_bsr(n, k, block, 0.5, dtype, gen, empty_rows=(1,))
        v, crow, col = bs.values, bs.crow_indices, bs.col_indices
        x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        w = bs.to_dense().double()
        y = linear(x, v, crow, col, n, b)
        ref = ops.linear_reference(x, v, crow, col, n, b)
        assert_close_mag(y, ref, x.double().abs() @ w.abs().t() + b.double().abs(), dtype)
        gy = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
        gx = grad_input(gy, v, crow, col, k)
        assert_close_mag(gx, ops.grad_input_reference(gy, v, crow, col, k), gy.double().abs() @ w.abs(), dtype)
        gv = grad_values(gy, x, crow, col, *block)
        gvr = ops.grad_values_reference(gy, x, crow, col, *block)
        mag = ops.grad_values_reference(gy.double().abs(), x.double().abs(), crow, col, *block)
        assert_close_mag(gv, gvr, mag, dtype)


def test_ops_leading_dims_and_noncontiguous(isa):
    bs = random_bsr(96, 64, (32, 32), 0.6)
    v, crow, col = bs.values, bs.crow_indices, bs.col_indices
    x = torch.randn(2, 3, 128)[..., ::2]
    y = linear(x, v, crow, col, 96)
    assert y.shape == (2, 3, 96)
    torch.testing.assert_close(y, ops.linear_reference(x, v, crow, col, 96), rtol=1e-5, atol=1e-5)
    gy = torch.randn(2, 3, 96)
    torch.testing.assert_close(grad_input(gy, v, crow, col, 64), ops.grad_input_reference(gy, v, crow, col, 64))
    torch.testing.assert_close(grad_values(gy, x, crow, col, 32, 32), ops.grad_values_reference(gy, x, crow, col, 32, 32))


def test_ops_odd_block_shapes(isa):
    """Blocks whose width is not a multiple of the vector width (scalar tails)."""
    for block in ((3, 5), (8, 24), (16, 40)):
        bh, bw = block
        bs = random_bsr(4 * bh, 3 * bw, block, 0.6)
        v, crow, col = bs.values, bs.crow_indices, bs.col_indices
        for m in (1, 9):
            x = torch.randn(m, 3 * bw)
            torch.testing.assert_close(linear(x, v, crow, col, 4 * bh), ops.linear_reference(x, v, crow, col, 4 * bh))
            gy = torch.randn(m, 4 * bh)
            torch.testing.assert_close(grad_input(gy, v, crow, col, 3 * bw), ops.grad_input_reference(gy, v, crow, col, 3 * bw))
            torch.testing.assert_close(grad_values(gy, x, crow, col, bh, bw), ops.grad_values_reference(gy, x, crow, col, bh, bw))


def test_ops_empty(isa):
    bs = BlockSparse.from_dense(torch.zeros(64, 32), (32, 32))
    v, crow, col = bs.values, bs.crow_indices, bs.col_indices
    assert linear(torch.randn(0, 32), v, crow, col, 64).shape == (0, 64)
    assert torch.equal(grad_input(torch.randn(4, 64), v, crow, col, 32), torch.zeros(4, 32))
    assert grad_values(torch.randn(4, 64), torch.randn(4, 32), crow, col, 32, 32).shape == (0, 32, 32)
    full = BlockSparse.from_dense(torch.randn(64, 32), (32, 32))
    assert torch.equal(
        grad_values(torch.randn(0, 64), torch.randn(0, 32), full.crow_indices, full.col_indices, 32, 32),
        torch.zeros(2, 32, 32),
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_opcheck(dtype):
    bs = random_bsr(64, 96, (32, 32), 0.5, dtype, empty_rows=(0,))
    v, crow, col = bs.values, bs.crow_indices, bs.col_indices
    x = torch.randn(2, 5, 96, dtype=dtype)
    b = torch.randn(64, dtype=dtype)
    vr = v.clone().requires_grad_()
    torch.library.opcheck(linear, (x.requires_grad_(), vr, crow, col, 64, b.requires_grad_()))
    torch.library.opcheck(linear, (torch.randn(3, 96, dtype=dtype), v, crow, col, 64, None))
    gy = torch.randn(2, 5, 64, dtype=dtype)
    torch.library.opcheck(grad_input, (gy, v, crow, col, 96))
    torch.library.opcheck(grad_values, (gy, x.detach(), crow, col, 32, 32))


def test_gradcheck():
    bs = random_bsr(48, 32, (16, 16), 0.5, torch.float64, empty_rows=(1,))
    crow, col = bs.crow_indices, bs.col_indices
    v = bs.values.clone().requires_grad_()
    x = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(48, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: linear(x, v, crow, col, 48, b), (x, v, b))
    assert torch.autograd.gradcheck(lambda x, v: linear(x, v, crow, col, 48, None), (x, v))


# ------------------------------------------------------------------- module
def _linear(n, k, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(k, n, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_masked_linear(dtype):
    lin = _linear(128, 96, dtype)
    mod = BlockSparseLinear.from_dense(lin, (32, 32), 0.5)
    mask = mod.mask()
    ref = nn.Linear(96, 128, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(lin.weight * mask)
        ref.bias.copy_(lin.bias)
    assert torch.equal(mod.weight, ref.weight)
    x = torch.randn(4, 7, 96, dtype=dtype)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(mod(x), ref(x), rtol=tol, atol=tol)
    assert mod.nnz_blocks == 6 and "block=(32, 32)" in repr(mod)
    with pytest.raises(ValueError, match="does not divide"):
        BlockSparseLinear.from_dense(lin, (64, 64))


def test_module_training_updates_only_kept_blocks():
    lin = _linear(128, 128)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = m[3, 0] = True
    mod = BlockSparseLinear.from_dense(lin, (32, 32), m)
    before = mod.weight.detach().clone()
    opt = torch.optim.SGD(mod.parameters(), lr=0.1)
    x = torch.randn(16, 128)
    loss = mod(x).square().mean()
    loss.backward()
    # gradient equals the masked dense gradient
    ref = nn.Linear(128, 128)
    with torch.no_grad():
        ref.weight.copy_(before)
        ref.bias.copy_(lin.bias)
    ref(x).square().mean().backward()
    full_mask = mod.mask()
    gdense = ops.to_dense_reference(mod.values.grad, mod.crow_indices, mod.col_indices, 128, 128)
    torch.testing.assert_close(gdense, ref.weight.grad * full_mask)
    torch.testing.assert_close(mod.bias.grad, ref.bias.grad)
    opt.step()
    after = mod.weight.detach()
    assert torch.equal(after[~full_mask], torch.zeros(int((~full_mask).sum())))
    assert not torch.equal(after[full_mask], before[full_mask])


def test_module_state_dict_and_save_load(tmp_path):
    lin = _linear(64, 96)
    mod = BlockSparseLinear.from_dense(lin, (32, 32), 0.5)
    fresh = BlockSparseLinear(96, 64, block=(32, 32))
    fresh.load_state_dict(mod.state_dict())
    assert torch.equal(fresh.weight, mod.weight)
    path = tmp_path / "bsl.safetensors"
    mod.save(path)
    back = BlockSparseLinear.load(path)
    assert back.block == (32, 32) and back.nnz_blocks == mod.nnz_blocks
    for k, t in mod.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k
    x = torch.randn(3, 96)
    assert torch.equal(back(x), mod(x))
    sd = mod.state_dict()
    sd["col_indices"] = sd["col_indices"] + 5
    with pytest.raises(ValueError, match="out of range"):
        fresh.load_state_dict(sd)
    nobias = BlockSparseLinear.from_dense(nn.Linear(96, 64, bias=False), (32, 32), 0.25)
    nobias.save(path)
    assert BlockSparseLinear.load(path).bias is None


def test_module_compile():
    lin = _linear(128, 96)
    mod = BlockSparseLinear.from_dense(lin, (32, 32), 0.5)
    x = torch.randn(8, 96, requires_grad=True)
    eager = mod(x)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    mod.zero_grad()
    mod(x).sum().backward()
    torch.testing.assert_close(gx, x.grad)


def test_zero_in_features_gives_bias_on_every_row():
    bias = torch.randn(64)
    vals = torch.zeros(0, 32, 32)
    crow = torch.zeros(3, dtype=torch.int64)
    col = torch.zeros(0, dtype=torch.int64)
    y = linear(torch.zeros(5, 0), vals, crow, col, 64, bias)
    torch.testing.assert_close(y, bias.expand(5, 64))
    torch.testing.assert_close(y, ops.linear_reference(torch.zeros(5, 0), vals, crow, col, 64, bias))
