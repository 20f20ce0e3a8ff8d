"""Whole-model DSFormer: factorize / lowrank / train_stf / export."""

from __future__ import annotations

import copy

import pytest
import torch
from semisparse.dsformer import (
    DenseSparseLinear,
    FactorizeReport,
    LowRankLinear,
    collect_grams,
    export,
    factorize,
    lowrank,
    relative_error,
    train_stf,
)
from semisparse.train import TrainConfig
from torch import nn

transformers = pytest.importorskip("transformers")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _budget_ok(report: FactorizeReport, compression: float):
    for v in report.layers.values():
        out_f, in_f = v.shape
        bias = v.params_before - out_f * in_f
        assert v.params_after <= out_f * in_f / compression + bias
    assert report.params_after < report.params_before
    assert report.compression >= compression


def _anisotropic(n=256, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g) * scales


# ----------------------------------------------------------------- factorize
def test_factorize_mlp_budget():
    model = _mlp()
    dense = copy.deepcopy(model)
    x = torch.randn(32, 64)
    rep = factorize(model, compression=2.0)
    # a bare Sequential has no recognisable head: every Linear is factorised
    assert set(rep.layers) == {"0", "2", "4"}
    assert all(isinstance(model[i], DenseSparseLinear) for i in (0, 2, 4))
    _budget_ok(rep, 2.0)
    assert rep.model_params_after < rep.model_params_before
    with torch.no_grad():
        y, yd = model(x), dense(x)
    assert torch.isfinite(y).all()
    assert float((y - yd).norm() / yd.norm()) < 1.0
    assert all(0 <= v.init_error < 1 for v in rep.layers.values())
    assert "total" in rep.table() and "0" in str(rep)


def test_factorize_head_by_name_and_skips():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.tiny = nn.Linear(4, 4)
            self.classifier = nn.Linear(64, 10)

        def forward(self, x):
            return self.classifier(self.body(x))

    net = Net()
    rep = factorize(net, compression=4.0)
    assert list(rep.layers) == ["body"] and "tiny" in rep.skipped
    assert type(net.classifier) is nn.Linear and type(net.tiny) is nn.Linear
    _budget_ok(rep, 4.0)
    rep2 = factorize(Net(), compression=None, k=16, targets="body")
    assert rep2.layers["body"].k == 16
    rep3 = factorize(Net(), k=8, exclude=["tiny"])
    assert list(rep3.layers) == ["body"]


def test_factorize_llama_budget_head_untouched():
    model = _llama()
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16))
    rep = factorize(model, compression=2.0)
    assert type(model.lm_head) is nn.Linear and "lm_head" not in rep.layers
    assert len(rep.layers) == 2 * 7
    _budget_ok(rep, 2.0)
    with torch.no_grad():
        lg, lgd = model(ids).logits, dense(ids).logits
    assert torch.isfinite(lg).all()
    assert float((lg - lgd).norm() / lgd.norm()) < 1.0


def test_data_init_beats_svd_in_x_weighted_error():
    torch.manual_seed(0)
    X = _anisotropic()
    base = nn.Sequential(nn.Linear(64, 64))
    m_svd, m_data = copy.deepcopy(base), copy.deepcopy(base)
    factorize(m_svd, compression=2.0, init="svd")
    rep = factorize(m_data, compression=2.0, init="data", calib=[X[:128], (X[128:],)])
    H = collect_grams(base, ["0"], [X])["0"]
    W = base[0].weight
    err = {}
    for tag, m in (("svd", m_svd), ("data", m_data)):
        mod = m[0]
        err[tag] = relative_error(W, mod.sparse_factor().detach(), mod.D.detach(), H)
    assert err["data"] <= err["svd"] + 1e-6
    assert rep.layers["0"].init_error == pytest.approx(err["data"], rel=0.05, abs=1e-3)


def test_data_init_llama_dict_calib():
    model = _llama()
    calib = [{"input_ids": torch.randint(0, 128, (2, 16))} for _ in range(2)]
    rep = factorize(model, compression=2.0, init="data", calib=calib, iters=2, targets=["*.mlp.*"])
    assert len(rep.layers) == 6 and all(k.endswith(("gate_proj", "up_proj", "down_proj")) for k in rep.layers)
    with torch.no_grad():
        assert torch.isfinite(model(calib[0]["input_ids"]).logits).all()


# ------------------------------------------------------------------- lowrank
def test_lowrank_budget():
    model = _llama()
    dense = copy.deepcopy(model)
    rep = lowrank(model, compression=2.0)
    assert rep.method == "lowrank" and type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in rep.layers)
    _budget_ok(rep, 2.0)
    for v in rep.layers.values():
        out_f, in_f = v.shape
        assert (v.k + 1) * (out_f + in_f) > out_f * in_f / 2.0  # the largest rank
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        lg, lgd = model(ids).logits, dense(ids).logits
    assert torch.isfinite(lg).all() and float((lg - lgd).norm() / lgd.norm()) < 1.0
    # full rank reproduces the layer
    lin = nn.Linear(16, 8)
    lr = LowRankLinear.from_linear(lin, rank=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- errors
def test_bad_inputs():
    with pytest.raises(ValueError, match="compression"):
        factorize(_mlp(), compression=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        factorize(_mlp(), compression=2.0, k=16)
    with pytest.raises(ValueError, match="exactly one"):
        factorize(_mlp(), compression=None)
    with pytest.raises(ValueError, match="no nn.Linear layer selected.*0, 2, 4"):
        factorize(_mlp(), targets="nothing")
    with pytest.raises(ValueError, match="too small"):
        factorize(nn.Sequential(nn.Linear(4, 4)), compression=8.0)
    with pytest.raises(ValueError, match="init"):
        factorize(_mlp(), init="bogus")
    with pytest.raises(ValueError, match="calib"):
        factorize(_mlp(), init="data")
    with pytest.raises(ValueError, match="compression"):
        lowrank(_mlp(), compression=0.5)
    with pytest.raises(ValueError, match="no DenseSparseLinear"):
        train_stf(_mlp(), [torch.zeros(1)], TrainConfig(steps=1, progress=False))
    m = _mlp()
    factorize(m)
    with pytest.raises(ValueError, match="teacher"):
        train_stf(m, [torch.zeros(1)], TrainConfig(steps=1, progress=False), distill=0.5)
    with pytest.raises(ValueError, match="distill"):
        train_stf(m, [torch.zeros(1)], TrainConfig(steps=1, progress=False), distill=2.0)


# ---------------------------------------------------------------------- train
def _cfg(steps, **kw):
    return TrainConfig(steps=steps, lr=3e-3, min_lr=3e-3, schedule="constant", weight_decay=0.0, progress=False,
                       autocast="off", distributed="none", **kw)


def test_train_stf_llama_lowers_loss_freezes_and_compresses():
    model = _llama()
    factorize(model, compression=2.0, iters=2)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    steps, frozen_for = 12, 4
    snaps = {}

    def snap(step, metrics):
        snaps[step] = {n: m.mask.clone() for n, m in model.named_modules()
                       if isinstance(m, DenseSparseLinear) and m.mask is not None}

    res = train_stf(model, data, _cfg(steps), freeze_mask_steps=frozen_for, compress=False, callbacks=[snap])
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == steps and losses[-1] < losses[0]
    assert all(not snaps[s] for s in range(1, steps - frozen_for))
    first = snaps[steps - frozen_for]
    assert len(first) == 14
    for s in range(steps - frozen_for + 1, steps + 1):
        assert all(torch.equal(first[n], snaps[s][n]) for n in first)
    ids = data[0]
    with torch.no_grad():
        before = model(ids).logits
        names = export(model)
        after = model(ids).logits
    assert len(names) == 14 and all(m.compressed for m in model.modules() if isinstance(m, DenseSparseLinear))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_train_stf_compress_default_and_distill():
    teacher = _llama()
    model = copy.deepcopy(teacher)
    factorize(model, compression=2.0, iters=1, targets="*.mlp.*")
    data = [{"input_ids": torch.randint(0, 128, (2, 8))} for _ in range(2)]
    res = train_stf(model, data, _cfg(3), teacher=teacher, distill=0.5, temperature=2.0)
    assert res.step == 3 and all("kl" in h and "task_loss" in h for h in res.history if "loss" in h)
    assert all(m.compressed for m in model.modules() if isinstance(m, DenseSparseLinear))
    with torch.no_grad():
        assert torch.isfinite(model(data[0]["input_ids"]).logits).all()


def test_train_stf_classification_pairs():
    model = _mlp()
    teacher = copy.deepcopy(model)
    factorize(model, compression=2.0, iters=2)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    res = train_stf(model, data, _cfg(10), compress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert losses[-1] < losses[0]
    assert not any(m.compressed for m in model.modules() if isinstance(m, DenseSparseLinear))
    res = train_stf(model, [d[0] for d in data], _cfg(2), teacher=teacher, distill=1.0, freeze_mask_steps=5)
    assert all(m.compressed for m in model.modules() if isinstance(m, DenseSparseLinear))


class _Stop(Exception):
    pass


def test_train_stf_resume_after_mask_freeze_is_exact(tmp_path):
    """The masks frozen during training are checkpointed: a run killed after the freeze and
    resumed ends bitwise equal to an uninterrupted one (masks, latents, basis)."""
    base = _llama()
    factorize(base, compression=2.0, iters=2)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(3)]
    steps, frozen_for = 10, 5  # freeze after step 5; checkpoint at step 7

    def run(ckdir, stop_at=None):
        model = copy.deepcopy(base)

        def stop(step, metrics):
            if step == stop_at:
                raise _Stop

        cfg = _cfg(steps, checkpoint_dir=str(ckdir), checkpoint_every=7)
        try:
            train_stf(model, data, cfg, freeze_mask_steps=frozen_for, compress=False, callbacks=[stop])
        except _Stop:
            return None
        return model

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "killed", stop_at=8) is None  # the step-7 checkpoint is the latest
    resumed = run(tmp_path / "killed")
    a, b = whole.state_dict(), resumed.state_dict()
    masks = [k for k in a if k.endswith(".mask")]
    assert len(masks) == 14 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_train_stf_ddp_two_gloo_ranks_identical(tmp_path):
    """train_stf under torchrun (DDP, 2 gloo ranks): both ranks end with the same masks,
    factors and compressed values, and the loss goes down."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "tests" / "train_scripts" / "dsformer_run.py"), "--out", str(tmp_path), "--strategy", "ddp"]
    p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys() and sum(k.endswith(".values") for k in r0) == 14
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    meta = json.loads((tmp_path / "ckpt" / "step-00000006" / "trainer.json").read_text())
    assert meta["world_size"] == 2
    losses = [h["loss"] for h in json.loads((tmp_path / "rank0.json").read_text())["history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]


# ------------------------------------------------------- per-row-block bases
def _llama_gqa(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_factorize_blocks_int_budget_and_skips():
    from semisparse.dsformer import dense_sparse_params

    model = _mlp()
    x = torch.randn(8, 64)
    rep = factorize(model, compression=2.0, blocks=4, iters=2)
    # out=10 is not a multiple of 4: the head-like last layer is skipped with the reason
    assert set(rep.layers) == {"0", "2"} and type(model[4]) is nn.Linear
    assert rep.skipped == {"4": "blocks=4 does not divide out_features=10"}
    _budget_ok(rep, 2.0)
    for name, v in rep.layers.items():
        mod = model.get_submodule(name)
        out_f, in_f = v.shape
        assert isinstance(mod, DenseSparseLinear) and mod.blocks == v.blocks == 4 and mod.k == v.k
        assert mod.D.shape == (4 * v.k, in_f)
        assert v.params_after == dense_sparse_params(out_f, in_f, v.k, bias=True, blocks=4)
        assert dense_sparse_params(out_f, in_f, v.k + 4, blocks=4) > out_f * in_f / 2.0  # the largest k
        assert v.init_error == pytest.approx(mod.init_error)
    # the model count agrees with the report (S_latent holds twice the kept 2:4 entries)
    latent_extra = sum(model.get_submodule(n).S_latent.numel() // 2 for n in rep.layers)
    assert rep.model_params_after == sum(p.numel() for p in model.parameters())
    assert rep.model_params_before - rep.params_before + rep.params_after + latent_extra == rep.model_params_after
    assert "4x" in rep.table() and "B row blocks" in rep.table()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    # a fixed k: the check that it compresses counts every basis (k=28 on the 128x64 layer:
    # 28*64 + 128*14 = 3584 weights with one basis, 4*28*64 + 1792 = 8960 > 8192 with 4)
    rep = factorize(_mlp(), k=16, blocks=4, targets=["0"])
    assert list(rep.layers) == ["0"] and rep.layers["0"].k == 16
    assert rep.layers["0"].params_after == dense_sparse_params(128, 64, 16, bias=True, blocks=4) == 4 * 1024 + 1024 + 128
    assert list(factorize(_mlp(), k=28, targets=["0"]).layers) == ["0"]
    with pytest.raises(ValueError, match=r"no selected layer can be factorised.*k=28 with 4 row blocks would not "
                                         r"compress it: 8960 weights >= dense 8192"):
        factorize(_mlp(), k=28, blocks=4, targets=["0"])
    with pytest.raises(ValueError, match=r"blocks=3 does not divide out_features=128"):
        factorize(_mlp(), blocks=3, targets=["0"])


def test_factorize_blocks_1_report_unchanged():
    a, b = _mlp(), _mlp()
    ra, rb = factorize(a, compression=2.0, iters=1), factorize(b, compression=2.0, iters=1, blocks=1)
    assert ra.table() == rb.table() and "row blocks" not in ra.table()
    assert all(v.blocks == 1 for v in ra.layers.values())
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_factorize_blocks_heads_llama_gqa():
    model = _llama_gqa()
    dense = copy.deepcopy(model)
    rep = factorize(model, compression=2.0, blocks="heads", iters=1)
    assert len(rep.layers) == 14 and not rep.skipped
    for name, v in rep.layers.items():
        leaf = name.split(".")[-1]
        want = {"q_proj": 4, "o_proj": 4, "k_proj": 2, "v_proj": 2}.get(leaf, 1)
        assert v.blocks == model.get_submodule(name).blocks == want, name
    _budget_ok(rep, 2.0)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        lg, lgd = model(ids).logits, dense(ids).logits
    assert torch.isfinite(lg).all() and float((lg - lgd).norm() / lgd.norm()) < 1.0
    with pytest.raises(ValueError, match="blocks='heads' needs a model config with num_attention_heads"):
        factorize(_mlp(), blocks="heads")
    for bad in (0, -1, 2.5, True, "head", "4"):
        with pytest.raises(ValueError, match="blocks must be a positive integer or 'heads'"):
            factorize(_mlp(), blocks=bad)


def test_factorize_blocks_data_init_error_is_x_weighted():
    from semisparse.dsformer.init import damped_gram

    X = _anisotropic()
    base = nn.Sequential(nn.Linear(64, 64))
    model = copy.deepcopy(base)
    rep = factorize(model, compression=2.0, init="data", calib=[X], blocks=4, iters=3)
    H = collect_grams(base, ["0"], [X])["0"]
    mod = model[0]
    err = relative_error(base[0].weight, mod.to_dense_weight().detach(), torch.eye(64), damped_gram(H, 0.01))
    assert rep.layers["0"].init_error == pytest.approx(err, rel=1e-4)


def test_train_stf_and_export_with_blocks():
    model = _llama_gqa()
    factorize(model, compression=2.0, blocks="heads", iters=1)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(2)]
    res = train_stf(model, data, _cfg(6), freeze_mask_steps=2, compress=False)
    losses = [h["loss"] for h in res.history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    ids = data[0]
    with torch.no_grad():
        before = model(ids).logits
        names = export(model)
        after = model(ids).logits
    assert len(names) == 14 and model.model.layers[0].self_attn.k_proj.blocks == 2
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
