"""The ``semisparse`` command: ``info`` (JSON) and the built-in ``demo`` on a tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

import semisparse
from semisparse.cli import main
from semisparse.demo.speed import run_demo
from conftest import tiny_llama_dir


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "semisparse", *args], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def test_info_json():
    r = _cli("info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["semisparse"] == semisparse.__version__
    assert set(d["kernels"]) == {"sparse24_compress", "sparse24_decompress", "sparse24_linear"}
    assert d["cpu_simd"] == semisparse.cpu_isa()
    if not d["cuda_library"]["loaded"]:
        assert d["cuda_library"]["reason"]  # absent CUDA kernels come with a reason


def test_demo_quick_end_to_end():
    r = _cli("demo", "--quick", "--seed", "1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for word in ("dense", "magnitude", "wanda", "sparsegpt", "speedup", "perplexity"):
        assert word in out, (word, out)


def test_bench_model_speed_demo():
    res = run_demo(d=32, f=64, layers=1, heads=2, tokens=(1, 3), reps=1, out=lambda *_: None)
    assert res["swapped"] == 7
    assert set(res["dense_ms"]) == set(res["sparse_ms"]) == {1, 3}
    assert all(v > 0 for v in res["sparse_ms"].values())
    # values + metadata: 0.5 + 1/32 of the fp32 weight bytes (norm weights stay)
    assert res["sparse_bytes"] < 0.6 * res["dense_bytes"]
    assert all(0.0 < c <= 1.0 + 1e-6 for c in res["cosine"].values())


@pytest.mark.parametrize(
    "args, msg",
    [
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--device", "cuda:7"], "--device"),
        (["bench", "--device", "cuda"], "--device"),
        (["prune", "--model", "x", "--method", "obs", "--out", "y"], "--method"),
        (["prune", "--model", "x", "--method", "magnitude", "--pattern", "2-4", "--out", "y"], "2-4"),
        (["prune", "--model", "x", "--method", "wanda", "--out", "y"], "--calib"),
    ],
)
def test_demo_bad_arguments(args, msg, capsys):
    assert main(args) == 2
    assert msg in capsys.readouterr().err


# ------------------------------------------------------------- prune / eval end to end
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, with a word-level tokenizer, and a text."""
    return tiny_llama_dir(tmp_path_factory, 400, 100)


@pytest.mark.parametrize("method, compress", [("magnitude", False), ("wanda", True), ("sparsegpt", True)])
def test_prune_then_eval(llama_dir, tmp_path, method, compress):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(llama_dir / "model"), "--method", method, "--pattern", "2:4",
            "--calib", str(llama_dir / "train.txt"), "--nsamples", "4", "--seqlen", "16", "--out", str(out),
            "--masks-out", str(tmp_path / "masks.safetensors")]
    if compress:
        args.append("--compress")
    r = _cli(*args)
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").is_file() and (out / "semisparse.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left behind
    model = semisparse.load_pretrained(out)
    masks, meta = semisparse.load_masks(tmp_path / "masks.safetensors")
    assert meta["method"] == method and len(masks) == 14  # 7 Linear layers x 2 blocks
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.endswith("proj")}
    assert kinds == ({"SparseLinear"} if compress else {"Linear"})
    r = _cli("eval", "--model", str(out), "--data", str(llama_dir / "test.txt"), "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    ppl = float(r.stdout.split("perplexity:")[1].split()[0])
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = semisparse.eval_tokens((llama_dir / "test.txt").read_text(), tok)
    assert ppl == pytest.approx(semisparse.perplexity(model, ids, seqlen=32, progress=False), rel=1e-4)


def test_prune_bad_inputs(llama_dir, tmp_path):
    model = str(llama_dir / "model")
    r = _cli("prune", "--model", str(tmp_path), "--method", "magnitude", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "error" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("prune", "--model", model, "--method", "wanda", "--calib", str(llama_dir / "test.txt"),
             "--nsamples", "1000", "--seqlen", "512", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "tokens" in r.stderr and not (tmp_path / "o").exists()
    (tmp_path / "exists").mkdir()
    r = _cli("prune", "--model", model, "--method", "magnitude", "--out", str(tmp_path / "exists"))
    assert r.returncode == 2 and "exists" in r.stderr
