"""MaskLLM: the mask layer, priors, schedules, export, compact task masks (no training loop)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import semisparse
from semisparse import maskllm
from semisparse.maskllm import MaskLLMLinear, Schedule
from semisparse.ops import gumbel as G


def _mlp(seed=0, dims=(16, 32, 8)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims[0], dims[1]), nn.GELU(), nn.Linear(dims[1], dims[2]))


def _mag_prior(model, names, n=2, m=4):
    return {k: semisparse.nm_mask(model.get_submodule(k).weight.abs(), n, m) for k in names}


# ------------------------------------------------------------------ the layer
def test_layer_shares_weight_and_freezes_it():
    lin = nn.Linear(16, 8)
    layer = MaskLLMLinear.from_linear(lin)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.logits.requires_grad and layer.logits.shape == (16 * 8 // 4, 6)
    trainable = MaskLLMLinear.from_linear(lin, train_weight=True)
    assert trainable.weight.requires_grad


def test_logits_init_std():
    layer = MaskLLMLinear.from_linear(nn.Linear(256, 256), init_std=0.01, generator=torch.Generator().manual_seed(1))
    assert abs(float(layer.logits.detach().std()) - 0.01) < 5e-4
    assert abs(float(layer.logits.detach().mean())) < 5e-4


def test_training_forward_is_the_gumbel_masked_weight():
    lin = nn.Linear(16, 8)
    layer = MaskLLMLinear.from_linear(lin, seed=7).train()
    st = layer.state
    st.tau, st.kappa, st.offset = 0.7, 150.0, 3
    x = torch.randn(5, 16)
    wm = G.gumbel_nm_masked_weight_reference(lin.weight, layer.logits.detach(), 7, 3, 0.7, 150.0, 2, 4)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, wm, lin.bias), rtol=1e-5, atol=1e-5)
    # the offset changes the noise, hence the output
    st.offset = 4
    assert not torch.allclose(layer(x), torch.nn.functional.linear(x, wm, lin.bias))


def test_eval_forward_uses_the_argmax_mask():
    lin = nn.Linear(16, 8)
    layer = MaskLLMLinear.from_linear(lin).eval()
    mask = layer.mask()
    assert mask.dtype == torch.bool and mask.shape == lin.weight.shape
    assert bool((mask.reshape(-1, 4).sum(-1) == 2).all())
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, lin.weight * mask, lin.bias))
    # the argmax pattern of each group
    idx = layer.logits.argmax(-1)
    torch.testing.assert_close(mask.reshape(-1, 4).float(), G.pattern_table(2, 4)[idx])


def test_gradients_reach_only_the_logits():
    model = _mlp()
    maskllm.add_masks(model, "2:4", targets=["0", "2"])
    model.train()
    model(torch.randn(4, 16)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("logits"):
            assert p.grad is not None and p.grad.abs().sum() > 0
        else:
            assert not p.requires_grad and p.grad is None


def test_masks_disabled_gives_the_dense_model():
    model = _mlp()
    x = torch.randn(4, 16)
    dense_out = model(x)
    maskllm.add_masks(model, targets=["0", "2"])
    for mode in (model.train, model.eval):
        mode()
        with maskllm.masks_disabled(model):
            torch.testing.assert_close(model(x), dense_out)
        assert not torch.allclose(model(x), dense_out)


def test_regulariser_collects_squared_masked_weights():
    model = _mlp()
    maskllm.add_masks(model, targets=["0", "2"])
    model.train()
    st = maskllm.sampling_state(model)
    st.collect_reg = True
    model(torch.randn(2, 16))
    assert len(st.reg_terms) == 2
    layer = model[0]
    wm = G.gumbel_nm_masked_weight_reference(layer.weight, layer.logits.detach(), layer.seed, st.offset, st.tau, st.kappa, 2, 4)
    torch.testing.assert_close(st.reg_terms[0].detach(), wm.pow(2).sum(), rtol=1e-5, atol=1e-6)
    assert st.reg_terms[0].requires_grad


# ------------------------------------------------------------------ priors
def test_prior_formula():
    torch.manual_seed(0)
    logits = torch.randn(100, 6) * 0.01
    prior = semisparse.nm_mask(torch.rand(4, 100), 2, 4)
    out = maskllm.prior_logits(logits, prior, 2, 4, alpha=3.0)
    table = G.pattern_table(2, 4)
    overlap = prior.reshape(-1, 4).float() @ table.t()
    torch.testing.assert_close(out, logits + (overlap - 1) * logits.std() * 3.0)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (4, 8)])
def test_prior_strength_effect(nm):
    n, m = nm
    lin = nn.Linear(64 * m // 4 * 4, 64)
    prior = semisparse.nm_mask(torch.rand_like(lin.weight), n, m)
    agree = {}
    for alpha in (0.0, 1.0, 3.0, 6.0):
        layer = MaskLLMLinear.from_linear(lin, n=n, m=m, prior=prior, alpha=alpha,
                                          generator=torch.Generator().manual_seed(0))
        agree[alpha] = float((layer.mask() == prior).reshape(-1, m).all(-1).float().mean())
    c = math.comb(m, n)
    assert agree[0.0] < 2.0 / c                      # no prior: the argmax is random
    assert agree[0.0] < agree[1.0] < agree[3.0] <= agree[6.0]
    # 2:4 and 1:4: few candidates next to the prior's; 4:8 has 16 one position away
    assert agree[3.0] > (0.9 if c <= 6 else 0.6) and agree[6.0] > (0.999 if c <= 6 else 0.95)


def test_prior_sampling_follows_the_prior_more_with_larger_alpha():
    # with tau small the sampled soft mask is nearly the hard sample: its agreement with the prior grows with alpha
    lin = nn.Linear(128, 64)
    prior = semisparse.nm_mask(lin.weight.abs(), 2, 4)
    rates = []
    for alpha in (0.0, 3.0):
        layer = MaskLLMLinear.from_linear(lin, prior=prior, alpha=alpha, generator=torch.Generator().manual_seed(0)).train()
        layer.state.tau, layer.state.kappa = 0.05, 100.0
        hard = G.gumbel_nm_mask(layer.logits.detach(), layer.seed, 0, 0.05, 100.0, 2, 4, hard=True)
        rates.append(float((hard.bool() == prior.reshape(-1, 4)).all(-1).float().mean()))
    assert rates[0] < 0.3 and rates[1] > 0.6


def test_bad_prior_is_refused():
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match="shape"):
        MaskLLMLinear.from_linear(lin, prior=torch.ones(8, 12, dtype=torch.bool))
    bad = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="not an 2:4 mask"):
        MaskLLMLinear.from_linear(lin, prior=bad)
    model = _mlp()
    with pytest.raises(ValueError, match="not masked"):
        maskllm.add_masks(model, targets=["0"], prior={"0": semisparse.nm_mask(model[0].weight, 2, 4), "nope": bad})
    with pytest.raises(ValueError, match="no mask for"):
        maskllm.add_masks(model, targets=["0", "2"], prior={"0": semisparse.nm_mask(model[0].weight, 2, 4)})


def test_add_masks_bad_input():
    model = _mlp(dims=(16, 30, 8))
    with pytest.raises(ValueError, match="pattern"):
        maskllm.add_masks(model, "unstructured:0.5")
    with pytest.raises(ValueError, match="match no"):
        maskllm.add_masks(model, targets=["nothing_here"])
    skipped = maskllm.add_masks(model, targets=["0", "2"])
    assert "2" in skipped and "multiple of 4" in skipped["2"]
    with pytest.raises(ValueError, match="in_features"):
        MaskLLMLinear(10, 4)
    with pytest.raises(ValueError, match="not supported"):
        MaskLLMLinear(16, 4, n=4, m=4)


# ------------------------------------------------------------------ schedules
def test_schedule_values():
    tau = Schedule(4.0, 0.05, 101)
    assert tau(0) == 4.0 and tau(100) == pytest.approx(0.05) and tau(50) == pytest.approx((4.0 + 0.05) / 2)
    assert tau(1000) == pytest.approx(0.05)  # clamped
    kappa = Schedule(100.0, 500.0, 11)
    assert [kappa(s) for s in (0, 5, 10)] == pytest.approx([100.0, 300.0, 500.0])
    ex = Schedule(4.0, 0.04, 3, "exp")
    assert [ex(s) for s in range(3)] == pytest.approx([4.0, 0.4, 0.04])
    cos = Schedule(1.0, 0.0, 3, "cosine")
    assert [cos(s) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    assert Schedule(2.0, 9.0, 5, "constant")(3) == 2.0
    assert Schedule(2.0, 9.0, 1)(0) == 9.0
    with pytest.raises(ValueError, match="kind"):
        Schedule(1.0, 2.0, 3, "step")
    with pytest.raises(ValueError, match="steps"):
        Schedule(1.0, 2.0, 0)
    with pytest.raises(ValueError, match="exp"):
        Schedule(1.0, 0.0, 3, "exp")


# ------------------------------------------------------------------ export
def test_export_matches_the_argmax_masked_dense_model():
    model = _mlp(dims=(64, 128, 32))
    maskllm.add_masks(model, targets=["0", "2"])
    with torch.no_grad():
        for layer in maskllm.mask_layers(model).values():
            layer.logits.normal_()
    masks = maskllm.learned_masks(model)
    x = torch.randn(7, 64)
    ref = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    with torch.no_grad():
        for k in ("0", "2"):
            ref.get_submodule(k).weight.copy_(model.get_submodule(k).weight * masks[k])
            ref.get_submodule(k).bias.copy_(model.get_submodule(k).bias)
    model.eval()
    torch.testing.assert_close(model(x), ref(x))
    report = maskllm.export(model)
    assert sorted(report.swapped) == ["0", "2"]
    assert all(isinstance(model.get_submodule(k), semisparse.SparseLinear) for k in ("0", "2"))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_remove_masks_restores_linear():
    model = _mlp()
    w0 = model[0].weight.detach().clone()
    maskllm.add_masks(model, targets=["0", "2"])
    masks = maskllm.remove_masks(model, apply=False)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, w0) and set(masks) == {"0", "2"}
    assert all(p.requires_grad for p in model.parameters())  # the flags from before add_masks


def test_remove_masks_restores_frozen_flags():
    model = _mlp()
    model[2].bias.requires_grad_(False)
    maskllm.add_masks(model, targets=["0"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith("logits"))
    maskllm.remove_masks(model)
    assert model[0].weight.requires_grad and model[2].weight.requires_grad and not model[2].bias.requires_grad


def test_state_dict_round_trip(tmp_path):
    model = _mlp()
    maskllm.add_masks(model, targets=["0", "2"], seed=3)
    with torch.no_grad():
        model[0].logits.normal_()
    sd = model.state_dict()
    assert "0.logits" in sd and "0.weight" in sd
    semisparse.io.save_tensors(sd, tmp_path / "m.safetensors")
    other = _mlp(seed=1)
    maskllm.add_masks(other, targets=["0", "2"])
    loaded, _ = semisparse.io.load_tensors(tmp_path / "m.safetensors")
    other.load_state_dict(loaded)
    for k, v in maskllm.learned_masks(model).items():
        assert torch.equal(maskllm.learned_masks(other)[k], v)


# ------------------------------------------------------------------ compile
def test_torch_compile_eval_and_train():
    model = _mlp(dims=(32, 64, 16))
    maskllm.add_masks(model, targets=["0", "2"])
    x = torch.randn(3, 32)
    model.eval()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
    model.train()
    st = maskllm.sampling_state(model)
    st.offset, st.tau = 5, 0.5
    compiled = torch.compile(model, fullgraph=True)
    y1 = compiled(x)
    y1.sum().backward()
    g1 = model[0].logits.grad.clone()
    model.zero_grad()
    y2 = model(x)
    y2.sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, model[0].logits.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ task masks
@pytest.mark.parametrize("pattern,max_bits", [("2:4", 0.75), ("1:4", 0.5), ("4:8", 1.0), ("1:2", 0.5)])
def test_pack_unpack_round_trip(pattern, max_bits):
    n, m = (int(v) for v in pattern.split(":"))
    masks = {"a": semisparse.nm_mask(torch.rand(24, 40), n, m), "b.c": semisparse.nm_mask(torch.rand(5, m * 7), n, m)}
    tensors, header = maskllm.pack_masks(masks, pattern)
    bits = 8 * sum(t.numel() for t in tensors.values()) / sum(v.numel() for v in masks.values())
    assert bits <= max_bits + 0.02
    back = maskllm.unpack_masks(tensors, header)
    assert all(torch.equal(back[k], masks[k]) for k in masks)


def test_task_masks_file(tmp_path):
    model = _mlp(dims=(64, 64, 16))
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks_a = {k: semisparse.nm_mask(torch.rand_like(model.get_submodule(k).weight), 2, 4) for k in ("0", "2")}
    masks_b = {k: semisparse.nm_mask(model.get_submodule(k).weight.abs(), 2, 4) for k in ("0", "2")}
    maskllm.save_task_masks(masks_a, tmp_path / "a.safetensors", metadata={"task": "a"})
    maskllm.save_task_masks(masks_b, tmp_path / "b.safetensors")
    size = (tmp_path / "a.safetensors").stat().st_size
    assert size < 64 * 64 / 8 + 1024  # far below one bit per weight plus the header
    la, meta = maskllm.load_task_masks(tmp_path / "a.safetensors")
    lb, _ = maskllm.load_task_masks(tmp_path / "b.safetensors")
    assert meta == {"task": "a"}
    x = torch.randn(3, 64)
    for masks, loaded in ((masks_a, la), (masks_b, lb)):
        assert all(torch.equal(loaded[k], masks[k]) for k in masks)
        pruned = maskllm.apply_task_masks(model, loaded)
        for k in ("0", "2"):
            torch.testing.assert_close(pruned.get_submodule(k).weight, dense[f"{k}.weight"] * masks[k])
        compressed = maskllm.apply_task_masks(model, loaded, compress=True)
        assert isinstance(compressed[0], semisparse.SparseLinear)
        torch.testing.assert_close(compressed(x), pruned(x), rtol=1e-5, atol=1e-5)
    # the dense weights are untouched
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    # a task mask set on mask layers becomes their final mask
    maskllm.add_masks(model, targets=["0", "2"])
    maskllm.set_masks(model, lb)
    assert all(torch.equal(maskllm.learned_masks(model)[k], lb[k]) for k in lb)


def test_task_masks_refuse_other_files(tmp_path):
    semisparse.save_masks({"a": torch.ones(2, 4, dtype=torch.bool)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="task-masks"):
        maskllm.load_task_masks(tmp_path / "plain.safetensors")


def test_memory_per_weight():
    fp32 = maskllm.memory_per_weight("2:4", "float32")
    assert fp32["logits"] == 6 and fp32["optimizer"] == 12 and fp32["total"] == 24
    assert maskllm.memory_per_weight("2:4", "bfloat16")["total"] == 12
