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
        (["prune", "--model", "x", "--method", "obs", "--out", "y"], "--method"),
        (["prune", "--model", "x", "--method", "magnitude", "--pattern", "2-4", "--out", "y"], "2-4"),
        (["prune", "--model", "x", "--method", "wanda", "--out", "y"], "--calib"),
    ],
)
def test_demo_bad_arguments(args, msg, capsys):
    assert main(args) == 2
    assert msg in capsys.readouterr().err
