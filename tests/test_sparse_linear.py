"""SparseLinear: the drop-in nn.Linear with a 2:4-compressed weight."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_bit_equal, random_24
from semisparse import Sparse24, SparseLinear, nm_mask
from semisparse import io as ss_io


def masked_linear(lin: nn.Linear, mask: torch.Tensor) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=lin.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(lin.weight * mask)
        if lin.bias is not None:
            out.bias.copy_(lin.bias)
    return out


def random_mask(out_f, in_f, underfill=0.0):
    m = nm_mask(torch.rand(out_f, in_f))
    if underfill:
        m &= torch.rand(out_f, in_f) >= underfill
    return m


def tol(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
            torch.float16: dict(rtol=5e-3, atol=5e-3)}[dtype]


# ------------------------------------------------------------------ building
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(4, 1), (20, 7), (64, 33), (100, 16)])
def test_from_dense_magnitude(isa, in_f, out_f, bias):
    lin = nn.Linear(in_f, out_f, bias=bias)
    sl = SparseLinear.from_dense(lin)
    mask = nm_mask(lin.weight.detach().abs())
    assert torch.equal(sl.mask(), mask)
    assert torch.equal(sl.weight.detach(), lin.weight.detach() * mask)
    for shape in [(in_f,), (5, in_f), (2, 3, in_f)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(sl(x), F.linear(x, lin.weight * mask, lin.bias), **tol(torch.float32))


@pytest.mark.parametrize("underfill", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_dense_explicit_mask(isa, dtype, underfill):
    lin = nn.Linear(36, 10, dtype=dtype)
    mask = random_mask(10, 36, underfill)
    sl = SparseLinear.from_dense(lin, mask)
    ref = masked_linear(lin, mask)
    assert torch.equal(sl.weight.detach(), ref.weight.detach())
    if underfill == 0.0:
        assert torch.equal(sl.mask(), mask)
    else:
        assert bool((sl.mask() | ~mask).all())  # every kept entry is in the stored pattern
    x = torch.randn(7, 36).to(dtype)
    torch.testing.assert_close(sl(x), ref(x), **tol(dtype))


def test_mask_is_honoured_even_where_the_weight_is_zero():
    """The stored pattern (what training may update) is the mask, not the non-zeros."""
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 5.0, 1.0, 2.0, 3.0, -0.0, 0.0, 1.0], [1, 2, 3, 4, 5, 6, 7, 8]]))
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    sl = SparseLinear.from_dense(lin, mask)
    assert torch.equal(sl.mask(), mask)
    assert_bit_equal(sl.weight.detach(), torch.tensor([[0.0, 5.0, 0, 0, 0, 0, 0, 0], [0, 0, 3, 4, 5, 6, 0, 0]]))
    # magnitude masks (mask=None) with zero weights too
    lin.weight.data[0] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    sl = SparseLinear.from_dense(lin)
    assert torch.equal(sl.mask(), nm_mask(lin.weight.detach().abs()))


def test_attributes():
    lin = nn.Linear(24, 6)
    sl = SparseLinear.from_dense(lin)
    assert sl.in_features == 24 and sl.out_features == 6
    assert isinstance(sl.bias, nn.Parameter) and torch.equal(sl.bias, lin.bias)
    assert sl.values.shape == (6, 12) and sl.values.dtype == torch.float32
    assert sl.meta.shape == (6, 3) and sl.meta.dtype == torch.uint8
    assert {n for n, _ in sl.named_parameters()} == {"values", "bias"}
    assert {n for n, _ in sl.named_buffers()} == {"meta", "meta_gpu"}  # (meta_gpu: non-persistent)
    assert set(sl.state_dict()) == {"values", "bias", "meta"}
    assert sl.values.requires_grad and not sl.meta.requires_grad
    assert "in_features=24" in repr(sl) and "out_features=6" in repr(sl) and "2:4" in repr(sl)
    nb = SparseLinear.from_dense(nn.Linear(24, 6, bias=False))
    assert nb.bias is None
    # sparse() and to_dense() views
    sp = sl.sparse()
    assert isinstance(sp, Sparse24) and sp.shape == (6, 24)
    assert torch.equal(sp.to_dense(), sl.weight.detach())
    back = sl.to_dense()
    assert isinstance(back, nn.Linear)
    x = torch.randn(3, 24)
    torch.testing.assert_close(back(x), sl(x), **tol(torch.float32))
    # frozen weights stay frozen
    lin.weight.requires_grad_(False)
    assert not SparseLinear.from_dense(lin).values.requires_grad


def test_constructor():
    sl = SparseLinear(16, 3)
    assert sl(torch.randn(2, 16)).shape == (2, 3)
    assert SparseLinear(16, 3, bias=False, dtype=torch.bfloat16).values.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiple of 4"):
        SparseLinear(6, 3)


def test_drop_in_sequential(isa):
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 4))
    masks = [nm_mask(m.weight.detach().abs()) for m in dense if isinstance(m, nn.Linear)]
    sparse = nn.Sequential(*[SparseLinear.from_dense(m) if isinstance(m, nn.Linear) else m for m in dense])
    ref = nn.Sequential(*dense)
    it = iter(masks)
    for i, m in enumerate(ref):
        if isinstance(m, nn.Linear):
            ref[i] = masked_linear(m, next(it))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(sparse(x), ref(x), **tol(torch.float32))


# ------------------------------------------------------------------ compile
def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = nn.Sequential(SparseLinear.from_dense(nn.Linear(32, 16)), nn.ReLU(), SparseLinear.from_dense(nn.Linear(16, 8, bias=False)))
    eager = [p.detach().clone() for p in model.parameters()]
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    x = torch.randn(5, 32)
    y_c = compiled(x)
    y_e = model(x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)

    y_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_e.square().sum().backward()
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b.detach()) for a, b in zip(eager, model.parameters()))
    # 3-D input (a second trace, dynamic shapes) still matches
    x3 = torch.randn(2, 3, 32)
    torch.testing.assert_close(compiled(x3), model(x3), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- state / files
def test_state_dict_round_trip():
    sl = SparseLinear.from_dense(nn.Linear(20, 6))
    sd = sl.state_dict()
    assert set(sd) == {"values", "meta", "bias"}
    other = SparseLinear(20, 6)
    other.load_state_dict(sd)
    assert_bit_equal(other.values.detach(), sl.values.detach())
    assert torch.equal(other.meta, sl.meta)
    x = torch.randn(3, 20)
    assert torch.equal(other(x), sl(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_save_load_round_trip(tmp_path, dtype, bias):
    sl = SparseLinear.from_dense(nn.Linear(36, 5, bias=bias, dtype=dtype))
    path = tmp_path / "layer.safetensors"
    sl.save(path)
    assert os.listdir(tmp_path) == ["layer.safetensors"]  # no temp file left behind
    back = SparseLinear.load(path)
    assert (back.in_features, back.out_features) == (36, 5)
    assert back.values.dtype == dtype and back.meta.dtype == torch.uint8
    assert_bit_equal(back.values.detach(), sl.values.detach())
    assert torch.equal(back.meta, sl.meta)
    assert (back.bias is None) == (not bias)
    if bias:
        assert_bit_equal(back.bias.detach(), sl.bias.detach())
    x = torch.randn(4, 36).to(dtype)
    assert torch.equal(back(x), sl(x))
    # overwrite in place: still one file, new content
    sl2 = SparseLinear.from_dense(nn.Linear(36, 5, bias=bias, dtype=dtype))
    sl2.save(str(path))
    assert os.listdir(tmp_path) == ["layer.safetensors"]
    assert_bit_equal(SparseLinear.load(str(path)).values.detach(), sl2.values.detach())


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failed write leaves the old file intact and no temp file."""
    sl = SparseLinear.from_dense(nn.Linear(8, 2))
    path = tmp_path / "m.safetensors"
    sl.save(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ss_io.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        SparseLinear.from_dense(nn.Linear(8, 2)).save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert path.read_bytes() == before
    # a save into a folder that does not exist yet creates it
    sl.save(tmp_path / "sub" / "x.safetensors")
    assert os.listdir(tmp_path / "sub") == ["x.safetensors"]


def test_load_rejects_files_that_are_not_ours(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(foreign))
    with pytest.raises(ValueError, match="not a semisparse.SparseLinear file"):
        SparseLinear.load(foreign)
    other_format = tmp_path / "other.safetensors"
    ss_io.save_tensors({"a": torch.zeros(2)}, other_format, {"format": "somebody.else"})
    with pytest.raises(ValueError, match="somebody.else"):
        SparseLinear.load(other_format)
    for name, data in [("junk.bin", b"this is not a safetensors file at all"), ("empty.bin", b""), ("short.bin", b"\x01\x02")]:
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError):
            SparseLinear.load(p)
    with pytest.raises(FileNotFoundError):
        SparseLinear.load(tmp_path / "missing.safetensors")


def test_load_rejects_newer_version(tmp_path):
    sl = SparseLinear.from_dense(nn.Linear(8, 2))
    p = tmp_path / "v.safetensors"
    ss_io.save_tensors(sl.state_dict(), p, {"format": "semisparse.SparseLinear", "version": 99,
                                            "in_features": 8, "out_features": 2, "bias": True, "dtype": "float32"})
    with pytest.raises(ValueError, match="version"):
        SparseLinear.load(p)


def test_to_bfloat16_keeps_meta_uint8(isa):
    sl = SparseLinear.from_dense(nn.Linear(32, 8))
    meta = sl.meta.clone()
    x = torch.randn(3, 32)
    y32 = sl(x)
    sl.to(torch.bfloat16)
    assert sl.values.dtype == torch.bfloat16 and sl.bias.dtype == torch.bfloat16
    assert sl.meta.dtype == torch.uint8 and torch.equal(sl.meta, meta)
    torch.testing.assert_close(sl(x.bfloat16()).float(), y32, rtol=3e-2, atol=3e-2)
    sl.half()
    assert sl.values.dtype == torch.float16 and sl.meta.dtype == torch.uint8
    sl.double()
    assert sl.values.dtype == torch.float64 and sl.meta.dtype == torch.uint8


# ------------------------------------------------------------------ training
def test_training_step(isa):
    torch.manual_seed(3)
    teacher = nn.Linear(16, 4)
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = teacher(x)
    sl = SparseLinear.from_dense(nn.Linear(16, 4))
    meta0 = sl.meta.clone()
    mask0 = sl.mask()
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.mse_loss(sl(x), y)
        loss.backward()
        assert sl.values.grad is not None and sl.values.grad.shape == sl.values.shape
        assert sl.bias.grad is not None
        assert sl.meta.grad is None
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(sl.meta, meta0) and torch.equal(sl.mask(), mask0)
    assert bool((sl.weight.detach()[~mask0] == 0).all())  # pruned weights stay pruned


def test_weight_property_is_differentiable():
    sl = SparseLinear.from_dense(nn.Linear(8, 3))
    sl.weight.square().sum().backward()
    assert torch.allclose(sl.values.grad, 2 * sl.values.detach())


# ------------------------------------------------------------------ bad input
def test_from_dense_not_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv1d(4, 4, 1))


def test_from_dense_in_features_not_multiple_of_4():
    with pytest.raises(ValueError) as ei:
        SparseLinear.from_dense(nn.Linear(6, 3))
    msg = str(ei.value)
    assert "(3, 6)" in msg and "multiple of 4" in msg, msg


def test_from_dense_mask_not_24():
    lin = nn.Linear(16, 4)
    mask = random_mask(4, 16)
    mask[2, 4:8] = True  # 4 kept in row 2, group 1
    mask[3, 0:4] = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError) as ei:
        SparseLinear.from_dense(lin, mask)
    msg = str(ei.value)
    assert "2:4" in msg and "row 2" in msg and "columns 4..7" in msg, msg


def test_from_dense_mask_wrong_shape():
    with pytest.raises(ValueError, match=re.escape("(4, 12)")):
        SparseLinear.from_dense(nn.Linear(16, 4), torch.ones(4, 12, dtype=torch.bool))


def test_forward_dtype_mismatch():
    sl = SparseLinear.from_dense(nn.Linear(16, 4))
    for dt in (torch.float64, torch.bfloat16):
        with pytest.raises((RuntimeError, ValueError), match="dtype"):
            sl(torch.randn(2, 16, dtype=dt))
        with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="dtype"):
            sl(torch.randn(2, 16, dtype=dt))


def test_forward_device_mismatch():
    sl = SparseLinear.from_dense(nn.Linear(16, 4))
    x = torch.randn(2, 16, device="meta")
    with pytest.raises((RuntimeError, ValueError), match="meta"):
        sl(x)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="meta"):
        sl(x)


def test_forward_wrong_features():
    sl = SparseLinear.from_dense(nn.Linear(16, 4))
    with pytest.raises((RuntimeError, ValueError), match="16"):
        sl(torch.randn(2, 12))


def test_sparse24_from_dense_on_weight():
    """Sparse24.from_dense on an already 2:4 weight agrees with SparseLinear."""
    w = random_24(8, 32)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight.copy_(w)
    sl = SparseLinear.from_dense(lin, w != 0)
    sp = Sparse24.from_dense(w)
    assert torch.equal(sl.meta, sp.meta)
    assert_bit_equal(sl.values.detach(), sp.values)


def test_load_state_dict_rejects_invalid_metadata():
    lin = torch.nn.Linear(16, 4)
    mod = SparseLinear.from_dense(lin)
    sd = {k: v.clone() for k, v in mod.state_dict().items()}
    sd["meta"][2, 1] = 0x45  # group 3 of row 2: code 0b0100 ok, group 2: code 0b0101 keeps position 1 twice
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11"):
        SparseLinear(16, 4).load_state_dict(sd)
    sd["meta"][2, 1] = 0x84  # valid: (0,1) and (0,2)
    SparseLinear(16, 4).load_state_dict(sd)


def test_sparse24_constructor_rejects_invalid_metadata():
    sp = Sparse24.from_dense(torch.randn(3, 8), prune=True)
    meta = sp.meta.clone()
    meta[0, 0] = 0x4E & 0x0F | 0x30  # group 1 gets code 0b0011: positions 3 and 0, out of order
    with pytest.raises(ValueError, match="invalid 2:4 metadata"):
        Sparse24(sp.values, meta, sp.shape)
