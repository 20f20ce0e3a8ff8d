"""Sparse24: the 2:4 compressed format (layouts "cpu" and "cutlass_sm80")."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given

from conftest import (
    DTYPES,
    HALF_DTYPES,
    assert_bit_equal,
    bits,
    canon_zero,
    random_24,
    sparse24_dense,
)
from semisparse import Sparse24, nm_mask
from semisparse.ops import sparse24 as ops

cutlass_conv = pytest.importorskip("torch.sparse._semi_structured_conversions")
torch_cutlass = cutlass_conv.sparse_semi_structured_from_dense_cutlass


def _check_meta_codes(meta: torch.Tensor, k: int) -> None:
    """Every code has idx0 < idx1, and the unused high nibble (K % 8 == 4) is zero."""
    codes = ops.codes_from_meta(meta, k)
    assert bool(((codes & 3) < (codes >> 2)).all())
    if k % 8 == 4:
        assert bool(((meta[:, -1] >> 4) == 0).all())


# ---------------------------------------------------------------- round trips
@given(w=sparse24_dense())
def test_round_trip_property(w):
    n, k = w.shape
    s = Sparse24.from_dense(w)
    assert s.layout == "cpu"
    assert s.shape == torch.Size((n, k))
    assert s.dtype == w.dtype
    assert s.device == w.device
    assert s.values.shape == (n, k // 2) and s.values.dtype == w.dtype
    assert s.meta.shape == (n, (k + 7) // 8) and s.meta.dtype == torch.uint8
    _check_meta_codes(s.meta, k)
    # zeros of either sign are stored as +0.0
    assert not bool((bits(s.values) == bits(torch.tensor([-0.0], dtype=w.dtype))).any())
    dense = s.to_dense()
    assert_bit_equal(dense, canon_zero(w))
    assert torch.equal(dense, w)
    # identical to the pure-torch reference
    rv, rm = ops.compress_reference(w)
    assert_bit_equal(s.values, rv)
    assert torch.equal(s.meta, rm)
    assert_bit_equal(ops.decompress_reference(s.values, s.meta), dense)
    # the values are the kept entries, in column order
    cols = ops.kept_columns(s.meta, k)
    assert bool((cols[:, 0::2] < cols[:, 1::2]).all())
    assert_bit_equal(canon_zero(w.gather(1, cols)), s.values)


@pytest.mark.parametrize("dtype", DTYPES)
def test_groups_with_0_1_2_nonzeros(dtype):
    rows = []
    for nz in range(16):  # every non-zero pattern with at most 2 bits
        if bin(nz).count("1") > 2:
            continue
        rows.append([float(i + 1) if nz >> i & 1 else 0.0 for i in range(4)])
    w = torch.tensor(rows, dtype=dtype).reshape(1, -1).repeat(3, 1)  # K = 44: K % 8 == 4
    w[1] = -w[1]
    w[2] = torch.where(w[2] == 0, torch.tensor(-0.0, dtype=dtype), w[2])
    s = Sparse24.from_dense(w)
    assert s.values.shape == (3, w.shape[1] // 2)
    assert_bit_equal(s.to_dense(), canon_zero(w))
    codes = ops.codes_from_meta(s.meta, w.shape[1])
    expected = [ops.CODE_FROM_MASK[nz] for nz in range(16) if bin(nz).count("1") <= 2]
    assert codes.tolist() == [expected] * 3


def test_all_zero_and_all_negative_zero():
    for z in (0.0, -0.0):
        w = torch.full((5, 12), z)
        s = Sparse24.from_dense(w)
        assert_bit_equal(s.values, torch.zeros(5, 6))
        assert_bit_equal(s.to_dense(), torch.zeros(5, 12))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 4), (3, 12), (7, 20), (70, 300), (33, 36)])
def test_round_trip_fixed_shapes(dtype, n, k):
    w = random_24(n, k, dtype, underfill=0.3, neg_zero=True)
    s = Sparse24.from_dense(w)
    assert_bit_equal(s.to_dense(), canon_zero(w))


def test_non_contiguous_input():
    w = random_24(16, 24).t().contiguous().t()  # same values, transposed strides
    assert not w.is_contiguous()
    s = Sparse24.from_dense(w)
    assert torch.equal(s.to_dense(), w)


# ---------------------------------------------------------------- attributes
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,k", [(1, 8), (7, 64), (32, 128), (5, 520)])
def test_nbytes_16bit_ratio(dtype, n, k):
    w = random_24(n, k, dtype)
    s = Sparse24.from_dense(w)
    dense_bytes = w.numel() * w.element_size()
    assert s.nbytes * 10000 == dense_bytes * 5625  # exactly 0.5625x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(3, 4), (3, 12), (9, 40)])
def test_nbytes_formula(dtype, n, k):
    s = Sparse24.from_dense(random_24(n, k, dtype))
    esize = torch.empty((), dtype=dtype).element_size()
    assert s.nbytes == n * (k // 2) * esize + n * ((k + 7) // 8)


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_to_dtype(src, dst):
    w = random_24(6, 20, src, underfill=0.2)
    s = Sparse24.from_dense(w)
    t = s.to(dst)
    assert isinstance(t, Sparse24)
    assert t.dtype == dst and t.values.dtype == dst
    assert t.meta.dtype == torch.uint8
    assert torch.equal(t.meta, s.meta)
    assert t.shape == s.shape and t.layout == s.layout
    assert torch.equal(t.to_dense(), w.to(dst))
    # the original is unchanged
    assert s.dtype == src
    assert torch.equal(s.to_dense(), w)


def test_to_device_and_kwargs():
    s = Sparse24.from_dense(random_24(4, 16))
    t = s.to("cpu")
    assert t.device.type == "cpu" and torch.equal(t.to_dense(), s.to_dense())
    u = s.to(dtype=torch.bfloat16)
    assert u.dtype == torch.bfloat16 and u.meta.dtype == torch.uint8


def test_repr():
    r = repr(Sparse24.from_dense(random_24(4, 16)))
    assert "Sparse24" in r and "(4, 16)" in r and "cpu" in r


# ---------------------------------------------------------------- bad input
def test_not_24_names_first_offending_group():
    w = random_24(8, 32)
    w[5, 0:4] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # later row
    w[3, 8:12] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # first in row-major order
    w[3, 20:24] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError) as ei:
        Sparse24.from_dense(w)
    msg = str(ei.value)
    assert "row 3" in msg and "columns 8..11" in msg, msg
    assert "(8, 32)" in msg and "prune=True" in msg


def test_negative_zero_does_not_count_as_nonzero():
    w = torch.tensor([[1.0, -0.0, 2.0, -0.0]])
    s = Sparse24.from_dense(w)
    assert_bit_equal(s.to_dense(), torch.tensor([[1.0, 0.0, 2.0, 0.0]]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_keeps_two_largest(dtype):
    w = torch.randn(9, 36, dtype=torch.float64).to(dtype)
    with pytest.raises(ValueError):
        Sparse24.from_dense(w)
    s = Sparse24.from_dense(w, prune=True)
    expected = torch.where(nm_mask(w.abs(), 2, 4), w, torch.zeros((), dtype=dtype))
    assert_bit_equal(s.to_dense(), canon_zero(expected))
    # explicit case with negatives: magnitudes decide
    v = torch.tensor([[-4.0, 1.0, 3.0, -2.0, 0.5, 0.0, -0.25, 0.125]], dtype=dtype)
    assert Sparse24.from_dense(v, prune=True).to_dense().tolist() == [[-4.0, 0.0, 3.0, 0.0, 0.5, 0.0, -0.25, 0.0]]


def test_prune_does_not_modify_input():
    w = torch.randn(4, 8)
    before = w.clone()
    Sparse24.from_dense(w, prune=True)
    assert torch.equal(w, before)


@pytest.mark.parametrize("shape", [(3, 6), (2, 10), (1, 3), (4, 2)])
def test_last_dim_not_multiple_of_4(shape):
    with pytest.raises(ValueError) as ei:
        Sparse24.from_dense(torch.zeros(*shape))
    msg = str(ei.value)
    assert str(shape) in msg and "multiple of 4" in msg, msg


@pytest.mark.parametrize("shape", [(8,), (2, 2, 8), ()])
def test_not_2d(shape):
    with pytest.raises(ValueError, match="2-D"):
        Sparse24.from_dense(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64])
def test_unsupported_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        Sparse24.from_dense(torch.zeros(4, 8, dtype=dtype))


def test_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        Sparse24.from_dense(torch.zeros(32, 32, dtype=torch.float16), layout="cutlass_sm90x")


def test_constructor_validates():
    s = Sparse24.from_dense(random_24(4, 16))
    Sparse24(s.values, s.meta, (4, 16))
    with pytest.raises(ValueError, match="values"):
        Sparse24(s.values[:, :4], s.meta, (4, 16))
    with pytest.raises(ValueError, match="meta"):
        Sparse24(s.values, s.meta[:, :1], (4, 16))
    with pytest.raises(ValueError, match="meta"):
        Sparse24(s.values, s.meta.to(torch.int16), (4, 16))
    with pytest.raises(ValueError, match="2-D"):
        Sparse24(s.values, s.meta, (4, 4, 4))
    with pytest.raises(ValueError, match="layout"):
        Sparse24(s.values, s.meta, (4, 16), layout="csr")


# ---------------------------------------------------------------- cutlass_sm80
CUTLASS_SHAPES = [(32, 32), (32, 64), (64, 32), (96, 128), (128, 64), (64, 96), (32, 256)]


def _check_cutlass_identical(w: torch.Tensor) -> Sparse24:
    s = Sparse24.from_dense(w, layout="cutlass_sm80")
    rv, rm = torch_cutlass(w)
    assert s.layout == "cutlass_sm80"
    assert s.values.shape == rv.shape and s.meta.shape == rm.shape
    assert s.meta.dtype == rm.dtype == torch.int16
    # PyTorch copies -0.0 as is; we store +0.0 (otherwise bit-identical)
    assert_bit_equal(s.values, canon_zero(rv))
    assert torch.equal(s.values.view(torch.int16), canon_zero(rv).view(torch.int16))
    assert torch.equal(s.meta.view(torch.int16), rm.view(torch.int16))
    assert_bit_equal(s.to_dense(), canon_zero(w))
    return s


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,k", CUTLASS_SHAPES)
@pytest.mark.parametrize("underfill", [0.0, 0.4])
def test_cutlass_bit_identical_to_torch(dtype, n, k, underfill):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = random_24(n, k, dtype, generator=g, underfill=underfill)
    _check_cutlass_identical(w)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cutlass_every_group_pattern(dtype):
    """All 11 patterns of at most 2 non-zeros (including empty groups), every row."""
    pats = [nz for nz in range(16) if bin(nz).count("1") <= 2]
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, len(pats), (64, 32), generator=g)
    nzmask = torch.tensor(pats)[idx]  # [64, 32] group masks
    keep = ((nzmask.unsqueeze(-1) >> torch.arange(4)) & 1).bool().reshape(64, 128)
    w = torch.where(keep, torch.randn(64, 128, generator=g) + 3.0, 0.0).to(dtype)
    _check_cutlass_identical(w)
    _check_cutlass_identical(torch.zeros(32, 64, dtype=dtype))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cutlass_negative_zero(dtype):
    w = random_24(64, 64, dtype, underfill=0.3, neg_zero=True)
    _check_cutlass_identical(w)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cutlass_prune(dtype):
    w = torch.randn(32, 64).to(dtype)
    s = Sparse24.from_dense(w, layout="cutlass_sm80", prune=True)
    pruned = torch.where(nm_mask(w.abs()), w, torch.zeros((), dtype=dtype))
    _check_cutlass_identical(pruned)
    assert torch.equal(s.to_dense(), pruned)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cutlass_layout_conversions(dtype):
    w = random_24(64, 96, dtype, underfill=0.2)
    cpu = Sparse24.from_dense(w)
    cut = cpu.to_layout("cutlass_sm80")
    assert cut.layout == "cutlass_sm80"
    assert torch.equal(cut.meta, torch_cutlass(w)[1])
    back = cut.to_layout("cpu")
    assert torch.equal(back.meta, cpu.meta)
    assert_bit_equal(back.values, cpu.values)
    assert torch.equal(cut.cpu_meta(), cpu.meta)
    assert cpu.to_layout("cpu") is cpu
    # same values in both layouts; cutlass metadata is int16 [N, K/16]: the same bytes
    assert_bit_equal(cut.values, cpu.values)
    assert cut.nbytes == cpu.nbytes
    # a Sparse24 rebuilt from its parts round-trips
    again = Sparse24(cut.values, cut.meta, cut.shape, "cutlass_sm80")
    assert torch.equal(again.to_dense(), w)


def test_cutlass_rejects_fp32():
    with pytest.raises(TypeError, match="float32"):
        Sparse24.from_dense(torch.zeros(32, 64), layout="cutlass_sm80")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(33, 64), (16, 64), (32, 20), (32, 16), (32, 48), (1, 8), (64, 100)])
def test_cutlass_wrong_shape(dtype, shape):
    with pytest.raises(ValueError) as ei:
        Sparse24.from_dense(torch.zeros(*shape, dtype=dtype), layout="cutlass_sm80")
    msg = str(ei.value)
    assert str(shape) in msg, msg
    assert re.search(r"multiple of (32|16)", msg), msg


def test_cutlass_constructor_rejects_wrong_shape():
    v = torch.zeros(32, 8, dtype=torch.float16)
    m = torch.zeros(32, 1, dtype=torch.int16)
    with pytest.raises(ValueError, match="multiple of"):
        Sparse24(v, m, (32, 16), "cutlass_sm80")
