"""lpvit.prune on models built from configs (HF ViT) and on a plain conv net."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semisparse import lpvit


def _vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("power", [None, "analytical", "measured"])
def test_vit_hits_the_flops_target_and_zeroes_whole_blocks(power):
    model = _vit()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    rep = lpvit.prune(model, calib, block=(16, 16), flops=0.5, power=power, exclude=["classifier"])
    assert 0.49 <= rep.kept_flops <= 0.5 + 1e-9
    kept = sum(r.flops * (1 - r.sparsity) for r in rep.layers) / sum(r.flops for r in rep.layers)
    assert kept == pytest.approx(rep.kept_flops)
    for r in rep.layers:
        w = model.get_submodule(r.name).weight.detach().reshape(r.shape[0], -1)
        blocks = w.reshape(r.shape[0] // 16, 16, r.shape[1] // 16, 16).abs().sum((1, 3))
        mask = rep.masks[r.name]
        assert bool((blocks[~mask] == 0).all()) and bool((blocks[mask] > 0).all())
        assert r.sparsity <= 0.95
    assert "sparsity" in rep.table()


def test_conv_net_and_bad_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 32, 2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 32))
    calib = [torch.randn(2, 4, 8, 8) for _ in range(2)]
    rep = lpvit.prune(model, calib, block="16x16", flops=0.6)
    assert {r.kind for r in rep.layers} == {"conv2d", "linear"}
    assert 0.59 <= rep.kept_flops <= 0.6 + 1e-9
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lpvit.prune(model, calib, block=(16, 16), flops=1.5)
    with pytest.raises(ValueError, match="does not divide"):
        lpvit.prune(model, calib, block=(32, 24), flops=0.5)
    with pytest.raises(ValueError, match="nothing to prune"):
        lpvit.prune(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), calib, flops=0.5)
    with pytest.raises(ValueError, match="block must"):
        lpvit.prune(model, calib, block="32by32", flops=0.5)
    with pytest.raises(ValueError, match="power"):
        lpvit.prune(model, calib, block=(16, 16), flops=0.5, power="watts")


def test_swap_to_block_sparse_linear_keeps_outputs_and_plots(tmp_path):
    import semisparse

    model = _vit()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    rep = lpvit.prune(model, calib, block=(16, 16), flops=0.5, exclude=["classifier"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).logits
    swapped_model = _vit()
    rep2 = lpvit.prune(swapped_model, calib, block=(16, 16), flops=0.5, exclude=["classifier"], swap=True)
    assert len(rep2.swapped) == 12  # every Linear but the classifier; the patch Conv2d stays
    for name in rep2.swapped:
        mod = swapped_model.get_submodule(name)
        assert isinstance(mod, semisparse.BlockSparseLinear)
        assert torch.equal(mod.block_mask(), rep2.masks[name])
    with torch.no_grad():
        torch.testing.assert_close(swapped_model(pixel_values=x).logits, ref, rtol=1e-4, atol=1e-5)
    pytest.importorskip("matplotlib")
    rep2.plot(tmp_path / "lpvit.png")
    assert (tmp_path / "lpvit.png").stat().st_size > 1000


def test_measured_cost_curve():
    # (timings are not asserted: tests check correctness, the bench measures speed)
    cost = lpvit.measured_cost((256, 256), (32, 32), rows=64, reps=3)
    assert cost.shape == (lpvit.LEVELS,) and cost.dtype == torch.float64
    assert bool(torch.isfinite(cost).all()) and bool((cost >= 0).all())
    # linear between the measured levels: the midpoint of 0 and 0.25 is the mean of its ends
    assert float(cost[12]) == pytest.approx(float(cost[0]) + 0.48 * float(cost[25] - cost[0]), rel=1e-9, abs=1e-12)
    cache = {}
    a = lpvit.measured_cost((64, 64), (16, 16), rows=8, reps=1, cache=cache)
    assert lpvit.measured_cost((64, 64), (16, 16), rows=8, reps=1, cache=cache) is a
