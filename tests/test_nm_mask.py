"""nm_mask: the N:M mask that keeps the n largest scores of every m consecutive ones."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from semisparse import nm_mask

NM = [(2, 4), (1, 4), (4, 8)]


def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    return t.reshape(-1, m)


def _check_keeps_largest(scores: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> None:
    assert mask.dtype == torch.bool
    assert mask.shape == scores.shape
    g = _groups(scores.double(), m)
    k = _groups(mask, m)
    assert torch.equal(k.sum(-1), torch.full((g.shape[0],), n))
    kept = torch.where(k, g, torch.inf).amin(-1)
    dropped = torch.where(~k, g, -torch.inf).amax(-1)
    assert bool((kept >= dropped).all()), "a dropped score is larger than a kept one"


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(1, 8), (5, 24), (2, 3, 16), (64,)])
def test_exactly_n_largest_kept(n, m, shape):
    scores = torch.randn(*shape)
    mask = nm_mask(scores, n, m)
    _check_keeps_largest(scores, mask, n, m)


@pytest.mark.parametrize("n,m", NM)
@given(data=st.data())
def test_exactly_n_largest_kept_property(n, m, data):
    rows = data.draw(st.integers(1, 6))
    groups = data.draw(st.integers(1, 6))
    # few distinct values so that ties are common
    vals = data.draw(
        st.lists(st.integers(-3, 3), min_size=rows * groups * m, max_size=rows * groups * m)
    )
    scores = torch.tensor(vals, dtype=torch.float32).reshape(rows, groups * m)
    mask = nm_mask(scores, n, m)
    _check_keeps_largest(scores, mask, n, m)
    # ties: among equal scores at the boundary, the lower indices win
    g = _groups(scores, m)
    k = _groups(mask, m)
    for row_s, row_k in zip(g.tolist(), k.tolist()):
        order = sorted(range(m), key=lambda i: (-row_s[i], i))[:n]
        assert [i in order for i in range(m)] == row_k


def test_default_is_2_4_and_magnitude_usage():
    w = torch.tensor([[-5.0, 1.0, 4.0, -0.5, 0.1, -0.2, 0.3, -0.4]])
    mask = nm_mask(w.abs())
    assert mask.tolist() == [[True, False, True, False, False, False, True, True]]


def test_ties_are_deterministic_lower_index_wins():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    want = [
        [False, True, True, False],
        [True, False, True, False],
        [True, True, False, False],
        [True, True, False, False],
    ]
    for _ in range(3):
        assert nm_mask(s).tolist() == want
    # 1:4 and 4:8 on constant input keep the first n of each group
    assert nm_mask(torch.ones(2, 8), 1, 4).tolist() == [[True, False, False, False] * 2] * 2
    assert nm_mask(torch.ones(1, 16), 4, 8).tolist() == [([True] * 4 + [False] * 4) * 2]
    # the same result on a large input, twice
    big = torch.randint(0, 3, (64, 256)).float()
    assert torch.equal(nm_mask(big), nm_mask(big.clone()))


def test_nan_scores_are_pruned_first():
    nan = math.nan
    s = torch.tensor(
        [
            [nan, 1.0, 2.0, 3.0],
            [1.0, nan, nan, 0.5],
            [nan, nan, nan, -1.0],
            [nan, nan, nan, nan],
            [nan, -math.inf, 0.0, nan],
        ]
    )
    mask = nm_mask(s)
    assert mask.tolist() == [
        [False, False, True, True],
        [True, False, False, True],
        [True, False, False, True],  # -1.0 kept; one NaN fills the second slot (lowest index)
        [True, True, False, False],
        [False, True, True, False],  # NaN ranks below -inf
    ]
    assert torch.equal(mask.reshape(-1, 4).sum(-1), torch.full((5,), 2))


def test_infinities():
    s = torch.tensor([[math.inf, -math.inf, 1.0, math.inf]])
    assert nm_mask(s).tolist() == [[True, False, False, True]]
    big = torch.finfo(torch.float32).max
    s = torch.tensor([[big, -math.inf, big, math.inf], [-math.inf, -big, -math.inf, math.nan]])
    assert nm_mask(s).tolist() == [[True, False, False, True], [True, True, False, False]]
    assert nm_mask(s, 1, 4).tolist() == [[False, False, False, True], [False, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32])
def test_dtypes(dtype):
    s = torch.tensor([[4, 1, 3, 2, -1, -7, 5, 0]]).to(dtype)
    assert nm_mask(s).tolist() == [[True, False, True, False, False, False, True, True]]


def test_float64_scores_keep_full_precision():
    # these differ only below float32's precision
    s = torch.tensor([[1.0, 1.0 + 1e-12, 1.0 + 2e-12, 1.0 + 1e-13]], dtype=torch.float64)
    assert nm_mask(s).tolist() == [[False, True, True, False]]


def test_input_not_modified_and_grad_ignored():
    s = torch.randn(3, 8, requires_grad=True)
    before = s.detach().clone()
    mask = nm_mask(s)
    assert not mask.requires_grad
    assert torch.equal(s.detach(), before)
    # a non-contiguous input works like its contiguous copy
    t = torch.randn(8, 6).t()
    assert torch.equal(nm_mask(t), nm_mask(t.contiguous()))


@pytest.mark.parametrize("shape,m", [((3, 6), 4), ((2, 5), 4), ((7,), 8), ((4, 12), 8)])
def test_last_dim_not_multiple_of_m(shape, m):
    with pytest.raises(ValueError, match=re.escape(str(shape))) as ei:
        nm_mask(torch.randn(*shape), n=1, m=m)
    assert f"m={m}" in str(ei.value)


def test_scalar_input_rejected():
    with pytest.raises(ValueError, match=r"shape \(\)"):
        nm_mask(torch.tensor(1.0))


@pytest.mark.parametrize(
    "n,m", [(0, 4), (5, 4), (-1, 4), (2, 0), (2, -4), (2.0, 4), (2, 4.0), (None, 4)]
)
def test_bad_n_m(n, m):
    with pytest.raises(ValueError) as ei:
        nm_mask(torch.randn(2, 8), n=n, m=m)
    msg = str(ei.value)
    assert f"n={n!r}" in msg and f"m={m!r}" in msg


def test_not_a_tensor():
    with pytest.raises(TypeError, match="tensor"):
        nm_mask([[1.0, 2.0, 3.0, 4.0]])
