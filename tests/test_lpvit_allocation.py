"""LPViT allocation math: block scores, distortion curves, the FLOPs target."""

from __future__ import annotations

import pytest
import torch

from semisparse.lpvit import LEVELS, LayerCurve, allocate, block_scores, distortion_curve


def _curves(n_layers=12, block=(16, 16), seed=0, with_blocks=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_layers):
        n, k = 32 * (1 + i % 3), 64 * (1 + i % 2)
        w = torch.randn(n, k, generator=g)
        grad = torch.randn(n, k, generator=g) * (0.1 + i)
        nb = (n // block[0]) * (k // block[1])
        out.append(LayerCurve(f"l{i}", flops=float(2 * n * k), distortion=distortion_curve(w, grad, block),
                              nblocks=nb if with_blocks else None))
    return out


def test_block_scores():
    w = torch.arange(16.0).reshape(4, 4)
    g = torch.full((4, 4), -2.0)
    s = block_scores(w, g, (2, 2))
    torch.testing.assert_close(s, torch.tensor([[5.0, 9.0], [21.0, 25.0]]))
    with pytest.raises(ValueError, match="does not divide"):
        block_scores(w, g, (3, 2))


def test_distortion_curve_matches_the_formula():
    torch.manual_seed(0)
    w, g = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    d = distortion_curve(w, g, (4, 4))
    assert d.shape == (LEVELS,) and d[0] == 0
    scores = block_scores(w, g, (4, 4)).reshape(-1)
    order = torch.sort(scores, stable=True).indices
    for level in (25, 50, 100):  # 1, 2, 4 of the 4 blocks pruned
        keep = torch.ones(2, 2, dtype=torch.bool).reshape(-1)
        keep[order[: round(level / 100 * 4)]] = False
        mask = keep.reshape(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
        dw = torch.where(mask, torch.zeros_like(w), -w)
        ref = ((dw * g) ** 2).mean() + 0.5 * ((g * dw).sum() ** 2 + 1e-7 * (dw**2).sum())
        torch.testing.assert_close(d[level], ref)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7, 0.9])
def test_allocation_hits_the_flops_target(target):
    curves = _curves()
    a = allocate(curves, target)
    assert target - 0.01 <= a.kept_flops <= target + 1e-9
    assert all(0 <= s <= 0.95 + 1e-9 for s in a.sparsity.values())
    # realised as whole blocks
    for c in curves:
        assert abs(a.sparsity[c.name] * c.nblocks - round(a.sparsity[c.name] * c.nblocks)) < 1e-9


def test_allocation_prefers_layers_where_pruning_is_cheap():
    curves = _curves(with_blocks=False)
    a = allocate(curves, 0.5)
    # layer 0 has the smallest gradients (cheapest distortion), the last the largest
    assert a.sparsity["l0"] >= a.sparsity[f"l{len(curves) - 1}"]
    assert a.sparsity["l0"] > 0.5


def test_allocation_bad_input():
    curves = _curves()
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            allocate(curves, bad)
    with pytest.raises(ValueError, match="cap"):
        allocate(curves, 0.01)
    with pytest.raises(ValueError, match="no layers"):
        allocate([], 0.5)
    assert allocate(curves, 1.0).kept_flops == 1.0


def test_power_term_is_balanced_and_keeps_the_target():
    curves = _curves(with_blocks=False)
    for c in curves:  # a measured-like cost: not proportional to FLOPs
        c.cost = (1 - torch.linspace(0, 1, LEVELS, dtype=torch.float64)) ** 2 * c.flops
    a = allocate(curves, 0.5)
    assert a.beta > 0 and 0.49 <= a.kept_flops <= 0.5 + 1e-9
