"""``semisparse prune --method dsformer | lowrank`` and save/load of factorised models
(DenseSparseLinear in every state, LowRankLinear) through semisparse.hf."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import semisparse  # noqa: E402
from semisparse import dsformer  # noqa: E402
from semisparse.cli import main  # noqa: E402
from semisparse.dsformer import DenseSparseLinear, LowRankLinear  # noqa: E402
from semisparse.hf import COMPRESSED_WEIGHTS, SEMISPARSE_JSON, load_pretrained, save_pretrained  # noqa: E402
from semisparse.io import load_tensors, save_tensors  # noqa: E402
from conftest import tiny_llama_dir  # noqa: E402

NSAMPLES, SEQLEN = "8", "16"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, with a word-level tokenizer, and texts."""
    return tiny_llama_dir(tmp_path_factory, 200, 60)


def _dense(llama_dir):
    return load_pretrained(llama_dir / "model")


IDS = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def prune(llama_dir, out, *args):
    return main(["prune", "--model", str(llama_dir / "model"), "--out", str(out), *args])


def train_args(llama_dir, *extra):
    return ["--calib", str(llama_dir / "train.txt"), "--nsamples", NSAMPLES, "--seqlen", SEQLEN,
            "--batch-size", "4", *extra]


def info_of(folder):
    return json.loads((folder / SEMISPARSE_JSON).read_text())


def proj_modules(model):
    return {n: m for n, m in model.named_modules() if n.endswith("proj")}


# ------------------------------------------------------------------ CLI runs
def test_factorise_only_writes_a_loadable_folder(llama_dir, tmp_path, capsys):
    out = tmp_path / "ds"
    assert prune(llama_dir, out, "--method", "dsformer", "--report", str(tmp_path / "r.json")) == 0
    printed = capsys.readouterr().out
    assert "dense_sparse (2:4, init=svd)" in printed and "total (replaced layers)" in printed
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    # the same factorisation in memory
    ref = _dense(llama_dir)
    report = dsformer.factorize(ref, compression=2.0)
    dsformer.export(ref)
    loaded = load_pretrained(out)
    mods = proj_modules(loaded)
    assert len(mods) == 14 and all(isinstance(m, DenseSparseLinear) and m.compressed for m in mods.values())
    assert type(loaded.lm_head) is torch.nn.Linear  # the head stays dense
    assert torch.equal(logits(loaded), logits(ref))
    info = info_of(out)
    assert info["version"] == 2 and info["method"] == "dsformer" and info["pattern"] == "2:4"
    spec = info["factorized_modules"]["model.layers.0.mlp.down_proj"]
    assert spec == {"class": "DenseSparseLinear", "in_features": 64, "out_features": 32, "bias": False,
                    "k": report.layers["model.layers.0.mlp.down_proj"].k, "blocks": 1, "pattern": "2:4",
                    "state": "compressed",
                    "mask_frozen": False, "source": "Linear"}
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["compression"] == pytest.approx(report.compression) and len(rep["layers"]) == 14
    assert (tmp_path / "r.txt").read_text().strip() == report.table()
    # semisparse eval reads the folder
    assert main(["eval", "--model", str(out), "--data", str(llama_dir / "test.txt"), "--seqlen", "32"]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity:")[1].split()[0])
    ids = semisparse.eval_tokens((llama_dir / "test.txt").read_text(), transformers.AutoTokenizer.from_pretrained(out))
    assert ppl == pytest.approx(semisparse.perplexity(loaded, ids, seqlen=32, progress=False), rel=1e-4)


def test_training_changes_the_loss(llama_dir, tmp_path):
    out = tmp_path / "stf"
    args = train_args(llama_dir, "--method", "dsformer", "--steps", "4", "--distill", "0.5", "--lr", "1e-3",
                      "--checkpoint-dir", str(tmp_path / "ckpt"), "--report", str(tmp_path / "r.json"))
    assert prune(llama_dir, out, *args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())["training"]
    assert rep["steps"] == 4 and rep["first_loss"] != rep["last_loss"]
    assert (tmp_path / "ckpt" / "metrics.jsonl").is_file()
    info = info_of(out)
    assert info["metadata"]["options"]["freeze_mask_steps"] == 0 and info["metadata"]["options"]["distill"] == 0.5
    loaded = load_pretrained(out)
    assert all(isinstance(m, DenseSparseLinear) and m.compressed for m in proj_modules(loaded).values())
    ref = _dense(llama_dir)
    dsformer.factorize(ref, compression=2.0)
    dsformer.export(ref)
    assert not torch.equal(logits(loaded), logits(ref))  # trained
    assert torch.isfinite(logits(loaded)).all()


def test_lowrank_method(llama_dir, tmp_path):
    out = tmp_path / "lr"
    assert prune(llama_dir, out, *train_args(llama_dir, "--method", "lowrank", "--compression", "3",
                                             "--steps", "2")) == 0
    loaded = load_pretrained(out)
    mods = proj_modules(loaded)
    assert all(isinstance(m, LowRankLinear) for m in mods.values())
    spec = info_of(out)["factorized_modules"]["model.layers.0.mlp.up_proj"]
    assert spec == {"class": "LowRankLinear", "in_features": 32, "out_features": 64, "bias": False,
                    "rank": mods["model.layers.0.mlp.up_proj"].rank, "source": "Linear"}
    assert info_of(out)["pattern"] is None
    assert mods["model.layers.0.mlp.up_proj"].rank == dsformer.lowrank_rank(64, 32, 3.0)


def test_data_aware_init(llama_dir, tmp_path):
    out = tmp_path / "data"
    assert prune(llama_dir, out, *train_args(llama_dir, "--method", "dsformer", "--init", "data", "--k", "8",
                                             "--targets", "*mlp*")) == 0
    assert info_of(out)["metadata"]["init"] == "data"
    # the same in memory: Grams of the same calibration windows
    ref = _dense(llama_dir)
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir / "model")
    data = semisparse.calibration_samples((llama_dir / "train.txt").read_text(), tok, int(NSAMPLES), int(SEQLEN), 0)
    dsformer.factorize(ref, k=8, init="data", targets=["*mlp*"], calib=[data[:4], data[4:]])
    dsformer.export(ref)
    loaded = load_pretrained(out)
    mods = proj_modules(loaded)
    assert {n for n, m in mods.items() if isinstance(m, DenseSparseLinear)} == {n for n in mods if ".mlp." in n}
    assert all(m.k == 8 for m in mods.values() if isinstance(m, DenseSparseLinear))
    assert torch.equal(logits(loaded), logits(ref))


def test_pattern_that_cannot_be_compressed(llama_dir, tmp_path):
    out = tmp_path / "p14"
    assert prune(llama_dir, out, *train_args(llama_dir, "--method", "dsformer", "--pattern", "1:4", "--steps", "1")) == 0
    spec = info_of(out)["factorized_modules"]["model.layers.1.mlp.gate_proj"]
    assert (spec["pattern"], spec["state"], spec["mask_frozen"]) == ("1:4", "training", True)
    loaded = load_pretrained(out)
    assert all(m.mask_frozen and not m.compressed for m in proj_modules(loaded).values())


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--method", "dsformer", "--k", "8", "--compression", "2"], "--k or --compression, not both"),
        (["--method", "dsformer", "--init", "data"], "--init data needs --calib"),
        (["--method", "dsformer", "--init", "pca"], "--init must be svd or data"),
        (["--method", "dsformer", "--pattern", "unstructured:0.5"], "--pattern must be N:M"),
        (["--method", "dsformer", "--pattern", "4:2"], "--pattern must be N:M"),
        (["--method", "dsformer", "--k", "10"], "--k must be a positive multiple of M=4"),
        (["--method", "dsformer", "--compression", "1"], "--compression must be a number > 1"),
        (["--method", "dsformer", "--steps", "3"], "--steps 3 needs --calib"),
        (["--method", "dsformer", "--steps", "-1"], "--steps must be >= 0"),
        (["--method", "dsformer", "--distill", "0.5"], "--distill needs training"),
        (["--method", "dsformer", "--freeze-mask-steps", "2"], "--freeze-mask-steps needs training"),
        (["--method", "dsformer", "--steps", "3", "--calib", "x.txt", "--distill", "1.5"], "--distill"),
        (["--method", "dsformer", "--steps", "3", "--calib", "x.txt", "--freeze-mask-steps", "5"],
         "--freeze-mask-steps must be in [0, --steps 3]"),
        (["--method", "dsformer", "--steps", "3", "--calib", "x.txt", "--lr", "-1"], "lr"),
        (["--method", "dsformer", "--masks-out", "m.safetensors"], "--masks-out does not apply"),
        (["--method", "lowrank", "--k", "8"], "--k is for --method dsformer"),
        (["--method", "lowrank", "--pattern", "2:4"], "--pattern does not apply to --method lowrank"),
        (["--method", "lowrank", "--init", "data", "--calib", "x.txt"], "--init data is for dsformer"),
        (["--method", "lowrank", "--steps", "2", "--calib", "x.txt", "--freeze-mask-steps", "1"],
         "--freeze-mask-steps is for --method dsformer"),
        (["--method", "magnitude", "--k", "8"], "are for --method dsformer / lowrank"),
    ],
)
def test_bad_flags(llama_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    assert prune(llama_dir, out, *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("semisparse prune: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_runs(llama_dir, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert prune(llama_dir, tmp_path / "exists", "--method", "dsformer") == 2
    assert "exists" in capsys.readouterr().err
    # more batches than calibration windows
    assert prune(llama_dir, tmp_path / "o", *train_args(llama_dir, "--method", "dsformer", "--steps", "1",
                                                        "--batch-size", "16")) == 2
    assert "smaller than --batch-size" in capsys.readouterr().err
    # a k too large for every layer
    assert prune(llama_dir, tmp_path / "o", "--method", "dsformer", "--k", "64") == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------ save / load
def _factorised(llama_dir, state: str):
    model = _dense(llama_dir)
    if state == "lowrank":
        dsformer.lowrank(model, compression=2.0)
        return model
    pattern = "1:4" if state == "frozen_1:4" else "2:4"
    dsformer.factorize(model, compression=2.0, pattern=pattern, targets=["*mlp*"])
    dsformer.lowrank(model, compression=2.0, targets=["*self_attn*"])  # a mixed model
    if state == "stf":
        # STF-trained latent: some pruned entries of S_latent are non-zero
        with torch.no_grad():
            for m in dsformer.dense_sparse_layers(model).values():
                m.S_latent.add_(0.01 * torch.randn_like(m.S_latent))
    elif state.startswith("frozen"):
        dsformer.freeze_masks(model)
    elif state == "compressed":
        dsformer.export(model)
    return model


@pytest.mark.parametrize("state", ["stf", "frozen", "frozen_1:4", "compressed", "lowrank"])
@pytest.mark.parametrize("compress", [False, True])
def test_save_load_round_trip(llama_dir, tmp_path, state, compress):
    model = _factorised(llama_dir, state).eval()
    save_pretrained(model, tmp_path / "m", compress=compress, metadata={"method": "dsformer"})
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "generation_config.json", COMPRESSED_WEIGHTS,
                                                  SEMISPARSE_JSON]
    loaded = load_pretrained(tmp_path / "m")
    assert torch.equal(logits(loaded), logits(model))
    before = dict(model.named_modules())
    n = 0
    for name, mod in loaded.named_modules():
        ref = before[name]
        assert type(mod) is type(ref), name
        if isinstance(mod, DenseSparseLinear):
            n += 1
            assert (mod.k, mod.pattern, mod.compressed, mod.mask_frozen) == (
                ref.k, ref.pattern, ref.compressed, ref.mask_frozen)
            assert torch.equal(mod.current_mask(), ref.current_mask())
            if not mod.compressed:
                assert torch.equal(mod.S_latent, ref.S_latent)  # the latent, pruned entries included
        elif isinstance(mod, LowRankLinear):
            n += 1
            assert mod.rank == ref.rank and torch.equal(mod.U, ref.U) and torch.equal(mod.V, ref.V)
    assert n == 14
    assert not loaded.training


def test_training_state_trains_on_after_loading(llama_dir, tmp_path):
    model = _factorised(llama_dir, "frozen")
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").train()
    loss = loaded(IDS, labels=IDS).loss
    loss.backward()
    mod = loaded.model.layers[0].mlp.up_proj
    assert mod.S_latent.grad is not None and not mod.S_latent.grad[~mod.mask].any()  # pruned entries stay out


def test_broken_factorised_folders(llama_dir, tmp_path):
    model = _factorised(llama_dir, "compressed")
    save_pretrained(model, tmp_path / "c")
    info_path = tmp_path / "c" / SEMISPARSE_JSON
    good = json.loads(info_path.read_text())
    name = "model.layers.0.mlp.up_proj"

    def broken(change, match, exc=ValueError):
        info = json.loads(json.dumps(good))
        change(info)
        info_path.write_text(json.dumps(info))
        with pytest.raises(exc, match=match):
            load_pretrained(tmp_path / "c")

    def setter(key, value, module=name):
        return lambda info: info["factorized_modules"][module].__setitem__(key, value)

    broken(setter("state", "training"), r"says 'model.layers.0.mlp.up_proj' is a DenseSparseLinear state 'training', "
                                        r"stored as \['D', 'S_latent'\], but model.sparse24.safetensors holds "
                                        r"\['D', 'meta', 'values'\]")
    broken(setter("state", "sparse"), r"'state' must be one of 'compressed', 'training', got 'sparse'")
    broken(setter("class", "SVDLinear"), r"'class' must be 'DenseSparseLinear' or 'LowRankLinear'")
    broken(setter("pattern", "1:4"), r"state 'compressed' needs pattern 2:4")
    broken(setter("k", 10), r"k=10 is not a multiple of M=4")
    broken(setter("k", "16"), r"'k' must be a positive integer, got '16'")
    broken(setter("out_features", 32), r"up_proj' is 64x32 \(out x in\) in the config's model, 32x32 in")
    broken(setter("k", 12), r"does not fit the model built from config.json")
    broken(setter("rank", 0, "model.layers.0.self_attn.q_proj"), r"rank must be a positive integer")
    broken(lambda info: info["factorized_modules"].__setitem__("model.norm", good["factorized_modules"][name]),
           r"'model.norm' is a LlamaRMSNorm in the config's model; only nn.Linear layers can be DenseSparseLinear")
    broken(lambda info: info["factorized_modules"].__setitem__("model.nothing", good["factorized_modules"][name]),
           r"lists 'model.nothing', which the model built from config.json lacks")
    broken(lambda info: info["factorized_modules"].pop(name),
           r"does not match the model: missing \['model.layers.0.mlp.up_proj.weight'\], unexpected "
           r"\['model.layers.0.mlp.up_proj.D'")
    broken(lambda info: info.__setitem__("version", 3), "version 3; this semisparse reads <= 2")
    info_path.write_text(json.dumps(good))
    # a tensor missing from the weights file
    tensors, header = load_tensors(tmp_path / "c" / COMPRESSED_WEIGHTS)
    del tensors[f"{name}.meta"]
    save_tensors(tensors, tmp_path / "c" / COMPRESSED_WEIGHTS, header)
    with pytest.raises(ValueError, match=r"holds \['D', 'values'\] for it"):
        load_pretrained(tmp_path / "c")
    # meta of a compressed module that is not valid 2:4 metadata
    tensors[f"{name}.meta"] = torch.full((64, 2), 0xFF, dtype=torch.uint8)
    save_tensors(tensors, tmp_path / "c" / COMPRESSED_WEIGHTS, header)
    with pytest.raises(ValueError, match="meta"):
        load_pretrained(tmp_path / "c")


def test_frozen_mask_that_is_not_nm(llama_dir, tmp_path):
    model = _factorised(llama_dir, "frozen")
    save_pretrained(model, tmp_path / "f")
    tensors, header = load_tensors(tmp_path / "f" / COMPRESSED_WEIGHTS)
    tensors["model.layers.0.mlp.up_proj.mask"] = torch.ones_like(tensors["model.layers.0.mlp.up_proj.mask"])
    save_tensors(tensors, tmp_path / "f" / COMPRESSED_WEIGHTS, header)
    with pytest.raises(ValueError, match=r"up_proj.mask\): not 2:4"):
        load_pretrained(tmp_path / "f")


@pytest.mark.parametrize("compress", [False, True])
def test_factorised_with_sparse_linear(llama_dir, tmp_path, compress):
    """SparseLinear layers beside factorised ones: compressed with compress=True, stored as
    their dense weight (plain nn.Linear on load) with compress=False."""
    from semisparse import SparseLinear, nm_mask

    model = _dense(llama_dir)
    dsformer.factorize(model, compression=2.0, targets=["*mlp*"])
    dsformer.export(model)
    for name in ("q_proj", "o_proj"):
        attn = model.model.layers[0].self_attn
        lin = getattr(attn, name)
        setattr(attn, name, SparseLinear.from_dense(lin, nm_mask(lin.weight.detach().abs(), 2, 4)))
    save_pretrained(model, tmp_path / "m", compress=compress)
    info = info_of(tmp_path / "m")
    assert sorted(info["sparse_modules"]) == ([f"model.layers.0.self_attn.{n}" for n in ("o_proj", "q_proj")]
                                              if compress else [])
    assert len(info["factorized_modules"]) == 6
    loaded = load_pretrained(tmp_path / "m")
    kind = SparseLinear if compress else torch.nn.Linear
    assert type(loaded.model.layers[0].self_attn.q_proj) is kind
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
    if compress:
        assert torch.equal(logits(loaded), logits(model))


# ------------------------------------------------------- per-row-block bases
def _blocked(llama_dir, state: str, blocks: int):
    model = _dense(llama_dir)
    dsformer.factorize(model, k=4, blocks=blocks, iters=1)  # with 4 blocks k/v_proj (16 rows) do not compress
    if state == "stf":
        with torch.no_grad():
            for m in dsformer.dense_sparse_layers(model).values():
                m.S_latent.add_(0.01 * torch.randn_like(m.S_latent))
    elif state == "frozen":
        dsformer.freeze_masks(model)
    elif state == "compressed":
        dsformer.export(model)
    return model


@pytest.mark.parametrize("blocks", [2, 4])
@pytest.mark.parametrize("state", ["stf", "frozen", "compressed"])
def test_blocks_save_load_round_trip(llama_dir, tmp_path, state, blocks):
    model = _blocked(llama_dir, state, blocks).eval()
    layers = dsformer.dense_sparse_layers(model)
    assert len(layers) == (14 if blocks == 2 else 10) and all(m.blocks == blocks for m in layers.values())
    save_pretrained(model, tmp_path / "m")
    specs = info_of(tmp_path / "m")["factorized_modules"]
    assert {n: s["blocks"] for n, s in specs.items()} == {n: blocks for n in layers}
    loaded = load_pretrained(tmp_path / "m")
    assert torch.equal(logits(loaded), logits(model))
    got = dsformer.dense_sparse_layers(loaded)
    assert got.keys() == layers.keys()
    for name, mod in got.items():
        ref = layers[name]
        assert (mod.blocks, mod.k, mod.compressed, mod.mask_frozen) == (blocks, 4, ref.compressed, ref.mask_frozen)
        assert torch.equal(mod.D, ref.D) and mod.D.shape == (blocks * 4, ref.in_features)
        assert torch.equal(mod.current_mask(), ref.current_mask())
        if not mod.compressed:
            assert torch.equal(mod.S_latent, ref.S_latent)


def test_blocks_missing_from_json_reads_as_1_and_broken_blocks(llama_dir, tmp_path):
    model = _blocked(llama_dir, "compressed", 1)
    save_pretrained(model, tmp_path / "one")
    info_path = tmp_path / "one" / SEMISPARSE_JSON
    info = info_of(tmp_path / "one")
    for spec in info["factorized_modules"].values():
        assert spec.pop("blocks") == 1  # as written before row blocks existed
    info_path.write_text(json.dumps(info))
    loaded = load_pretrained(tmp_path / "one")
    assert all(m.blocks == 1 for m in dsformer.dense_sparse_layers(loaded).values())
    assert torch.equal(logits(loaded), logits(model))

    name = "model.layers.0.mlp.up_proj"  # 64 x 32

    def broken(value, match):
        bad = json.loads(json.dumps(info))
        bad["factorized_modules"][name]["blocks"] = value
        info_path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            load_pretrained(tmp_path / "one")

    broken(3, r"factorized_modules\['model.layers.0.mlp.up_proj'\]: DenseSparseLinear: blocks=3 does not divide "
              r"out_features=64")
    broken(0, r"blocks must be a positive integer .* got 0")
    broken("2", r"'blocks' must be a positive integer, got '2'")
    broken(True, r"'blocks' must be a positive integer, got True")
    broken(2, r"does not fit the model built from config.json")  # D stored [k, in], expected [2k, in]


def test_cli_blocks(llama_dir, tmp_path, capsys):
    out = tmp_path / "b"
    assert prune(llama_dir, out, "--method", "dsformer", "--blocks", "2", "--compression", "1.5",
                 "--report", str(tmp_path / "r.json")) == 0
    printed = capsys.readouterr().out
    assert "2x" in printed and "B row blocks" in printed
    ref = _dense(llama_dir)
    report = dsformer.factorize(ref, compression=1.5, blocks=2)
    dsformer.export(ref)
    loaded = load_pretrained(out)
    mods = proj_modules(loaded)
    assert len(mods) == 14 and all(isinstance(m, DenseSparseLinear) and m.compressed and m.blocks == 2
                                   for m in mods.values())
    assert torch.equal(logits(loaded), logits(ref))
    info = info_of(out)
    assert info["metadata"]["blocks"] == 2
    assert all(s["blocks"] == 2 for s in info["factorized_modules"].values())
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["blocks"] == 2 and all(layer["blocks"] == 2 for layer in rep["layers"])
    assert rep["params_after"] == report.params_after
    # one basis per attention head: q/o 4 heads, k/v 2 key-value heads, the MLP one basis
    out = tmp_path / "h"
    assert prune(llama_dir, out, "--method", "dsformer", "--blocks", "heads", "--compression", "1.5") == 0
    got = {n.split(".")[-1]: m.blocks for n, m in proj_modules(load_pretrained(out)).items()}
    assert got == {"q_proj": 4, "k_proj": 2, "v_proj": 2, "o_proj": 4, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--method", "dsformer", "--blocks", "0"], "--blocks must be a positive integer (row blocks per layer"),
        (["--method", "dsformer", "--blocks", "two"], "--blocks must be a positive integer"),
        (["--method", "dsformer", "--blocks", "-2"], "--blocks must be a positive integer"),
        (["--method", "lowrank", "--blocks", "2"], "--blocks is for --method dsformer"),
        (["--method", "magnitude", "--blocks", "2"], "are for --method dsformer / lowrank"),
    ],
)
def test_cli_bad_blocks(llama_dir, tmp_path, capsys, args, msg):
    out = tmp_path / "o"
    assert prune(llama_dir, out, *args) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("semisparse prune: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_blocks_dividing_no_layer(llama_dir, tmp_path, capsys):
    assert prune(llama_dir, tmp_path / "o", "--method", "dsformer", "--blocks", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("semisparse prune: error: factorize: no selected layer can be factorised")
    assert "'model.layers.0.mlp.up_proj': 'blocks=3 does not divide out_features=64'" in err
    assert not (tmp_path / "o").exists()
