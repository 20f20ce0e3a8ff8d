"""lpvit.finetune: masks held fixed through semisparse.train, distillation, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semisparse import lpvit
from semisparse.nn import BlockSparseLinear
from semisparse.train import TrainConfig


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 64), nn.GELU(),
                         nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


def _data(n=6, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * 16 * 16, 10, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, 16, 16, generator=g)
        out.append({"x": x, "labels": (x.flatten(1) @ w).argmax(-1)})
    return out


def _cfg(tmp_path=None, **kw):
    base = dict(steps=12, lr=3e-3, warmup_steps=0, progress=False, distributed="none", seed=0, weight_decay=0.1)
    if tmp_path is not None:
        base["checkpoint_dir"] = str(tmp_path / "ckpt")
    base.update(kw)
    return TrainConfig(**base)


def _prune(model, swap=False):
    calib = [d["x"] for d in _data(2, seed=5)]
    return lpvit.prune(model, calib, block=(16, 16), flops=0.5, exclude=["7"], swap=swap)


def _pruned_zero(model, rep):
    for name, bmask in rep.masks.items():
        if name in rep.swapped:
            continue
        w = model.get_submodule(name).weight.detach().reshape(bmask.shape[0] * 16, -1)
        blocks = w.reshape(bmask.shape[0], 16, bmask.shape[1], 16).abs().sum((1, 3))
        assert bool((blocks[~bmask] == 0).all()), name
        assert bool((blocks[bmask] > 0).all()), name


def _loss(model, data):
    with torch.no_grad():
        return sum(F.cross_entropy(model(d["x"]), d["labels"]).item() for d in data) / len(data)


class _XModel(nn.Module):
    """Takes the dict batch's ``x`` as a keyword, as HF models take ``pixel_values``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_masks_stay_zero_and_the_loss_drops():
    model = _XModel(_net())
    rep = _prune(model)
    data = _data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss0 = _loss(model, data)
    res = lpvit.finetune(model, data, _cfg(), report=rep)
    assert res.step == 12
    _pruned_zero(model, rep)
    assert _loss(model, data) < loss0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # kept blocks trained
    assert "acc" in res.history[-1]
    # the gradient hooks are gone afterwards
    for name in rep.masks:
        assert not model.get_submodule(name).weight._backward_hooks


def test_swapped_model_trains_only_kept_blocks():
    model = _XModel(_net())
    rep = _prune(model, swap=True)
    assert rep.swapped and all(isinstance(model.get_submodule(n), BlockSparseLinear) for n in rep.swapped)
    masks = {n: model.get_submodule(n).block_mask().clone() for n in rep.swapped}
    data = _data()
    loss0 = _loss(model, data)
    lpvit.finetune(model, data, _cfg(), report=rep)
    assert _loss(model, data) < loss0
    for n in rep.swapped:
        assert torch.equal(model.get_submodule(n).block_mask(), masks[n])
    _pruned_zero(model, rep)  # the conv layer (not swapped) keeps its zero blocks
    # no report: allowed only when there is a BlockSparseLinear to hold the structure
    lpvit.finetune(model, data, _cfg(steps=2))
    with pytest.raises(ValueError, match="report"):
        lpvit.finetune(_XModel(_net()), data, _cfg(steps=1))


def test_distillation_loss_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T, a = 2.0, 0.3
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    want = (1 - a) * F.cross_entropy(s, y) + a * T * T * kl
    torch.testing.assert_close(lpvit.distillation_loss(s, t, y, a, T), want)
    torch.testing.assert_close(lpvit.distillation_loss(s, None, y, 0.0), F.cross_entropy(s, y))
    torch.testing.assert_close(lpvit.distillation_loss(s, t, None, 1.0, 1.0),
                               F.kl_div(torch.log_softmax(s, -1), torch.softmax(t, -1), reduction="batchmean"))


def test_pure_distillation_needs_no_labels_and_moves_toward_the_teacher():
    teacher = _XModel(_net()).eval()
    with torch.no_grad():
        teacher.net[7].weight.mul_(20)  # confident teacher: a KL gap worth closing
    model = copy.deepcopy(teacher)
    rep = _prune(model)
    data = [{"x": d["x"]} for d in _data()]

    def gap():
        with torch.no_grad():
            return sum(F.kl_div(torch.log_softmax(model(d["x"]), -1), torch.log_softmax(teacher(d["x"]), -1),
                                reduction="batchmean", log_target=True).item() for d in data)

    g0 = gap()
    lpvit.finetune(model, data, _cfg(steps=40), report=rep, teacher=teacher, distill=1.0, temperature=2.0)
    assert gap() < 0.5 * g0
    _pruned_zero(model, rep)
    assert all(p.requires_grad for p in teacher.parameters()) and teacher.training is False


def test_hf_vit_with_pixel_values_and_labels():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    teacher = copy.deepcopy(model).eval()
    data = [{"pixel_values": d["x"], "labels": d["labels"]} for d in _data()]
    rep = lpvit.prune(model, [{"pixel_values": d["pixel_values"]} for d in data[:2]], block=(16, 16), flops=0.6,
                      exclude=["classifier"])
    res = lpvit.finetune(model, data, _cfg(steps=6), report=rep, teacher=teacher, distill=0.5)
    assert res.step == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    for name, bmask in rep.masks.items():
        w = model.get_submodule(name).weight.detach().reshape(bmask.shape[0] * 16, -1)
        assert bool((w.reshape(bmask.shape[0], 16, bmask.shape[1], 16).abs().sum((1, 3))[~bmask] == 0).all())


def test_checkpoint_resume_keeps_masks(tmp_path):
    """Crashed in step 7 of 12 and resumed from step 6: the same weights as one uninterrupted run."""
    data = _data()
    a = _XModel(_net())
    rep_a = _prune(a)
    lpvit.finetune(a, data, _cfg(), report=rep_a)

    class Crash(Exception):
        pass

    def crash(step, metrics):
        if step == 7:
            raise Crash

    b = _XModel(_net())
    rep_b = _prune(b)
    with pytest.raises(Crash):
        lpvit.finetune(b, data, _cfg(tmp_path, checkpoint_every=3), report=rep_b, callbacks=[crash])
    b2 = _XModel(_net())
    rep_b2 = _prune(b2)  # same model, same calibration: same masks
    for n in rep_b.masks:
        assert torch.equal(rep_b.masks[n], rep_b2.masks[n])
    res = lpvit.finetune(b2, data, _cfg(tmp_path, checkpoint_every=3), report=rep_b2)
    assert res.resumed_from == 6
    for (n, pa), pb in zip(a.named_parameters(), b2.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    _pruned_zero(b2, rep_b2)


def test_bad_input():
    model = _XModel(_net())
    rep = _prune(model)
    data = _data(2)
    with pytest.raises(ValueError, match="distill must be in"):
        lpvit.finetune(model, data, _cfg(steps=1), report=rep, distill=1.5)
    with pytest.raises(ValueError, match="temperature"):
        lpvit.finetune(model, data, _cfg(steps=1), report=rep, teacher=model, distill=0.5, temperature=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        lpvit.finetune(model, data, _cfg(steps=1), report=rep, distill=0.5)
    with pytest.raises(ValueError, match="no labels"):
        lpvit.finetune(model, [{"x": d["x"]} for d in data], _cfg(steps=1), report=rep)
    with pytest.raises(TypeError, match="TrainConfig"):
        lpvit.finetune(model, data, {"steps": 1}, report=rep)
    with pytest.raises(TypeError, match="LPViTReport"):
        lpvit.finetune(model, data, _cfg(steps=1), report=rep.masks)
    with pytest.raises(ValueError, match="FSDP2"):
        lpvit.finetune(model, data, _cfg(steps=1, distributed="fsdp2"), report=rep)
