"""semisparse.hf: save_pretrained / load_pretrained of pruned transformers models."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from semisparse import SparseLinear, nm_mask, sparsify  # noqa: E402
from semisparse.hf import COMPRESSED_WEIGHTS, MASKS_FILE, SEMISPARSE_JSON, load_pretrained, save_pretrained  # noqa: E402
from semisparse.masks import apply_masks, load_masks  # noqa: E402

V = 64


# ------------------------------------------------------------------ fixtures
def tiny_llama(tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertModel(cfg).eval()


def block_masks(model) -> dict[str, torch.Tensor]:
    """Magnitude 2:4 masks of every Linear / Conv1D inside the transformer blocks, in the
    shape of each weight (Conv1D: [in, out], groups along the input dim 0)."""
    masks = {}
    for name, mod in model.named_modules():
        if ".layers." not in f".{name}" and ".h." not in f".{name}" and ".layer." not in f".{name}":
            continue
        if type(mod) is nn.Linear:
            masks[name] = nm_mask(mod.weight.detach().abs(), 2, 4)
        elif isinstance(mod, Conv1D):
            masks[name] = nm_mask(mod.weight.detach().t().abs(), 2, 4).t()
    return masks


def pruned(model_fn):
    model = model_fn()
    masks = block_masks(model)
    apply_masks(model, masks)
    return model, masks


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(V - 1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


IDS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


# ------------------------------------------------------------ compress=False
def test_dense_round_trip_llama(tmp_path, tokenizer):
    model, masks = pruned(tiny_llama)
    meta = {"method": "magnitude", "pattern": "2:4", "seed": 0}
    out = save_pretrained(model, tmp_path / "m", tokenizer=tokenizer, masks=masks, metadata=meta)
    assert out == tmp_path / "m"
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", SEMISPARSE_JSON, MASKS_FILE, "tokenizer.json"} <= files
    info = json.loads((out / SEMISPARSE_JSON).read_text())
    assert info["compressed"] is False and info["method"] == "magnitude" and info["pattern"] == "2:4"
    assert info["metadata"] == meta and info["masks"] == MASKS_FILE
    loaded = load_pretrained(out)
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied
    assert not loaded.training
    got, got_meta = load_masks(out / MASKS_FILE)
    assert got_meta == meta and all(torch.equal(got[k], masks[k]) for k in masks)
    # a plain transformers load gives the same model
    assert torch.equal(logits(transformers.AutoModelForCausalLM.from_pretrained(out)), logits(model))
    assert transformers.AutoTokenizer.from_pretrained(out)("w1 w2")["input_ids"] == [2, 3]
    assert not leftovers(tmp_path)


def test_plain_hf_folder_loads(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "plain")
    loaded = load_pretrained(tmp_path / "plain")
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert torch.equal(logits(loaded), logits(model))


def test_dtype_argument(tmp_path):
    model, masks = pruned(tiny_llama)
    save_pretrained(model, tmp_path / "c", compress=True, masks=masks)
    loaded = load_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    sl = loaded.model.layers[0].mlp.up_proj
    assert isinstance(sl, SparseLinear) and sl.values.dtype == torch.bfloat16 and sl.meta.dtype == torch.uint8
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------- compress=True
def test_compressed_round_trip_llama(tmp_path, tokenizer):
    model, masks = pruned(tiny_llama)
    save_pretrained(model, tmp_path / "c", tokenizer=tokenizer, compress=True, masks=masks,
                    metadata={"method": "magnitude", "pattern": "2:4"})
    files = set(os.listdir(tmp_path / "c"))
    assert {"config.json", COMPRESSED_WEIGHTS, SEMISPARSE_JSON, MASKS_FILE, "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    info = json.loads((tmp_path / "c" / SEMISPARSE_JSON).read_text())
    assert info["compressed"] is True and sorted(info["sparse_modules"]) == sorted(masks)
    assert info["sparse_modules"]["model.layers.0.mlp.down_proj"] == {
        "in_features": 64, "out_features": 32, "bias": False, "source": "Linear"}
    assert info["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert info["dense_modules"] == {}

    loaded = load_pretrained(tmp_path / "c")
    for name in masks:
        assert isinstance(loaded.get_submodule(name), SparseLinear)
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    # bit-identical to the same model sparsified in memory
    ref = copy.deepcopy(model)
    sparsify(ref, masks=masks)
    assert torch.equal(logits(loaded), logits(ref))


def test_compressed_round_trip_gpt2_conv1d(tmp_path):
    model, masks = pruned(tiny_gpt2)
    assert any(isinstance(model.get_submodule(n), Conv1D) for n in masks)
    save_pretrained(model, tmp_path / "g", compress=True, masks=masks)
    info = json.loads((tmp_path / "g" / SEMISPARSE_JSON).read_text())
    assert sorted(info["sparse_modules"]) == sorted(masks)
    assert info["sparse_modules"]["transformer.h.0.mlp.c_fc"] == {
        "in_features": 32, "out_features": 128, "bias": True, "source": "Conv1D"}
    assert info["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    loaded = load_pretrained(tmp_path / "g")
    fc = loaded.transformer.h[0].mlp.c_fc
    assert isinstance(fc, SparseLinear)
    assert torch.equal(fc.weight, model.transformer.h[0].mlp.c_fc.weight.t())
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)

    # re-saving the loaded model: compressed again (bit-identical) or dense for transformers
    save_pretrained(loaded, tmp_path / "g2", compress=True)
    assert torch.equal(logits(load_pretrained(tmp_path / "g2")), logits(loaded))
    save_pretrained(loaded, tmp_path / "g3")
    dense = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "g3")
    assert isinstance(dense.transformer.h[0].mlp.c_fc, Conv1D)
    assert torch.equal(dense.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-5, atol=1e-5)


def test_compressed_sparsified_model_and_bert(tmp_path):
    # a model that already holds SparseLinear layers needs no masks; BertModel takes the
    # architectures path (no LM head)
    model = tiny_bert()
    report = sparsify(model, targets="*.layer.*")
    assert report.swapped
    save_pretrained(model, tmp_path / "b", compress=True)
    loaded = load_pretrained(tmp_path / "b")
    assert type(loaded) is transformers.BertModel
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)) == sorted(report.swapped)
    assert torch.equal(logits(loaded), logits(model))


def test_compress_leaves_some_layers_dense(tmp_path):
    model, masks = pruned(tiny_llama)
    # an unstructured mask and a mask of the tied LM head cannot be stored 2:4
    q = "model.layers.0.self_attn.q_proj"
    masks[q] = torch.zeros_like(masks[q])
    masks[q][0, :4] = True
    apply_masks(model, {q: masks[q]})
    head = nm_mask(model.lm_head.weight.detach().abs(), 2, 4)
    with pytest.warns(UserWarning, match="stay dense"):
        save_pretrained(model, tmp_path / "c", compress=True, masks={**masks, "lm_head": head})
    info = json.loads((tmp_path / "c" / SEMISPARSE_JSON).read_text())
    assert info["dense_modules"] == {
        q: "mask is not 2:4 (a group of 4 inputs keeps more than 2)",
        "lm_head": "weight is shared with model.embed_tokens.weight",
    }
    loaded = load_pretrained(tmp_path / "c")
    assert type(loaded.get_submodule(q)) is nn.Linear
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_transformers_refuses_compressed_folder(tmp_path):
    model, masks = pruned(tiny_llama)
    save_pretrained(model, tmp_path / "c", compress=True, masks=masks)
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c")


# ------------------------------------------------------------- save errors
def test_weights_outside_mask_are_an_error(tmp_path):
    model = tiny_llama()
    masks = block_masks(model)  # not applied
    with pytest.raises(ValueError, match="non-zero weight.*apply the masks first"):
        save_pretrained(model, tmp_path / "c", compress=True, masks=masks)
    assert os.listdir(tmp_path) == []


def test_nothing_to_compress(tmp_path):
    with pytest.raises(ValueError, match="nothing to compress"):
        save_pretrained(tiny_llama(), tmp_path / "c", compress=True)
    assert os.listdir(tmp_path) == []


def test_out_dir_exists_and_overwrite(tmp_path):
    model, masks = pruned(tiny_llama)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        save_pretrained(model, tmp_path / "m")
    assert os.listdir(tmp_path / "m") == ["old.txt"]
    save_pretrained(model, tmp_path / "m", overwrite=True)
    assert "old.txt" not in os.listdir(tmp_path / "m") and "config.json" in os.listdir(tmp_path / "m")
    assert not leftovers(tmp_path)
    (tmp_path / "f").write_text("a file")
    with pytest.raises(FileExistsError, match="is not a folder"):
        save_pretrained(model, tmp_path / "f", overwrite=True)


def test_failure_leaves_nothing_behind(tmp_path):
    class BadTokenizer:
        def save_pretrained(self, path):
            (os.fspath(path) and open(os.path.join(path, "partial.json"), "w").close())
            raise RuntimeError("disk full")

    model, masks = pruned(tiny_llama)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "m", tokenizer=BadTokenizer())
    assert os.listdir(tmp_path) == []
    # an existing folder survives a failed overwrite
    save_pretrained(model, tmp_path / "m")
    before = sorted(os.listdir(tmp_path / "m"))
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "m", tokenizer=BadTokenizer(), overwrite=True)
    assert sorted(os.listdir(tmp_path / "m")) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"masks": {"nope": torch.ones(2, dtype=torch.bool)}}, ValueError, "not a module of the model"),
    ({"masks": {"model.layers.0.mlp.up_proj": torch.ones(32, 64, dtype=torch.bool)}}, ValueError,
     r"shape \(32, 64\), the module's weight \(64, 32\)"),
    ({"masks": {}}, ValueError, "masks is empty"),
    ({"metadata": {"x": {1, 2}}}, TypeError, "JSON-serialisable"),
    ({"tokenizer": lambda s: [1]}, TypeError, "tokenizer must have save_pretrained"),
])
def test_save_bad_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        save_pretrained(tiny_llama(), tmp_path / "m", **kwargs)
    assert os.listdir(tmp_path) == []


def test_save_needs_a_transformers_model(tmp_path):
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        save_pretrained(nn.Linear(4, 4), tmp_path / "m")


# ------------------------------------------------------------- load errors
def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        load_pretrained(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty\): the folder has no config.json; expected a Hugging Face"):
        load_pretrained(tmp_path / "empty")
    model = tiny_llama()
    model.config.save_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match=r"noweights\): no model weights: expected model.safetensors"):
        load_pretrained(tmp_path / "noweights")
    (tmp_path / "noweights" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin, which semisparse does not load"):
        load_pretrained(tmp_path / "noweights")


def test_load_broken_compressed_folders(tmp_path):
    model, masks = pruned(tiny_llama)
    save_pretrained(model, tmp_path / "c", compress=True, masks=masks)
    # semisparse.json that is not ours / not JSON
    info_path = tmp_path / "c" / SEMISPARSE_JSON
    good = info_path.read_text()
    info_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path / "c")
    info_path.write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(ValueError, match="not a semisparse model description"):
        load_pretrained(tmp_path / "c")
    # the listed modules disagree with the config or with the weights file
    info = json.loads(good)
    info["sparse_modules"]["model.layers.0.self_attn.q_proj"] = info["sparse_modules"].pop(
        "model.layers.0.mlp.up_proj")
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"q_proj' is 32x32 \(out x in\) in the config's model, 64x32 in"):
        load_pretrained(tmp_path / "c")
    info = json.loads(good)
    del info["sparse_modules"]["model.layers.0.mlp.up_proj"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"does not match the model: missing \['model.layers.0.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.layers.0.mlp.up_proj.meta'"):
        load_pretrained(tmp_path / "c")
    info_path.write_text(good)
    # a tensor of the wrong shape
    from semisparse.io import load_tensors, save_tensors

    tensors, header = load_tensors(tmp_path / "c" / COMPRESSED_WEIGHTS)
    tensors["model.norm.weight"] = torch.ones(16)
    save_tensors(tensors, tmp_path / "c" / COMPRESSED_WEIGHTS, header)
    with pytest.raises(ValueError, match="does not fit the model built from config.json"):
        load_pretrained(tmp_path / "c")
    # the weights file missing
    os.remove(tmp_path / "c" / COMPRESSED_WEIGHTS)
    with pytest.raises(FileNotFoundError, match=f"{COMPRESSED_WEIGHTS} is missing"):
        load_pretrained(tmp_path / "c")
