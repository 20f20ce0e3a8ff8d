"""lpvit.prune end to end on vision transformers built from configs (Hugging Face ViT, DeiT
with its distillation head, Swin; timm's ViT and Swin when timm is importable) and on a
plain Conv2d/Linear net: the FLOPs target, whole zeroed blocks, the swap to
BlockSparseLinear (same logits), safetensors round trips, torch.compile, and the errors."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from torch import nn

import semisparse
from semisparse import lpvit

BLOCK = (16, 16)


# ------------------------------------------------------------------ helpers
def _hf(arch: str, seed: int = 0):
    """(model in eval mode, head layers to exclude, image side) for a tiny config whose
    Linear layers (and the patch Conv2d, viewed as [out, in*kh*kw]) all divide 16x16."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    if arch == "vit":
        cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=10)
        return transformers.ViTForImageClassification(cfg).eval(), ["classifier"], 16
    if arch == "deit":
        cfg = transformers.DeiTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128, num_labels=10)
        # two heads, both num_labels wide; the logits are their mean
        return (transformers.DeiTForImageClassificationWithTeacher(cfg).eval(),
                ["cls_classifier", "distillation_classifier"], 16)
    if arch == "swin":
        # stage 1: 8x8 tokens of 32 channels, windows of 4 (the second block shifted), then the
        # patch merging reduction Linear 128 -> 64 and stage 2: 4x4 tokens of 64 channels
        cfg = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=32, depths=[2, 2],
                                      num_heads=[2, 4], window_size=4, num_labels=10)
        return transformers.SwinForImageClassification(cfg).eval(), ["classifier"], 32
    raise AssertionError(arch)


def _calib(side: int, n: int = 2, batch: int = 2, seed: int = 1, as_dict: bool = False):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 3, side, side, generator=g) for _ in range(n)]
    return [{"pixel_values": x} for x in xs] if as_dict else xs


def _prunable(model: nn.Module, exclude=()) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in exclude]


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=x) if hasattr(model, "config") else model(x)  # Hugging Face or plain
    return out if isinstance(out, torch.Tensor) else out.logits


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def _check_report(model: nn.Module, rep, target: float, block=BLOCK, slack: float = 0.01) -> None:
    """The FLOPs target is met from below within ``slack`` (the allocation realises whole
    blocks and never keeps more than the target), the report agrees with itself, and every
    pruned layer's weight is zero on exactly its masked-off blocks."""
    bh, bw = block
    assert target - slack <= rep.kept_flops <= target + 1e-9, rep.table()
    total = sum(r.flops for r in rep.layers)
    assert sum(r.flops * (1 - r.sparsity) for r in rep.layers) / total == pytest.approx(rep.kept_flops, abs=1e-12)
    assert set(rep.masks) == {r.name for r in rep.layers}
    for r in rep.layers:
        mask = rep.masks[r.name]
        assert mask.dtype == torch.bool and tuple(mask.shape) == (r.shape[0] // bh, r.shape[1] // bw)
        assert r.blocks == mask.numel() and r.pruned_blocks == int((~mask).sum())
        assert 0 <= r.sparsity <= 0.95 + 1e-12
        assert r.flops > 0
        w = model.get_submodule(r.name).weight.detach()
        w = w.reshape(w.shape[0], -1)
        assert tuple(w.shape) == r.shape
        blocks = w.reshape(r.shape[0] // bh, bh, r.shape[1] // bw, bw).abs().sum((1, 3))
        assert bool((blocks[~mask] == 0).all()), f"{r.name}: a pruned block is not zero"
        assert bool((blocks[mask] > 0).all()), f"{r.name}: a kept block is all zero"


def _check_swapped(model: nn.Module, rep, heads) -> None:
    linears = [r.name for r in rep.layers if r.kind == "linear"]
    assert rep.swapped == linears and linears
    for name in rep.swapped:
        mod = model.get_submodule(name)
        assert isinstance(mod, semisparse.BlockSparseLinear), name
        assert mod.block == BLOCK
        assert torch.equal(mod.block_mask(), rep.masks[name])
        assert mod.nnz_blocks == int(rep.masks[name].sum())
    # only the excluded heads stay nn.Linear; Conv2d layers stay dense (zeroed blocks)
    left = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert left == set(heads)
    for r in rep.layers:
        if r.kind == "conv2d":
            assert isinstance(model.get_submodule(r.name), nn.Conv2d)


# --------------------------------------------------- Hugging Face ViT / DeiT / Swin
@pytest.mark.parametrize("arch", ["vit", "deit", "swin"])
def test_hf_prune_swap_and_safetensors_round_trip(arch, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model, heads, side = _hf(arch)
    twin = copy.deepcopy(model)
    calib = _calib(side, as_dict=(arch == "deit"))  # dicts of keyword inputs for one of them
    rep = lpvit.prune(model, calib, block=BLOCK, flops=0.5, exclude=heads)
    _check_report(model, rep, 0.5)
    # every Linear and the patch Conv2d but the heads is pruned
    assert [r.name for r in rep.layers] == _prunable(model, heads)
    assert {r.kind for r in rep.layers} == {"linear", "conv2d"}
    if arch == "swin":
        red = next(r for r in rep.layers if r.name.endswith("downsample.reduction"))
        assert red.shape == (64, 128)  # patch merging: 4C -> 2C
    for h in heads:  # heads untouched
        assert torch.equal(model.get_submodule(h).weight, twin.get_submodule(h).weight)

    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(7))
    ref = _logits(model, x)
    assert ref.shape == (3, 10) and bool(torch.isfinite(ref).all())
    assert not torch.allclose(ref, _logits(twin, x))  # the pruning did something

    # swap=True: the same masks (same model, same data), BlockSparseLinear in place, same logits
    rep2 = lpvit.prune(twin, calib, block=BLOCK, flops=0.5, exclude=heads, swap=True)
    assert set(rep2.masks) == set(rep.masks)
    for name in rep.masks:
        assert torch.equal(rep2.masks[name], rep.masks[name]), name
    _check_swapped(twin, rep2, heads)
    out = _logits(twin, x)
    _assert_same(out, ref)

    # the swapped model's state dict saves with safetensors (no shared tensors) and loads into a
    # freshly built, differently pruned and swapped model (other block counts: values resize)
    path = tmp_path / f"{arch}.safetensors"
    sd = twin.state_dict()
    assert any(k.endswith(".values") for k in sd) and any(k.endswith(".col_indices") for k in sd)
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    fresh, _, _ = _hf(arch, seed=3)
    rep3 = lpvit.prune(fresh, _calib(side, seed=5), block=BLOCK, flops=0.7, exclude=heads, swap=True)
    assert rep3.swapped == rep2.swapped
    assert any(fresh.get_submodule(n).nnz_blocks != twin.get_submodule(n).nnz_blocks for n in rep2.swapped)
    fresh.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    for name in rep2.swapped:
        assert torch.equal(fresh.get_submodule(name).block_mask(), rep2.masks[name])
    _assert_same(_logits(fresh, x), out)
    assert torch.equal(_logits(fresh, x), out)


def test_prune_leaves_training_state_and_grads_as_they_were():
    model, heads, side = _hf("vit")
    model.train()
    model.get_submodule("classifier").requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    lpvit.prune(model, _calib(side), block=BLOCK, flops=0.5, exclude=heads)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_hf_vit_swapped_under_torch_compile(backend):
    if backend == "inductor" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    model, heads, side = _hf("vit")
    rep = lpvit.prune(model, _calib(side), block=BLOCK, flops=0.5, exclude=heads, swap=True)
    assert rep.swapped
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(11))
    ref = _logits(model, x)
    torch._dynamo.reset()
    try:
        # aot_eager: one graph through every BlockSparseLinear (no graph break); inductor (about
        # 20 s on 2 cores): the default backend compiles around our op
        compiled = torch.compile(model, backend=backend, fullgraph=(backend == "aot_eager"))
        _assert_same(_logits(compiled, x), ref)
        _assert_same(_logits(compiled, x), ref)  # the cached graph too
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ allocations
@pytest.mark.parametrize("flops", [0.5, 0.3])
def test_uniform_allocation_prunes_every_layer_alike(flops):
    model, heads, side = _hf("vit")
    rep = lpvit.prune(model, _calib(side), block=BLOCK, flops=flops, exclude=heads, allocation="uniform")
    assert len(rep.layers) == len(_prunable(model, heads))
    for r in rep.layers:
        nb = r.blocks
        assert r.pruned_blocks == round((1 - flops) * nb)
        assert r.sparsity == round((1 - flops) * nb) / nb
    # (the kept FLOPs follow from the rounded per-layer counts; the mask check as for lpvit)
    total = sum(r.flops for r in rep.layers)
    assert rep.kept_flops == pytest.approx(sum(r.flops * (1 - r.sparsity) for r in rep.layers) / total, abs=1e-12)
    assert abs(rep.kept_flops - flops) <= 0.5 / min(r.blocks for r in rep.layers)
    bh, bw = BLOCK
    for r in rep.layers:
        w = model.get_submodule(r.name).weight.detach().reshape(r.shape[0], -1)
        blocks = w.reshape(r.shape[0] // bh, bh, r.shape[1] // bw, bw).abs().sum((1, 3))
        assert torch.equal(blocks != 0, rep.masks[r.name])


@pytest.mark.parametrize("arch", ["vit", "swin"])
@pytest.mark.parametrize("power", ["analytical", "measured"])
def test_power_terms_hit_the_target(arch, power):
    model, heads, side = _hf(arch)
    rep = lpvit.prune(model, _calib(side), block=BLOCK, flops=0.5, power=power, exclude=heads)
    _check_report(model, rep, 0.5)
    assert rep.power == power
    assert math.isfinite(rep.beta) and rep.beta > 0
    x = torch.randn(2, 3, side, side)
    assert bool(torch.isfinite(_logits(model, x)).all())


# ------------------------------------------------------- plain Conv2d / Linear net
class _ConvMLP(nn.Module):
    """A Conv2d stem, then Linear layers on channels-last 4-D activations (as in ConvNeXt and
    timm's Swin) and a 2-D head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 32, kernel_size=2, stride=2)   # matrix 32 x 32
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 16)

    def forward(self, x):
        h = self.stem(x).permute(0, 2, 3, 1)                    # [B, H, W, C]
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)))
        return self.head(h.mean((1, 2)))


def test_plain_conv_linear_net_with_4d_linear_inputs_and_swap():
    torch.manual_seed(0)
    model = _ConvMLP().eval()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    calib = [torch.randn(2, 8, 8, 8, generator=g) for _ in range(2)]
    rep = lpvit.prune(model, calib, block=BLOCK, flops=0.5)
    # a toy net: one block of fc1 is 5% of the FLOPs, so the target is met within one block
    total = sum(r.flops for r in rep.layers)
    _check_report(model, rep, 0.5, slack=max(r.flops / r.blocks for r in rep.layers) / total)
    by = {r.name: r for r in rep.layers}
    assert set(by) == {"stem", "fc1", "fc2", "head"}
    # FLOPs per calibration batch: 2 x rows x in x out, rows counting every [B, H, W] position
    assert by["fc1"].flops == 2 * (2 * 4 * 4) * 32 * 64
    assert by["head"].flops == 2 * 2 * 32 * 16
    assert by["stem"].flops == 2 * (2 * 32 * 4 * 4) * 32
    x = torch.randn(3, 8, 8, 8, generator=g)
    ref = _logits(model, x)
    rep2 = lpvit.prune(twin, calib, block=BLOCK, flops=0.5, swap=True)
    assert rep2.swapped == ["fc1", "fc2", "head"]
    for name in rep.masks:
        assert torch.equal(rep2.masks[name], rep.masks[name])
    assert isinstance(twin.stem, nn.Conv2d) and isinstance(twin.fc1, semisparse.BlockSparseLinear)
    _assert_same(_logits(twin, x), ref)
    # and it still trains: gradients reach the kept blocks through the 4-D input
    twin.train()
    twin(x).pow(2).mean().backward()
    assert twin.fc1.values.grad is not None and bool(torch.isfinite(twin.fc1.values.grad).all())


# ------------------------------------------------------------------ errors
def test_layers_that_do_not_divide_the_block_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32))
    calib = [torch.randn(2, 24)]
    with pytest.raises(ValueError, match="does not divide") as e:
        lpvit.prune(model, calib, block=BLOCK, flops=0.5)
    msg = str(e.value)
    assert "0 40x24" in msg and "2 32x40" in msg and "4 " not in msg
    assert "exclude" in msg
    # excluding them as suggested works
    rep = lpvit.prune(model, calib, block=BLOCK, flops=0.5, exclude=["0", "2"])
    assert [r.name for r in rep.layers] == ["4"]
    assert rep.layers[0].pruned_blocks == 2  # of 4 blocks, to keep half the FLOPs


def test_hf_head_that_does_not_divide_the_block_is_named():
    model, _, side = _hf("deit")
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="exclude") as e:
        lpvit.prune(model, _calib(side), block=BLOCK, flops=0.5)
    assert "cls_classifier 10x64" in str(e.value) and "distillation_classifier 10x64" in str(e.value)
    # nothing was touched
    assert all(torch.equal(p, w0[n]) for n, p in model.named_parameters())


def test_layers_off_the_calibrated_output_are_named():
    # a Hugging Face base model: calibration uses last_hidden_state, which the pooler does not feed
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg).eval()
    calib = _calib(16)
    training = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="do not reach") as e:
        lpvit.prune(model, calib, block=BLOCK, flops=0.5)
    assert "pooler.dense" in str(e.value) and "exclude" in str(e.value)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == training
    assert all(p.grad is None for p in model.parameters())
    rep = lpvit.prune(model, calib, block=BLOCK, flops=0.5, exclude=["pooler.dense"], swap=True)
    _check_report(model, rep, 0.5)
    with torch.no_grad():
        assert bool(torch.isfinite(model(pixel_values=calib[0]).last_hidden_state).all())
    # a Linear that the forward never calls
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    net = WithSpare()
    with pytest.raises(ValueError, match="do not reach.*spare"):
        lpvit.prune(net, [torch.randn(2, 32)], block=BLOCK, flops=0.5)


@pytest.mark.parametrize("flops", [0, 0.0, -0.5, 1.5, 1.0001, float("nan"), float("inf"), True, "0.5", None])
def test_flops_outside_the_unit_interval(flops):
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lpvit.prune(model, [torch.randn(2, 32)], block=BLOCK, flops=flops)


def test_flops_one_keeps_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    w0 = [p.detach().clone() for p in model.parameters()]
    rep = lpvit.prune(model, [torch.randn(2, 32)], block=BLOCK, flops=1)
    assert rep.kept_flops == 1.0 and all(r.pruned_blocks == 0 for r in rep.layers)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w0))


def test_nothing_to_prune_lists_what_the_model_holds():
    with pytest.raises(ValueError, match="nothing to prune") as e:
        lpvit.prune(nn.Sequential(nn.LayerNorm(8)), [torch.randn(2, 8)], block=BLOCK, flops=0.5)
    assert "LayerNorm" in str(e.value)
    model, _, side = _hf("vit")
    with pytest.raises(ValueError, match="nothing to prune"):
        lpvit.prune(model, _calib(side), block=BLOCK, flops=0.5, targets=["no_such_layer"])


def test_empty_calibration_data():
    with pytest.raises(ValueError, match="empty"):
        lpvit.prune(nn.Sequential(nn.Linear(32, 32)), [], block=BLOCK, flops=0.5)


# ------------------------------------------------------------------ timm
def _timm_model(arch: str):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    if arch == "vit":
        from timm.models.vision_transformer import VisionTransformer

        # patch Conv2d 64 x (3*8*8), qkv 192x64, proj 64x64, fc1 256x64, fc2 64x256; head 10x64
        model = VisionTransformer(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2,
                                  num_heads=4, mlp_ratio=4.0)
        return timm, model.eval(), ["head"]
    from timm.models.swin_transformer import SwinTransformer

    # Linear layers on [B, H, W, C] activations; the patch merging reduction 128 -> 64; head.fc 10x64
    model = SwinTransformer(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depths=(2, 2),
                            num_heads=(2, 4), window_size=4, mlp_ratio=4.0)
    return timm, model.eval(), ["head.fc"]


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_timm_models(arch):
    _, model, heads = _timm_model(arch)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
    rep = lpvit.prune(model, calib, block=BLOCK, flops=0.5, exclude=heads)
    _check_report(model, rep, 0.5)
    assert [r.name for r in rep.layers] == _prunable(model, heads)
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 10) and bool(torch.isfinite(ref).all())
    rep2 = lpvit.prune(twin, calib, block=BLOCK, flops=0.5, exclude=heads, swap=True)
    for name in rep.masks:
        assert torch.equal(rep2.masks[name], rep.masks[name]), name
    _check_swapped(twin, rep2, heads)
    with torch.no_grad():
        _assert_same(twin(x), ref)
