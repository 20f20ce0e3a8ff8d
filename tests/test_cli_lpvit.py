"""``semisparse prune --method lpvit``: LPViT block pruning of a tiny ViT end to end (digits and a
folder of PNGs as calibration images), the calibration image loader, and the bad inputs."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from semisparse.cli import main
from semisparse.data import find_images, load_calibration_images
from semisparse.masks import load_masks

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

BLOCK = 16


def _vit(path, image_size=16, processor=False):
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=4, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128, num_labels=10)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(path)
    if processor:
        transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny ViT (16x16 images) without an image processor."""
    return _vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def vit_proc_dir(tmp_path_factory):
    """A tiny ViT (32x32 images) with a ViTImageProcessor."""
    return _vit(tmp_path_factory.mktemp("vitp"), image_size=32, processor=True)


def _write_images(folder, n, seed=0, sizes=((20, 24), (32, 32), (9, 13))):
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        mode = "RGB" if i % 3 else "L"
        arr = rng.integers(0, 256, size=(h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        Image.fromarray(arr, mode=mode).save(sub / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return _write_images(tmp_path_factory.mktemp("images"), 10)


def _prune(model_dir, out, calib, *extra):
    return main(["prune", "--method", "lpvit", "--model", str(model_dir), "--calib", str(calib), "--out", str(out),
                 "--block", f"{BLOCK}x{BLOCK}", "--flops", "0.5", "--nsamples", "8", "--batch-size", "4", *extra])


def _check_pruned(out, report_json, masks_file=None, target=0.5):
    rep = json.loads(report_json.read_text())
    assert rep["method"] == "lpvit" and rep["block"] == [BLOCK, BLOCK] and rep["flops_target"] == target
    layers = {r["name"]: r for r in rep["layers"]}
    assert "classifier" not in layers and len(layers) == 2 * 6 + 1  # q k v o fc1 fc2 per layer + patch conv
    # kept FLOPs, from the blocks actually pruned, near the target
    total = sum(r["flops"] for r in layers.values())
    kept = sum(r["flops"] * (1 - r["sparsity"]) for r in layers.values()) / total
    assert abs(kept - target) < 0.05, kept
    assert abs(rep["kept_flops"] - target) < 0.05
    assert 0 < sum(r["pruned_blocks"] for r in layers.values())

    # the folder is a plain Hugging Face folder: transformers loads it, semisparse too
    hf = transformers.ViTForImageClassification.from_pretrained(out, local_files_only=True).eval()
    from semisparse.hf import load_pretrained

    ours = load_pretrained(out)
    x = torch.randn(2, 3, hf.config.image_size, hf.config.image_size)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x).logits)
    masks = load_masks(masks_file)[0] if masks_file else None
    for name, r in layers.items():
        w = hf.get_submodule(name).weight.detach().reshape(r["shape"][0], -1)
        blocks = w.reshape(w.shape[0] // BLOCK, BLOCK, w.shape[1] // BLOCK, BLOCK).transpose(1, 2)
        zero = (blocks == 0).all(-1).all(-1)
        assert int(zero.sum()) == r["pruned_blocks"], name  # whole blocks, and only those
        assert r["blocks"] == zero.numel()
        if masks is not None:
            assert masks[name].dtype == torch.bool and torch.equal(masks[name], ~zero), name
    if masks is not None:
        assert set(masks) == set(layers)
    # the run is recorded in semisparse.json
    info = json.loads((out / "semisparse.json").read_text())
    assert info["method"] == "lpvit" and info["metadata"]["block"] == [BLOCK, BLOCK]
    return rep


def test_prune_lpvit_digits(vit_dir, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out, rep, mk = tmp_path / "out", tmp_path / "rep.json", tmp_path / "masks.safetensors"
    assert _prune(vit_dir, out, "digits", "--exclude", "classifier", "--report", str(rep), "--masks-out", str(mk)) == 0
    printed = capsys.readouterr().out
    assert "LPViT: block 16x16" in printed
    r = _check_pruned(out, rep, mk)
    assert all(layer["name"] in printed for layer in r["layers"])  # the table
    assert (tmp_path / "rep.txt").read_text().startswith("LPViT: block 16x16")
    _, meta = load_masks(mk)
    assert meta["method"] == "lpvit" and meta["block"] == [BLOCK, BLOCK] and meta["flops"] == 0.5
    assert sorted(meta["layers"]) == meta["layers"] and "classifier" not in meta["layers"]
    assert not (out / "preprocessor_config.json").exists()
    # --out exists: refused without --overwrite, replaced with it
    assert _prune(vit_dir, out, "digits", "--exclude", "classifier") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _prune(vit_dir, out, "digits", "--exclude", "classifier", "--allocation", "uniform",
                  "--overwrite", "--report", str(rep)) == 0
    rep2 = _check_pruned(out, rep)
    assert len({r["sparsity"] for r in rep2["layers"]}) == 1  # uniform: the same sparsity everywhere


def test_prune_lpvit_image_folder_with_processor(vit_proc_dir, image_folder, tmp_path, capsys):
    out, rep = tmp_path / "out", tmp_path / "report"
    args = ["--exclude", "classifier", "--report", str(rep), "--power", "analytical"]
    plot = tmp_path / "plots"
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(plot)]
    except ImportError:
        plot = None
    assert _prune(vit_proc_dir, out, image_folder, *args) == 0
    assert "images 32x32x3" in capsys.readouterr().out
    _check_pruned(out, rep)
    assert (tmp_path / "report.txt").is_file()
    assert (out / "preprocessor_config.json").read_bytes() == (vit_proc_dir / "preprocessor_config.json").read_bytes()
    if plot is not None:
        assert (plot / "lpvit_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ calibration images
def test_calibration_images_folder(vit_dir, vit_proc_dir, image_folder):
    assert len(find_images(image_folder)) == 10
    a = load_calibration_images(image_folder, model_dir=vit_dir, nsamples=7, batch_size=3, seed=1)
    assert [tuple(x.shape) for x in a] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    assert all(x.dtype == torch.float32 for x in a)
    lo, hi = min(float(x.min()) for x in a), max(float(x.max()) for x in a)
    assert -1.0 <= lo < -0.5 and 0.5 < hi <= 1.0  # mean/std 0.5: [0, 1] -> [-1, 1]
    b = load_calibration_images(image_folder, model_dir=vit_dir, nsamples=7, batch_size=3, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded
    c = load_calibration_images(image_folder, model_dir=vit_dir, nsamples=7, batch_size=7, seed=2)
    assert not torch.equal(torch.cat(a), c[0])
    p = load_calibration_images(image_folder, model_dir=vit_proc_dir, nsamples=4, batch_size=4)
    assert tuple(p[0].shape) == (4, 3, 32, 32)
    g = load_calibration_images(image_folder, nsamples=2, image_size=(8, 12), num_channels=1, mean=0.0, std=1.0)
    assert tuple(g[0].shape) == (2, 1, 8, 12) and float(g[0].min()) >= 0 and float(g[0].max()) <= 1


def test_calibration_images_digits(vit_dir):
    pytest.importorskip("sklearn")
    d = load_calibration_images("digits", model_dir=vit_dir, nsamples=5, batch_size=4)
    assert [tuple(x.shape) for x in d] == [(4, 3, 16, 16), (1, 3, 16, 16)]
    x = d[0]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # gray replicated
    with pytest.raises(ValueError, match="1797"):
        load_calibration_images("digits", model_dir=vit_dir, nsamples=5000)


def test_calibration_images_errors(vit_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        load_calibration_images(tmp_path / "nope", model_dir=vit_dir)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files"):
        load_calibration_images(tmp_path / "empty", model_dir=vit_dir)
    _write_images(tmp_path / "three", 3)
    with pytest.raises(ValueError, match="only 3 image"):
        load_calibration_images(tmp_path / "three", model_dir=vit_dir, nsamples=8)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        load_calibration_images(tmp_path / "bad", model_dir=vit_dir, nsamples=1)
    with pytest.raises(ValueError, match="image size is unknown"):
        load_calibration_images(tmp_path / "three", nsamples=1)
    with pytest.raises(ValueError, match="nsamples"):
        load_calibration_images(tmp_path / "three", model_dir=vit_dir, nsamples=0)


# ------------------------------------------------------------------ bad inputs
def test_prune_lpvit_bad_inputs(vit_dir, tmp_path, capsys):
    _write_images(tmp_path / "three", 3)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"

    def err(*args, calib="digits"):
        rc = main(["prune", "--method", "lpvit", "--model", str(vit_dir), "--calib", str(calib),
                   "--out", str(out), "--nsamples", "8", *args])
        e = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars, if any
        assert rc == 2, e
        assert e.startswith("semisparse prune: error: "), e
        return e

    assert "(0, 1]" in err("--flops", "0", "--block", "16x16")
    assert "(0, 1]" in err("--flops", "1.5", "--block", "16x16")
    assert "--block" in err("--block", "3x")
    assert "--block" in err("--block", "0x16")
    assert "--power" in err("--power", "fast")
    assert "--allocation" in err("--allocation", "greedy")
    assert "--compress" in err("--compress")
    assert "--calib" in err(calib="")
    e = err("--block", "16x16", calib=tmp_path / "nope")
    assert "nope" in e and "digits" in e
    assert "no image files" in err("--block", "16x16", calib=tmp_path / "empty")
    assert "only 3 image" in err("--block", "16x16", calib=tmp_path / "three")
    if importlib.util.find_spec("sklearn") is not None:
        e = err("--block", "16x16")  # the classifier head (10x64) does not divide
        assert "does not divide" in e and "--exclude classifier" in e
        e = err("--block", "32x32", "--exclude", "classifier")  # nor does the patch conv (64x48)
        assert "--exclude classifier vit.embeddings.patch_embeddings.projection" in e
        assert "nothing to prune" in err("--block", "16x16", "--targets", "no_such_layer")
    assert not out.exists()  # nothing written on failure
    assert main(["prune", "--method", "lpvitt", "--model", str(vit_dir), "--calib", "digits", "--out", str(out)]) == 2
    assert "--method" in capsys.readouterr().err
