"""MaskLLM training: train_masks on a tiny Llama, kill-and-resume, DDP / FSDP2 on 2 gloo
processes, transfer from a prior mask, distillation, the CLI path, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import semisparse
from semisparse import maskllm

pytest.importorskip("transformers")

SCRIPTS = Path(__file__).parent / "train_scripts"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
from maskllm_run import tiny_llama, token_data  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _script(out: Path, *args: str, torchrun: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(SCRIPTS / "maskllm_run.py"), "--out", str(out), *args]
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def _masks(path: Path) -> dict:
    return {k: v for k, v in load_file(path).items()}


def _cfg(**kw) -> maskllm.MaskLLMConfig:
    base = dict(steps=6, batch_size=4, lr=5e-2, prior="magnitude", seed=3, progress=False)
    return maskllm.MaskLLMConfig(**{**base, **kw})


# ------------------------------------------------------------------ in process
def test_train_masks_learns_and_keeps_weights_frozen():
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    data = token_data(64)
    with torch.no_grad():
        before = model(input_ids=data[:16], labels=data[:16]).loss.item()
    prior_model = tiny_llama()
    prior = semisparse.prune(prior_model, "magnitude", pattern="2:4")
    with torch.no_grad():
        prior_loss = prior_model(input_ids=data[:16], labels=data[:16]).loss.item()
    res = maskllm.train_masks(model, data, _cfg(steps=40, prior=prior), log=lambda *a: None)
    assert set(res.masks) == set(prior) and len(res.masks) == 14
    for name, mk in res.masks.items():
        assert mk.shape == dense[f"{name}.weight"].shape
        assert bool((mk.reshape(-1, 4).sum(-1) == 2).all())
    # weights untouched; only the logits trained
    for name, mod in maskllm.mask_layers(model).items():
        assert torch.equal(mod.weight, dense[f"{name}.weight"])
    model.eval()
    with torch.no_grad():
        after = model(input_ids=data[:16], labels=data[:16]).loss.item()
    assert after < prior_loss, (before, prior_loss, after)
    assert res.history[0]["tau"] == 4.0 and res.history[-1]["tau"] == pytest.approx(0.05)
    assert res.history[-1]["kappa"] == pytest.approx(500.0)
    assert all("reg" in h for h in res.history if "loss" in h)
    assert 0 < sum(res.changed.values()) / len(res.changed) < 1
    # export: SparseLinear gives the argmax-masked dense model's outputs
    ref = tiny_llama()
    semisparse.apply_masks(ref, res.masks)
    report = maskllm.export(model)
    assert len(report.swapped) == 14
    x = data[:2]
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_sparsegpt_prior_leaves_weights_untouched():
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    res = maskllm.train_masks(model, token_data(), _cfg(steps=1, prior="sparsegpt", prior_nsamples=8),
                              log=lambda *a: None)
    assert res.prior is not None and len(res.prior) == 14
    for name, mod in maskllm.mask_layers(model).items():
        assert torch.equal(mod.weight, dense[f"{name}.weight"])


def test_transfer_from_a_prior_mask(tmp_path):
    """A general mask is the prior of a new task's mask: with the paper's strength most
    groups keep their pattern; training on the new data moves some; a weaker prior moves
    more. The task masks store compactly and apply to the same dense weights."""
    general = semisparse.prune(tiny_llama(), "magnitude", pattern="2:4")
    maskllm.save_task_masks(general, tmp_path / "general.safetensors")
    new_task = (token_data(64, seed=11) * 5 + 7) % 64
    changed = {}
    for alpha in (3.0, 0.5):
        model = tiny_llama()
        res = maskllm.train_masks(model, new_task, _cfg(steps=20, prior=str(tmp_path / "general.safetensors"),
                                                        prior_strength=alpha), log=lambda *a: None)
        assert all(torch.equal(res.prior[k], general[k]) for k in general)
        changed[alpha] = sum(res.changed.values()) / len(res.changed)
        maskllm.save_task_masks(res.masks, tmp_path / f"task{alpha}.safetensors")
    assert 0 < changed[3.0] < changed[0.5]
    dense = tiny_llama()
    for alpha in (3.0, 0.5):
        masks, _ = maskllm.load_task_masks(tmp_path / f"task{alpha}.safetensors")
        pruned = maskllm.apply_task_masks(dense, masks)
        for k, mk in masks.items():
            torch.testing.assert_close(pruned.get_submodule(k).weight, dense.get_submodule(k).weight * mk)
    numel = sum(m.numel() for m in general.values())
    assert (tmp_path / "general.safetensors").stat().st_size * 8 / numel < 0.75 + 8 * 4096 / numel


def _distill_loss(model, data, loss):
    """Distillation loss of the argmax-masked model against the dense one (eval mode)."""
    with torch.no_grad():
        return float(maskllm.trainer._task_loss(loss, model, {"input_ids": data}))


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_distillation_on_an_encoder(loss):
    """Models without an LM head learn masks by distillation from the dense model: the
    learned masks fit the dense outputs better than the prior they started from."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, initializer_range=0.3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = (BertForMaskedLM if loss == "kl" else BertModel)(cfg).eval()
    assert maskllm.trainer._resolve_loss(model, "auto") == loss
    data = token_data(32)
    res = maskllm.train_masks(model, data, _cfg(steps=40, loss=loss, lr=5e-2), log=lambda *a: None)
    assert len(res.masks) == 12  # q, k, v, attention out, intermediate, output per layer
    model.eval()
    learned = _distill_loss(model, data, loss)
    maskllm.set_masks(model, res.prior)
    prior = _distill_loss(model, data, loss)
    assert learned < 0.9 * prior, (learned, prior)


def test_bf16_logits_option():
    model = tiny_llama()
    res = maskllm.train_masks(model, token_data(), _cfg(steps=4, logits_dtype="bfloat16"), log=lambda *a: None)
    assert all(mod.logits.dtype == torch.bfloat16 for mod in maskllm.mask_layers(model).values())
    assert len(res.masks) == 14


def test_config_bad_input():
    with pytest.raises(ValueError, match="pattern"):
        maskllm.MaskLLMConfig(pattern="unstructured:0.5")
    with pytest.raises(ValueError, match="tau"):
        maskllm.MaskLLMConfig(tau=(4.0, 0.0))
    with pytest.raises(ValueError, match="prior"):
        maskllm.MaskLLMConfig(prior="no-such-method")
    with pytest.raises(ValueError, match="loss"):
        maskllm.MaskLLMConfig(loss="l1")
    with pytest.raises(ValueError, match="steps"):
        maskllm.MaskLLMConfig(steps=0)
    with pytest.raises(ValueError, match="logits_dtype"):
        maskllm.MaskLLMConfig(logits_dtype="int8")


# ------------------------------------------------------------------ subprocesses
def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _script(ref)
    killed = _script(run, "--kill-after", "3", check=False)
    assert killed.returncode != 0
    assert (run / "ckpt" / "latest").read_text().strip() == "step-00000002"
    _script(run)
    assert json.loads((run / "rank0.json").read_text())["resumed_from"] == 2
    a, b = _masks(ref / "rank0.safetensors"), _masks(run / "rank0.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = load_file(ref / "ckpt" / "step-00000006" / "model.safetensors")
    rb = load_file(run / "ckpt" / "step-00000006" / "model.safetensors")
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)  # the logits, bitwise


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_learn_identical_masks(tmp_path, strategy):
    out = tmp_path / strategy
    _script(out, "--strategy", strategy, torchrun=True)
    r0, r1 = _masks(out / "rank0.safetensors"), _masks(out / "rank1.safetensors")
    assert len(r0) == 14 and r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    meta = json.loads((out / "ckpt" / "step-00000006" / "trainer.json").read_text())
    assert meta["world_size"] == 2
    rec = json.loads((out / "rank0.json").read_text())
    hist = rec["history"]
    assert hist and all("loss" in h for h in hist if "eval" not in h)
    # the last evaluation used the final masks (not a stale copy of earlier logits)
    assert [h["step"] for h in hist if "eval" in h] == [2, 4, 6]
    assert rec["last_eval"]["loss"] == pytest.approx(rec["final_loss"], rel=1e-6)


# ------------------------------------------------------------------ CLI + plots
def test_cli_maskllm(tmp_path):
    pytest.importorskip("matplotlib")
    from semisparse.cli import main
    from semisparse.demo.language import generate_corpus, word_tokenizer

    tok = word_tokenizer()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    (tmp_path / "train.txt").write_text(generate_corpus(400, seed=0))
    (tmp_path / "test.txt").write_text(generate_corpus(50, seed=1))
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(tmp_path / "dense"), "--method", "maskllm", "--prior", "magnitude",
               "--steps", "6", "--batch-size", "4", "--nsamples", "16", "--seqlen", "32",
               "--calib", str(tmp_path / "train.txt"), "--eval-data", str(tmp_path / "test.txt"), "--eval-every", "3",
               "--out", str(out), "--compress", "--task-masks-out", str(tmp_path / "task.safetensors"),
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--plot", str(tmp_path / "plots")])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["changed_vs_prior.png", "eval_ppl.png", "loss.png"]
    assert (tmp_path / "ckpt" / "metrics.jsonl").exists()
    model = semisparse.load_pretrained(str(out))
    assert sum(isinstance(m, semisparse.SparseLinear) for m in model.modules()) == 14
    masks, meta = maskllm.load_task_masks(tmp_path / "task.safetensors")
    assert len(masks) == 14 and meta["method"] == "maskllm"
    # bad input: one line, exit code 2
    assert main(["prune", "--model", str(tmp_path / "dense"), "--method", "maskllm", "--out", str(tmp_path / "x")]) == 2
    assert main(["prune", "--model", str(tmp_path / "dense"), "--method", "maskllm", "--calib",
                 str(tmp_path / "train.txt"), "--tau", "4", "--out", str(tmp_path / "y")]) == 2


def test_train_weights_option_updates_the_kept_weights():
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    res = maskllm.train_masks(model, token_data(), _cfg(steps=3, train_weights=True), log=lambda *a: None)
    layers = maskllm.mask_layers(model)
    assert all(mod.weight.requires_grad for mod in layers.values())
    changed = [not torch.equal(mod.weight, dense[f"{name}.weight"]) for name, mod in layers.items()]
    assert all(changed)
    assert all("reg" in h for h in res.history if "loss" in h)
    others = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("logits", "weight", "bias"))]
    assert others == []
    assert not model.model.embed_tokens.weight.requires_grad


def test_regulariser_sign_and_decay_in_the_logged_loss():
    model = tiny_llama()
    cfg = _cfg(steps=5, reg_lambda=1e-2)
    res = maskllm.train_masks(model, token_data(), cfg, log=lambda *a: None)
    rows = [h for h in res.history if "loss" in h]
    assert len(rows) == 5
    for h in rows:
        t = h["step"] - 1  # the 0-based step that produced the line
        expected = h["task_loss"] - 1e-2 * (1 - t / 5) * h["reg"]
        assert h["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert h["reg"] > 0


def test_resume_refuses_other_maskllm_settings_or_data(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    maskllm.train_masks(tiny_llama(), token_data(), _cfg(steps=2, checkpoint_dir=ckpt), log=lambda *a: None)
    with pytest.raises(ValueError, match="kappa"):
        maskllm.train_masks(tiny_llama(), token_data(), _cfg(steps=2, checkpoint_dir=ckpt, kappa=(10.0, 50.0)),
                            log=lambda *a: None)
    with pytest.raises(ValueError, match="data differ"):
        maskllm.train_masks(tiny_llama(), token_data(seed=6), _cfg(steps=2, checkpoint_dir=ckpt), log=lambda *a: None)
    # the same settings resume (here: nothing left to do)
    res = maskllm.train_masks(tiny_llama(), token_data(), _cfg(steps=2, checkpoint_dir=ckpt), log=lambda *a: None)
    assert res.resumed_from == 2


def test_bad_config_fails_before_the_model_is_touched():
    model = tiny_llama()
    with pytest.raises(ValueError, match="min_lr"):
        maskllm.MaskLLMConfig(lr=1e-6)
    with pytest.raises(ValueError, match="kappa"):
        maskllm.MaskLLMConfig(kappa=(0.0, 5.0))
    assert not maskllm.mask_layers(model)


def test_any_model_with_a_task_loss_and_a_clear_error_without():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(64, 16)
    y = x[:, :4].argmax(-1)
    batches = [{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, 64, 8)]
    with pytest.raises(ValueError, match="task_loss"):
        maskllm.train_masks(model, batches, _cfg(steps=2), log=lambda *a: None)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    res = maskllm.train_masks(
        model, batches, _cfg(steps=3), log=lambda *a: None,
        task_loss=lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )
    assert set(res.masks) == {"0", "2"}


def test_add_masks_twice_keeps_earlier_layers_trainable():
    from torch import nn

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    maskllm.add_masks(model, targets=["0"])
    maskllm.add_masks(model, targets=["2"])
    assert model[0].logits.requires_grad and model[2].logits.requires_grad
    assert maskllm.sampling_state(model) is model[0].state is model[2].state
