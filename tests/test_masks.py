"""semisparse.masks: bit-packed mask files and apply_masks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from semisparse import SparseLinear
from semisparse.io import load_tensors, save_tensors
from semisparse.masks import apply_masks, load_masks, save_masks

SHAPES = [(16, 32), (3, 5), (7,), (), (0, 4), (2, 3, 5), (1, 1), (9, 8), (13, 17)]


def random_masks(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.proj": torch.rand(s, generator=g) > 0.5 for i, s in enumerate(SHAPES)}


def test_round_trip_any_shape(tmp_path):
    masks = random_masks()
    meta = {"method": "wanda", "pattern": "2:4", "nsamples": 8, "options": {"damp": 0.01}}
    save_masks(masks, tmp_path / "m.safetensors", metadata=meta)
    got, got_meta = load_masks(tmp_path / "m.safetensors")
    assert got_meta == meta
    assert set(got) == set(masks)
    for k, m in masks.items():
        assert got[k].dtype == torch.bool and got[k].shape == m.shape
        assert torch.equal(got[k], m), k


def test_file_is_bit_packed_with_header(tmp_path):
    masks = {"a": torch.ones(10, 3, dtype=torch.bool), "b": torch.zeros(16, dtype=torch.bool)}
    save_masks(masks, tmp_path / "m.safetensors", pattern="2:4", method="magnitude")
    tensors, header = load_tensors(tmp_path / "m.safetensors")
    assert tensors["a"].dtype == torch.uint8 and tensors["a"].numel() == 4  # ceil(30 / 8)
    assert tensors["a"].tolist() == [255, 255, 255, 0b00111111]  # little-endian bits, zero padding
    assert tensors["b"].numel() == 2
    assert header["format"] == "semisparse.masks" and header["version"] == 1
    assert header["masks"]["a"] == {"shape": [10, 3], "kept": 30}
    assert header["pattern"] == "2:4" and header["method"] == "magnitude"
    _, meta = load_masks(tmp_path / "m.safetensors")
    assert meta == {"pattern": "2:4", "method": "magnitude"}
    assert not [p for p in os.listdir(tmp_path) if p != "m.safetensors"]  # no temp files left


def test_zero_one_masks_and_devices(tmp_path):
    masks = {"x": torch.tensor([[1.0, 0.0, 1.0]]), "y": torch.tensor([0, 1], dtype=torch.int8)}
    save_masks(masks, tmp_path / "m.safetensors")
    got, meta = load_masks(tmp_path / "m.safetensors", device="cpu")
    assert got["x"].tolist() == [[True, False, True]] and got["y"].tolist() == [False, True]
    assert meta == {}


@pytest.mark.parametrize("masks, metadata, exc, match", [
    ({}, None, ValueError, "masks is empty"),
    ([torch.ones(2)], None, TypeError, "must be a dict"),
    ({"a": [1, 0]}, None, TypeError, "must be a tensor"),
    ({"a": torch.tensor([0.0, 2.0])}, None, ValueError, "only 0 and 1"),
    ({"": torch.ones(2, dtype=torch.bool)}, None, TypeError, "non-empty strings"),
    ({"a": torch.ones(2, dtype=torch.bool)}, {"x": object()}, TypeError, "JSON-serialisable"),
    ({"a": torch.ones(2, dtype=torch.bool)}, [1], TypeError, "metadata must be a dict"),
])
def test_save_bad_input(tmp_path, masks, metadata, exc, match):
    with pytest.raises(exc, match=match):
        save_masks(masks, tmp_path / "m.safetensors", metadata=metadata)
    assert not os.listdir(tmp_path)


def test_pattern_argument_conflicts_with_metadata(tmp_path):
    with pytest.raises(ValueError, match="conflicts"):
        save_masks({"a": torch.ones(2, dtype=torch.bool)}, tmp_path / "m", metadata={"pattern": "4:8"}, pattern="2:4")


# ------------------------------------------------------ foreign / corrupted
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_masks(tmp_path / "nope.safetensors")


def test_foreign_files(tmp_path):
    save_file({"w": torch.ones(3)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a semisparse masks file"):
        load_masks(tmp_path / "plain.safetensors")
    lin = SparseLinear.from_dense(nn.Linear(8, 4))
    lin.save(tmp_path / "sl.safetensors")
    with pytest.raises(ValueError, match=r"not a semisparse masks file \(header format='semisparse.SparseLinear'"):
        load_masks(tmp_path / "sl.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_masks(tmp_path / "text.safetensors")


def _rewrite(path, tensors=None, header=None):
    t, h = load_tensors(path)
    save_tensors(tensors if tensors is not None else t, path, header if header is not None else h)


def test_corrupted_files(tmp_path):
    path = tmp_path / "m.safetensors"
    masks = {"a": torch.tensor([True, False, True]), "b": torch.ones(4, 4, dtype=torch.bool)}

    save_masks(masks, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3])  # truncated
    with pytest.raises(ValueError):
        load_masks(path)

    save_masks(masks, path)  # padding bits set
    _rewrite(path, tensors={"a": torch.tensor([0b11111101], dtype=torch.uint8), "b": load_tensors(path)[0]["b"]})
    with pytest.raises(ValueError, match="padding bits"):
        load_masks(path)

    save_masks(masks, path)  # a flipped bit: the kept count disagrees
    t, _ = load_tensors(path)
    t["b"] = t["b"] ^ torch.tensor([1, 0], dtype=torch.uint8)
    _rewrite(path, tensors=t)
    with pytest.raises(ValueError, match="keeps 15 entries, the header says 16"):
        load_masks(path)

    save_masks(masks, path)  # wrong size for the shape
    _, h = load_tensors(path)
    h["masks"]["b"]["shape"] = [5, 4]
    _rewrite(path, header=h)
    with pytest.raises(ValueError, match="expected 3 packed bytes"):
        load_masks(path)

    save_masks(masks, path)  # header names a mask the file lacks
    _, h = load_tensors(path)
    h["masks"]["c"] = {"shape": [1], "kept": 1}
    _rewrite(path, header=h)
    with pytest.raises(ValueError, match=r"in the header only \['c'\]"):
        load_masks(path)

    save_masks(masks, path)  # bad shape entry, newer version
    _, h = load_tensors(path)
    h["masks"]["a"]["shape"] = [-3]
    _rewrite(path, header=h)
    with pytest.raises(ValueError, match="corrupted header entry"):
        load_masks(path)
    _, h = load_tensors(path)
    h["version"] = 99
    _rewrite(path, header=h)
    with pytest.raises(ValueError, match="version 99"):
        load_masks(path)


def test_never_unpickles(tmp_path):
    # a pickle renamed to .safetensors is rejected as "not safetensors", never loaded
    torch.save({"a": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_masks(tmp_path / "m.safetensors")


# --------------------------------------------------------------- apply_masks
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.a = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


def test_apply_masks_zeroes_weights():
    m = Tiny()
    mask = torch.rand(8, 8) > 0.5
    before = m.a.weight.detach().clone()
    apply_masks(m, {"a": mask})
    assert torch.equal(m.a.weight, torch.where(mask, before, torch.zeros(())))
    assert not bool(torch.signbit(m.a.weight[~mask]).any())  # +0.0


def test_apply_masks_errors():
    m = Tiny()
    with pytest.raises(ValueError, match="not a module"):
        apply_masks(m, {"nope": torch.ones(8, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"shape \(8, 4\), the module's weight \(8, 8\)"):
        apply_masks(m, {"a": torch.ones(8, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shared with emb.weight"):
        apply_masks(m, {"head": torch.ones(10, 8, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no weight tensor"):
        apply_masks(nn.Sequential(nn.ReLU()), {"0": torch.ones(1, dtype=torch.bool)})


def test_header_is_json(tmp_path):
    save_masks({"a": torch.ones(3, dtype=torch.bool)}, tmp_path / "m.safetensors", metadata={"seed": 1})
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["semisparse"])
    assert header["metadata"] == {"seed": 1} and "pattern" not in header
