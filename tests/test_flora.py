"""FLoRA (Tucker adapters) layers and the PEFT-style model API."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from semisparse.flora import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FLoRAConfig,
    FLoRALayer,
    FLoRAModel,
    ModulesToSaveWrapper,
    get_flora_model,
    load_adapter,
    mode_product_chain,
    resolve_ranks,
    wrap_module,
)
from torch import nn

LETTERS = "abcde"
DIMS = "ijklm"


def einsum_ref(core, factors):
    n = core.dim()
    spec = LETTERS[:n] + "," + ",".join(DIMS[i] + LETTERS[i] for i in range(n)) + "->" + DIMS[:n]
    return torch.einsum(spec, core, *factors)


def randomize(layer: FLoRALayer, name="default", std=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = layer.flora_core[name]
        c.copy_(torch.randn(c.shape, generator=g, dtype=c.dtype) * std)


def make_layer(base, ranks, scale=1.0, dropout=0.0, name="default"):
    layer = wrap_module(base, "m")
    layer.update_layer(name, ranks, scale, dropout)
    layer.set_adapter(name)
    return layer


# ---------------------------------------------------------------------- formula
@pytest.mark.parametrize("dims,ranks", [((6, 5), (3, 2)), ((6, 4, 3), (2, 3, 2)), ((8, 4, 3, 3), (4, 2, 2, 3)),
                                        ((4, 3, 3, 2, 5), (2, 2, 1, 2, 3))])
def test_mode_product_chain_matches_einsum(dims, ranks):
    torch.manual_seed(0)
    core = torch.randn(ranks, dtype=torch.float64)
    factors = [torch.randn(d, r, dtype=torch.float64) for d, r in zip(dims, ranks)]
    got = mode_product_chain(core, factors)
    assert got.shape == dims
    torch.testing.assert_close(got, einsum_ref(core, factors))


LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), (3, 4), lambda: torch.randn(5, 12)),
    "linear3d_input": (lambda: nn.Linear(12, 10, bias=False), (10, 12), lambda: torch.randn(2, 3, 12)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 3, 2), lambda: torch.randn(2, 6, 11)),
    "conv2d": (lambda: nn.Conv2d(6, 8, 3), (4, 3, 2, 2), lambda: torch.randn(2, 6, 9, 9)),
    "conv2d_depthwise": (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (3, 1, 2, 3), lambda: torch.randn(2, 6, 8, 8)),
    "conv2d_grouped": (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (4, 2, 3, 2), lambda: torch.randn(2, 6, 8, 8)),
    "conv2d_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (3, 2, 2, 2), lambda: torch.randn(2, 4, 9, 9)),
    "conv2d_strided": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 3), padding=1), (3, 2, 2, 1), lambda: torch.randn(2, 4, 10, 11)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (3, 2, 2, 2), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_circular": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (3, 2, 2, 2), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_replicate": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), (3, 2, 2, 2), lambda: torch.randn(2, 4, 7, 7)),
    "conv2d_same": (lambda: nn.Conv2d(4, 6, (3, 4), padding="same"), (3, 2, 2, 2), lambda: torch.randn(2, 4, 7, 8)),
    "conv2d_valid": (lambda: nn.Conv2d(4, 6, 3, padding="valid", bias=False), (3, 2, 2, 2), lambda: torch.randn(2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 4, (2, 3, 3), padding=1), (2, 2, 2, 2, 3), lambda: torch.randn(2, 3, 5, 6, 6)),
    "conv1d_depthwise_reflect": (lambda: nn.Conv1d(5, 10, 3, padding=1, groups=5, padding_mode="reflect"), (4, 1, 2), lambda: torch.randn(2, 5, 9)),
    "embedding_pad": (lambda: nn.Embedding(20, 8, padding_idx=3), (5, 4), lambda: torch.tensor([[0, 3, 5, 19], [3, 3, 1, 2]])),
    "embedding": (lambda: nn.Embedding(20, 8), (5, 4), lambda: torch.tensor([[0, 3, 5, 19]])),
}


@pytest.fixture(params=sorted(LAYERS))
def layer_case(request):
    torch.manual_seed(0)
    make_base, ranks, make_x = LAYERS[request.param]
    base = make_base()
    return request.param, base, ranks, make_x()


def test_delta_weight_formula_and_layout(layer_case):
    name, base, ranks, _ = layer_case
    layer = make_layer(base, ranks, scale=2.5)
    randomize(layer)
    assert layer.weight_shape == tuple(base.weight.shape)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        assert layer.weight_shape[1] == base.in_channels // base.groups
    ref = 2.5 * einsum_ref(layer.flora_core["default"].detach().double(),
                           [a.detach().double() for a in layer.flora_factors["default"]])
    if name == "embedding_pad":
        ref[3] = 0
    torch.testing.assert_close(layer.delta_weight("default").double(), ref, rtol=1e-5, atol=1e-6)


def test_zero_init_is_identity_and_init_statistics(layer_case):
    _, base, ranks, x = layer_case
    ref = base(x).detach()
    layer = make_layer(base, ranks)
    assert torch.count_nonzero(layer.flora_core["default"]) == 0
    for a, r in zip(layer.flora_factors["default"], ranks):
        assert a.shape[1] == r and torch.count_nonzero(a) > 0
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
    for mode in ("fused", "delta"):
        layer.forward_mode = mode
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)


def test_kaiming_normal_std():
    layer = make_layer(nn.Linear(4000, 3000), (16, 16))
    a = layer.flora_factors["default"][0]
    std = 1 / math.sqrt(2 * 16)  # gain sqrt(2 / (1 + 3)) / sqrt(fan_in = r)
    assert abs(a.std().item() - std) / std < 0.05


def test_gradients_only_to_adapter(layer_case):
    _, base, ranks, x = layer_case
    layer = make_layer(base, ranks)
    out = layer(x)
    (out.float() ** 2).sum().backward() if not isinstance(base, nn.Embedding) else (out * torch.randn_like(out)).sum().backward()
    assert base.weight.grad is None and not base.weight.requires_grad
    if getattr(base, "bias", None) is not None:
        assert base.bias.grad is None
    core = layer.flora_core["default"]
    assert core.grad is not None and core.grad.abs().sum() > 0
    for a in layer.flora_factors["default"]:  # G = 0: the factors' gradient is 0 at init
        assert a.grad is not None and torch.count_nonzero(a.grad) == 0


def test_merge_exact_and_unmerge_roundtrip(layer_case):
    name, base, ranks, x = layer_case
    w0 = base.weight.detach().clone()
    layer = make_layer(base, ranks, scale=1.5)
    randomize(layer)
    with torch.no_grad():
        fused = layer(x)
        layer.forward_mode = "delta"
        delta = layer(x)
        layer.forward_mode = "auto"
        assert not torch.allclose(fused, base(x))
        torch.testing.assert_close(delta, fused, rtol=1e-5, atol=1e-5)
        if layer._can_factor():
            layer.forward_mode = "factored"
            torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)
            layer.forward_mode = "auto"
        layer.merge()
        assert layer.merged
        merged = layer(x)
        torch.testing.assert_close(merged, fused, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(x), fused, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-6)
    if name == "embedding_pad":
        torch.testing.assert_close(fused[0, 1], w0[3])  # the pad row stays the base's


def test_paths_agree_in_value_and_gradient(layer_case):
    """The fused, delta and factored paths (factored: dW never formed; for Embedding the
    selected rows gathered from the factors) give the same output and the same gradients
    for every adapter tensor."""
    name, base, ranks, x = layer_case
    layer = make_layer(base, ranks, scale=1.5)
    randomize(layer)
    params = [layer.flora_core["default"], *layer.flora_factors["default"]]
    w = torch.randn_like(layer(x).float())

    def run(mode):
        layer.forward_mode = mode
        for p in params:
            p.grad = None
        out = layer(x)
        (out.float() * w).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    ref_out, ref_grads = run("fused")
    modes = ["auto"] if isinstance(base, nn.Embedding) else ["delta"] + (["factored"] if layer._can_factor() else [])
    for mode in modes:
        out, grads = run(mode)
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=mode)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=mode)
    if not isinstance(base, nn.Embedding) and not layer._can_factor():  # grouped / depthwise conv
        layer.forward_mode = "factored"
        with pytest.raises(ValueError, match="forward_mode='factored' needs an ungrouped"):
            layer(x)


def test_auto_mode_choice():
    layer = make_layer(nn.Conv2d(8, 8, 3, padding=1), (4, 4, 2, 2))
    grouped = make_layer(nn.Conv2d(8, 8, 3, padding=1, groups=2), (4, 2, 2, 2))
    names = ["default"]
    assert layer._auto_mode(names, dropping=False) == "fused"
    assert layer._auto_mode(names, dropping=True) == "factored"
    assert grouped._auto_mode(names, dropping=False) == "fused"
    assert grouped._auto_mode(names, dropping=True) == "delta"


def test_dropout_uses_delta_path_and_fused_rejects_it():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(8, 8), (4, 4), dropout=0.5)
    randomize(layer)
    x = torch.randn(64, 8)
    layer.train()
    y1 = layer(x)
    ref = layer.base_layer(x)
    mask_free = ref + F.linear(x, layer.delta_weight("default"))
    assert not torch.allclose(y1, mask_free)  # dropout active on the adapter input
    layer.eval()
    torch.testing.assert_close(layer(x), mask_free, rtol=1e-5, atol=1e-5)
    layer.train()
    layer.forward_mode = "fused"
    with pytest.raises(ValueError, match="forward_mode='fused' cannot apply dropout"):
        layer(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_gets_fp32_adapter(dtype):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    layer = make_layer(base, (3, 2, 2, 2))
    randomize(layer)
    assert layer.flora_core["default"].dtype == torch.float32
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.flora_core["default"].grad.dtype == torch.float32
    with torch.no_grad():
        layer.merge()
        torch.testing.assert_close(layer(x), out.detach(), rtol=2e-2, atol=2e-2)


def test_embedding_max_norm():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6, max_norm=1.0)
    layer = make_layer(base, (3, 3))
    randomize(layer, std=2.0)
    out = layer(torch.tensor([1, 2, 3]))
    assert (out.norm(dim=-1) <= 1.0 + 1e-5).all()


def test_rank_errors_name_module_mode_rank_dim():
    layer = wrap_module(nn.Conv2d(4, 6, 3), "enc.conv")
    with pytest.raises(ValueError, match=r"'enc.conv'.*rank 4 of mode 2 exceeds its dimension 3"):
        layer.update_layer("a", (2, 2, 4, 2))
    with pytest.raises(ValueError, match=r"module 'x.conv': rank 8 of mode 2 exceeds its dimension 3"):
        resolve_ranks(8, (16, 8, 3, 3), "x.conv")
    with pytest.raises(ValueError, match=r"ranks \(2, 2\) have 2 entries but its weight \(6, 4, 3, 3\) has 4 modes"):
        resolve_ranks((2, 2), (6, 4, 3, 3), "c")
    assert resolve_ranks(0.25, (16, 8, 3, 3), "c") == (4, 2, 1, 1)
    assert resolve_ranks((0.5, 3, 1.0, 1), (16, 8, 3, 3), "c") == (8, 3, 3, 1)


def test_wrap_unsupported_type():
    with pytest.raises(ValueError, match=r"module 'n' has type torch.nn.modules.normalization.LayerNorm.*supported types: nn.Linear"):
        wrap_module(nn.LayerNorm(4), "n")


# ---------------------------------------------------------------------- config
def test_config_roundtrip_and_validation():
    cfg = FLoRAConfig(ranks=(4, 4, 2, 2), scale=4.0, dropout=0.01, target_modules=["conv"],
                      rank_pattern={"q_proj": 0.5, "^blocks\\.1\\.": [2, 2]}, scale_pattern={"v": 2})
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = FLoRAConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.ranks == (4, 4, 2, 2) and back.rank_pattern["^blocks\\.1\\."] == (2, 2)
    bad = [
        (dict(ranks=0), "int rank must be >= 1"),
        (dict(ranks=1.5), "fraction of the dimension in"),
        (dict(ranks=True), "a rank must be an int"),
        (dict(ranks=()), "must not be empty"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(target_modules="(["), "not a valid regular expression"),
        (dict(target_modules=[]), "must not be an empty list"),
        (dict(target_modules=[3]), "must hold non-empty strings"),
        (dict(modules_to_save="lm_head"), "must be a list of module names"),
        (dict(rank_pattern={"q": -1}), r"rank_pattern\['q'\]: an int rank must be >= 1"),
        (dict(scale_pattern=[1]), "scale_pattern must be a dict"),
        (dict(init="gaussian"), "init must be one of"),
        (dict(forward_mode="fast"), "forward_mode must be one of"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            FLoRAConfig(**kw)
    with pytest.raises(ValueError, match="unknown keys"):
        FLoRAConfig.from_dict({"ranks": 2, "alpha": 3})


# ---------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.q_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.norm = nn.LayerNorm(h)

    def forward(self, x):
        return self.norm(x + torch.relu(self.v_proj(self.q_proj(x))))


class Net(nn.Module):
    def __init__(self, h=16, vocab=30):
        super().__init__()
        self.emb = nn.Embedding(vocab, h, padding_idx=0)
        self.blocks = nn.ModuleList([Block(h) for _ in range(2)])
        self.conv = nn.Conv1d(h, h, 3, padding=1, groups=2)
        self.lm_head = nn.Linear(h, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        return self.lm_head(x)


def net(seed=0, **kw):
    torch.manual_seed(seed)
    return Net(**kw)


IDS = torch.tensor([[1, 2, 3, 0, 5, 6], [7, 8, 9, 10, 0, 0]])


def targets_of(fm):
    return sorted(n for n, m in fm.base_model.named_modules() if isinstance(m, FLoRALayer))


def perturb(fm, name=None, seed=1):
    for _, m in fm.base_model.named_modules():
        if isinstance(m, FLoRALayer):
            for n in m.flora_core.keys():
                if name is None or n == name:
                    randomize(m, n, std=0.3, seed=seed)


def test_matching_suffix_regex_all_linear_exclude():
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj"]))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["blocks.1.v_proj", "q_proj", "emb"]))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.v_proj", "emb"]
    # "proj" is not a suffix at a dot boundary
    with pytest.raises(ValueError, match="match no module"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["proj"]))
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=r"blocks\.0\..*_proj"))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.0.v_proj"]
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules="all-linear"))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules="all-linear", exclude_modules=["v_proj"]))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.1.q_proj"]
    fm = get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj", "v_proj"], exclude_modules=r"blocks\.0\..*"))
    assert targets_of(fm) == ["blocks.1.q_proj", "blocks.1.v_proj"]

    class WithOut(Net):
        def get_output_embeddings(self):
            return self.blocks[1].v_proj

    torch.manual_seed(0)
    fm = get_flora_model(WithOut(), FLoRAConfig(ranks=2, target_modules="all-linear"))
    assert targets_of(fm) == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj", "lm_head"]


def test_rank_fraction_and_rank_pattern():
    cfg = FLoRAConfig(ranks=0.25, target_modules=["q_proj", "v_proj", "conv"],
                      rank_pattern={"v_proj": 3, "^blocks\\.1\\.q_proj": (2, 5), "conv": (4, 2, 1)},
                      scale_pattern={"conv": 3.0})
    fm = get_flora_model(net(), cfg)
    m = dict(fm.base_model.named_modules())
    assert m["blocks.0.q_proj"].flora_ranks["default"] == (4, 4)
    assert m["blocks.1.q_proj"].flora_ranks["default"] == (2, 5)
    assert m["blocks.0.v_proj"].flora_ranks["default"] == (3, 3)
    assert m["conv"].flora_ranks["default"] == (4, 2, 1)
    assert m["conv"].weight_shape == (16, 8, 3)  # grouped conv: in_channels / groups
    assert m["conv"].flora_scale["default"] == 3.0 and m["blocks.0.q_proj"].flora_scale["default"] == 1.0


def test_bad_targets_messages():
    with pytest.raises(ValueError, match=r"match no module of the model; some of its modules: emb, blocks.0.q_proj"):
        get_flora_model(net(), FLoRAConfig(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"module 'blocks.0.norm' has type .*LayerNorm.*supported types: nn.Linear, nn.Conv1d"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj", "norm"]))
    with pytest.raises(ValueError, match=r"module 'conv': rank 4 of mode 2 exceeds its dimension 3"):
        get_flora_model(net(), FLoRAConfig(ranks=4, target_modules=["conv"]))
    with pytest.raises(ValueError, match="target_modules is required"):
        get_flora_model(net(), FLoRAConfig())
    with pytest.raises(ValueError, match="both a target and in modules_to_save"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["lm_head"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"modules_to_save \['head2'\] match no module"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj"], modules_to_save=["head2"]))
    with pytest.raises(ValueError, match="adapter name must be a non-empty identifier"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj"]), adapter_name="a.b")
    with pytest.raises(ValueError, match="adapter name 'keys' is reserved"):
        get_flora_model(net(), FLoRAConfig(ranks=2, target_modules=["q_proj"]), adapter_name="keys")


def full_cfg(**kw):
    base = dict(ranks=2, target_modules=["q_proj", "v_proj", "conv", "emb"], rank_pattern={"conv": (4, 4, 2)})
    base.update(kw)
    return FLoRAConfig(**base)


def test_identity_freeze_and_counts(capsys):
    base = net()
    ref = base(IDS).detach()
    fm = get_flora_model(base, full_cfg(modules_to_save=["lm_head"]))
    torch.testing.assert_close(fm(IDS), ref, rtol=0, atol=0)
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable and all(("flora_" in n) or ("modules_to_save.default" in n) for n in trainable)
    t, a = fm.get_nb_trainable_parameters()
    expect = sum(p.numel() for p in fm.parameters() if p.requires_grad)
    assert t == expect and a == sum(p.numel() for p in fm.parameters())
    fm.print_trainable_parameters()
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"
    # attribute fall-through
    assert fm.lm_head.original_module.out_features == 30 and fm.blocks[0].q_proj.in_features == 16
    # a training step touches only adapter params
    opt = torch.optim.SGD([p for p in fm.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in fm.named_parameters()}
    F.cross_entropy(fm(IDS).flatten(0, 1), IDS.flatten()).backward()
    opt.step()
    for n, p in fm.named_parameters():
        if n in trainable and "flora_core" in n:
            assert not torch.equal(p, before[n]), n
        if n not in trainable:
            assert torch.equal(p, before[n]), n


def test_several_adapters_switch_disable_delete():
    base = net()
    ref = base(IDS).detach()
    fm = get_flora_model(base, full_cfg())
    fm.add_adapter("other", FLoRAConfig(ranks=3, target_modules=["q_proj"], scale=2.0))
    assert fm.active_adapter == "default"
    perturb(fm, "default", seed=1)
    perturb(fm, "other", seed=2)
    out_default = fm(IDS).detach()
    fm.set_adapter("other")
    assert fm.active_adapter == "other"
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    out_other = fm(IDS).detach()
    assert not torch.allclose(out_default, out_other) and not torch.allclose(out_other, ref)
    with fm.disable_adapter():
        torch.testing.assert_close(fm(IDS), ref, rtol=0, atol=0)
    torch.testing.assert_close(fm(IDS), out_other)
    fm.set_adapter(["default", "other"])
    both = fm(IDS).detach()
    assert not torch.allclose(both, out_default)
    # merged + disable: unmerged inside, merged again after
    fm.merge_adapter()
    torch.testing.assert_close(fm(IDS), both, rtol=1e-5, atol=1e-5)
    with fm.disable_adapter():
        torch.testing.assert_close(fm(IDS), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fm(IDS), both, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is merged in"):
        fm.delete_adapter("other")
    fm.unmerge_adapter()
    fm.delete_adapter("other")
    assert fm.active_adapter == "default" and list(fm.peft_config) == ["default"]
    torch.testing.assert_close(fm(IDS), out_default)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        fm.set_adapter("other")
    with pytest.raises(ValueError, match="exists already"):
        fm.add_adapter("default", full_cfg())


def test_merge_and_unload_and_unload():
    base = net()
    originals = {n: m for n, m in base.named_modules()}
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    fm = get_flora_model(base, full_cfg())
    perturb(fm)
    adapted = fm(IDS).detach()
    fm.merge_adapter()
    torch.testing.assert_close(fm(IDS), adapted, rtol=1e-5, atol=1e-5)
    fm.unmerge_adapter()
    for n, p in base.named_parameters():
        if "flora" not in n:
            torch.testing.assert_close(p.detach(), w0[n.replace(".base_layer", "")], rtol=0, atol=1e-6)
    plain = fm.merge_and_unload()
    assert plain is base
    assert not any(isinstance(m, (FLoRALayer, ModulesToSaveWrapper)) for m in plain.modules())
    assert type(plain.blocks[0].q_proj) is nn.Linear and type(plain.conv) is nn.Conv1d and type(plain.emb) is nn.Embedding
    torch.testing.assert_close(plain(IDS), adapted, rtol=1e-5, atol=1e-5)
    assert set(dict(plain.named_parameters())) == set(w0)

    base = net()
    fm = get_flora_model(base, full_cfg())
    perturb(fm)
    fm.merge_adapter()  # unload unmerges
    plain = fm.unload()
    for n, m in plain.named_modules():
        assert m is originals.get(n, m) or type(m) is type(originals[n])
        assert not isinstance(m, FLoRALayer)
    assert plain.blocks[0].q_proj is dict(base.named_modules())["blocks.0.q_proj"]
    for n, p in plain.named_parameters():
        torch.testing.assert_close(p.detach(), w0[n], rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in plain.parameters())


def test_merge_tied_weight_warns():
    base = net()
    base.lm_head.weight = base.emb.weight  # tied [30, 16]
    fm = get_flora_model(base, FLoRAConfig(ranks=2, target_modules=["emb"]))
    with pytest.raises(ValueError, match="no adapter named 'x'"):
        fm.merge_adapter("x")
    with pytest.warns(UserWarning, match=r"module 'emb': its weight is shared \(tied\) with \['lm_head.weight'\]"):
        fm.merge_adapter()


def test_modules_to_save():
    base = net()
    ref = base(IDS).detach()
    fm = get_flora_model(base, full_cfg(modules_to_save=["lm_head"]))
    assert isinstance(fm.base_model.lm_head, ModulesToSaveWrapper)
    with torch.no_grad():
        fm.base_model.lm_head.modules_to_save["default"].bias.add_(1.0)
    torch.testing.assert_close(fm(IDS), ref + 1.0, rtol=1e-5, atol=1e-5)
    with fm.disable_adapter():
        torch.testing.assert_close(fm(IDS), ref)
    assert fm.base_model.lm_head.original_module.weight.requires_grad is False
    assert fm.base_model.lm_head.modules_to_save["default"].weight.requires_grad is True
    plain = fm.merge_and_unload()
    assert type(plain.lm_head) is nn.Linear
    torch.testing.assert_close(plain(IDS), ref + 1.0, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(tmp_path):
    fm = get_flora_model(net(), full_cfg(modules_to_save=["lm_head"], scale=1.5))
    perturb(fm)
    with torch.no_grad():
        fm.base_model.lm_head.modules_to_save["default"].weight.mul_(1.1)
        out = fm(IDS)
    fm.save_pretrained(tmp_path / "ad")
    files = sorted(os.listdir(tmp_path / "ad"))
    assert files == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p for p in os.listdir(tmp_path) if p != "ad"] == []  # no temp folder left
    header = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert header["format_version"] == 1 and header["adapter_name"] == "default"
    assert header["modules"]["conv"] == {"type": "Conv1d", "weight_shape": [16, 8, 3], "ranks": [4, 4, 2], "scale": 1.5}
    tensors = load_file(str(tmp_path / "ad" / WEIGHTS_NAME))
    assert "blocks.0.q_proj.flora_core" in tensors and "conv.flora_factors.2" in tensors
    assert "lm_head.weight" in tensors and "lm_head.bias" in tensors
    assert not any("base_layer" in k or "default" in k for k in tensors)
    assert FLoRAConfig.from_dict(header["config"]) == fm.peft_config["default"]

    fresh = net()
    loaded = load_adapter(fresh, tmp_path / "ad")
    assert isinstance(loaded, FLoRAModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(IDS), out, rtol=0, atol=0)
    trainable = FLoRAModel.from_pretrained(net(), tmp_path / "ad", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == fm.get_nb_trainable_parameters()[0]
    # a second adapter into an existing FLoRAModel, then saving both (PEFT layout)
    load_adapter(loaded, tmp_path / "ad", adapter_name="second")
    assert loaded.active_adapter == "second"
    torch.testing.assert_close(loaded(IDS), out)
    loaded.save_pretrained(tmp_path / "both")
    assert sorted(os.listdir(tmp_path / "both")) == [CONFIG_NAME, WEIGHTS_NAME, "second"]
    # saving again over an existing folder replaces the files
    fm.save_adapter(tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == [CONFIG_NAME, WEIGHTS_NAME]


def test_load_errors(tmp_path):
    fm = get_flora_model(net(), full_cfg())
    fm.save_pretrained(tmp_path / "ad")
    with pytest.raises(ValueError, match=r"module 'blocks.0.q_proj' has weight shape \(24, 24\) in the model but \(16, 16\) in the saved adapter"):
        load_adapter(net(h=24), tmp_path / "ad")
    with pytest.raises(ValueError, match=r"module 'emb' has weight shape \(40, 16\) in the model but \(30, 16\)"):
        load_adapter(net(vocab=40), tmp_path / "ad")
    b = net()
    del b.conv
    with pytest.raises(ValueError, match="saved module 'conv' is not in the model"):
        load_adapter(b, tmp_path / "ad")
    b = net()
    b.conv = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="module 'conv' was a Conv1d when saved, the model's is a Linear"):
        load_adapter(b, tmp_path / "ad")
    wpath = tmp_path / "ad" / WEIGHTS_NAME
    tensors = load_file(str(wpath))
    t2 = dict(tensors)
    del t2["conv.flora_core"]
    save_file(t2, str(wpath))
    with pytest.raises(ValueError, match=r"lacks 1 tensors: \['conv.flora_core'\]"):
        load_adapter(net(), tmp_path / "ad")
    save_file({**tensors, "junk.flora_core": torch.zeros(1)}, str(wpath))
    with pytest.raises(ValueError, match=r"1 unexpected tensors: \['junk.flora_core'\]"):
        load_adapter(net(), tmp_path / "ad")
    save_file({**tensors, "conv.flora_core": torch.zeros(3, 3, 3)}, str(wpath))
    fresh = FLoRAModel(net())
    with pytest.raises(ValueError, match=r"tensor 'conv.flora_core' has shape \(3, 3, 3\), the adapter expects \(4, 4, 2\)"):
        fresh.load_adapter(tmp_path / "ad")
    assert fresh.peft_config == {}  # rolled back
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_adapter(net(), tmp_path / "nothing")
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (tmp_path / "ad" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99 is not supported"):
        load_adapter(net(), tmp_path / "ad")


def test_state_dict_roundtrip():
    fm = get_flora_model(net(), full_cfg())
    perturb(fm)
    out = fm(IDS).detach()
    sd = fm.state_dict()
    assert "base_model.blocks.0.q_proj.flora_core.default" in sd
    fm2 = get_flora_model(net(seed=5), full_cfg())
    fm2.load_state_dict(sd)
    torch.testing.assert_close(fm2(IDS), out, rtol=0, atol=0)


# ---------------------------------------------------------------------- torch.compile
def test_compile_aot_eager_forward_and_train_step():
    torch._dynamo.reset()
    cfg = full_cfg(dropout=0.0)
    fm = get_flora_model(net(), cfg)
    perturb(fm)
    fm2 = get_flora_model(net(), cfg)
    fm2.load_state_dict(fm.state_dict())
    compiled = torch.compile(fm2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(IDS), fm(IDS), rtol=1e-5, atol=1e-5)
    for model in (fm, compiled):
        loss = F.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten())
        loss.backward()
    g1 = {n: p.grad for n, p in fm.named_parameters() if p.requires_grad}
    g2 = {n: p.grad for n, p in fm2.named_parameters() if p.requires_grad}
    assert set(g1) == set(g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["factored", "delta"])
def test_compile_aot_eager_dropout_paths(mode):
    """With adapter dropout active (training), the factored / delta paths compile without a
    graph break and give eager's gradients when dropout draws the same mask (p tiny: the
    mask is all ones with overwhelming probability, so eager and compiled agree)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 5 * 5, 6))
    fm = get_flora_model(base, FLoRAConfig(ranks=0.5, dropout=1e-9, target_modules=["0", "3"]))
    perturb(fm)
    for lay in fm.modules():
        if isinstance(lay, FLoRALayer):
            lay.forward_mode = mode
    fm.train()
    x = torch.randn(2, 4, 5, 5)
    compiled = torch.compile(fm, backend="aot_eager", fullgraph=True)
    out_c = compiled(x)
    g_c = torch.autograd.grad(out_c.square().sum(), [p for p in fm.parameters() if p.requires_grad])
    out_e = fm(x)
    g_e = torch.autograd.grad(out_e.square().sum(), [p for p in fm.parameters() if p.requires_grad])
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_inductor_forward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    fm = get_flora_model(model, FLoRAConfig(ranks=(4, 2, 2, 2), target_modules=["0"], rank_pattern={"3": 3}))
    assert targets_of(fm) == ["0"]
    fm.add_adapter("lin", FLoRAConfig(ranks=3, target_modules=["3"]))
    fm.set_adapter(["default", "lin"])
    perturb(fm)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = fm(x)
        got = torch.compile(fm)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- Hugging Face
def _train_steps(fm, batch_fn, steps=3):
    opt = torch.optim.AdamW([p for p in fm.parameters() if p.requires_grad], lr=1e-2)
    fm.train()
    for _ in range(steps):
        loss = batch_fn(fm)
        loss.backward()
        opt.step()
        opt.zero_grad()
    fm.eval()


def test_hf_bert_llama_vit(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # BERT: query/value, dropout on the adapter input
    bcfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=32)
    ids = torch.randint(1, 50, (2, 8))
    bert = transformers.BertModel(bcfg).eval()
    sd0 = {k: v.clone() for k, v in bert.state_dict().items()}
    fm = get_flora_model(bert, FLoRAConfig(ranks=4, dropout=0.1, target_modules=["query", "value"]))
    assert len(targets_of(fm)) == 4 and fm.config.hidden_size == 32
    _train_steps(fm, lambda m: m(input_ids=ids).last_hidden_state.pow(2).mean())
    out = fm(input_ids=ids).last_hidden_state.detach()
    fm.save_pretrained(tmp_path / "bert")
    bert2 = transformers.BertModel(bcfg).eval()
    bert2.load_state_dict(sd0)
    torch.testing.assert_close(FLoRAModel.from_pretrained(bert2, tmp_path / "bert")(input_ids=ids).last_hidden_state, out)

    # Llama: all-linear leaves lm_head out (get_output_embeddings)
    torch.manual_seed(0)
    lcfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    llama = transformers.LlamaForCausalLM(lcfg).eval()
    sd0 = {k: v.clone() for k, v in llama.state_dict().items()}
    fm = get_flora_model(llama, FLoRAConfig(ranks=0.25, target_modules="all-linear"))
    names = targets_of(fm)
    assert "lm_head" not in names and len(names) == 2 * 7
    _train_steps(fm, lambda m: m(input_ids=ids, labels=ids).loss)
    out = fm(input_ids=ids).logits.detach()
    fm.save_pretrained(tmp_path / "llama")
    llama2 = transformers.LlamaForCausalLM(lcfg).eval()
    llama2.load_state_dict(sd0)
    torch.testing.assert_close(load_adapter(llama2, tmp_path / "llama")(input_ids=ids).logits, out)
    plain = load_adapter(transformers.LlamaForCausalLM(lcfg).eval(), tmp_path / "llama")
    # another random base: the same adapter, merged, gives the unmerged outputs
    before = plain(input_ids=ids).logits.detach()
    merged = plain.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)

    # ViT: Conv2d patch embedding (all four modes factorised) + query/value, classifier trained in full
    torch.manual_seed(0)
    vcfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3)
    vit = transformers.ViTForImageClassification(vcfg).eval()
    sd0 = {k: v.clone() for k, v in vit.state_dict().items()}
    cfg = FLoRAConfig(ranks=4, target_modules=["query", "value", "patch_embeddings.projection"],
                      rank_pattern={"projection": (8, 3, 2, 2)}, scale=2.0, modules_to_save=["classifier"])
    fm = get_flora_model(vit, cfg)
    conv = fm.base_model.vit.embeddings.patch_embeddings.projection
    assert isinstance(conv, FLoRALayer) and conv.flora_ranks["default"] == (8, 3, 2, 2)
    pix = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 2])
    _train_steps(fm, lambda m: m(pixel_values=pix, labels=labels).loss)
    assert conv.flora_core["default"].abs().sum() > 0
    out = fm(pixel_values=pix).logits.detach()
    fm.save_pretrained(tmp_path / "vit")
    vit2 = transformers.ViTForImageClassification(vcfg).eval()
    vit2.load_state_dict(sd0)
    re = FLoRAModel.from_pretrained(vit2, tmp_path / "vit")
    torch.testing.assert_close(re(pixel_values=pix).logits, out)
    torch.testing.assert_close(re.merge_and_unload()(pixel_values=pix).logits, out, rtol=1e-4, atol=1e-4)
