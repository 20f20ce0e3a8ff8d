"""sparsify: swap a model's eligible nn.Linear layers for SparseLinear."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semisparse import SparseLinear, SparsifyReport, nm_mask, sparsify
from semisparse.sparsify import name_matches

D, VOCAB, HIDDEN = 16, 24, 32
PROJ = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"]
MLP = ["mlp.up_proj", "mlp.down_proj"]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return self.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class MLP_(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(D, HIDDEN)
        self.down_proj = nn.Linear(HIDDEN, D)

    def forward(self, h):
        return self.down_proj(F.gelu(self.up_proj(h)))


class TinyBlock(nn.Module):
    """Embedding, attention, MLP, a Linear with in_features=6, and an LM head whose
    weight is tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.attn = Attention()
        self.mlp = MLP_()
        self.odd = nn.Linear(6, 4)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.attn(h)
        h = h + self.mlp(h)
        return self.head(h), self.odd(h[..., :6])


@pytest.fixture
def model():
    torch.manual_seed(5)
    return TinyBlock().eval()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6))


def masked_dense_reference(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, mask in masks.items():
        lin = ref.get_submodule(name)
        with torch.no_grad():
            lin.weight.mul_(mask)
    return ref


def assert_outputs_close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def linear_names(model):
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


def sparse_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, SparseLinear)}


# ------------------------------------------------------------------ default
def test_swaps_eligible_and_reports_skipped(model, ids):
    magnitude = {n: nm_mask(model.get_submodule(n).weight.detach().abs()) for n in PROJ + MLP}
    ref = masked_dense_reference(model, magnitude)
    rep = sparsify(model)
    assert isinstance(rep, SparsifyReport)
    assert sorted(rep.swapped) == sorted(PROJ + MLP)
    assert set(rep.skipped) == {"odd", "head"}
    assert "in_features=6" in rep.skipped["odd"] and "multiple of 4" in rep.skipped["odd"]
    assert "shared" in rep.skipped["head"] and "emb.weight" in rep.skipped["head"]
    assert sparse_names(model) == set(PROJ + MLP)
    assert linear_names(model) == {"odd", "head"}
    assert model.head.weight is model.emb.weight  # the tie is intact
    for n in PROJ + MLP:
        assert torch.equal(model.get_submodule(n).mask(), magnitude[n])
    # bytes: fp32 values (K/2 x 4 bytes) + K/8 metadata bytes per row = 0.53125 x dense
    dense = sum(ref.get_submodule(n).weight.numel() * 4 for n in PROJ + MLP)
    assert rep.dense_bytes == dense
    assert rep.sparse_bytes * 32 == dense * 17
    text = str(rep)
    assert "swapped 6" in text and "skipped odd" in text and "skipped head" in text
    with torch.no_grad():
        assert_outputs_close(model(ids), ref(ids))


def test_bias_and_no_bias_layers_keep_their_bias(model):
    sparsify(model)
    assert model.attn.o_proj.bias is None
    assert model.attn.q_proj.bias is not None


def test_tied_linear_pair_and_shared_module_skipped():
    torch.manual_seed(0)
    m = nn.Module()
    m.a = nn.Linear(8, 8)
    m.b = nn.Linear(8, 8)
    m.b.weight = m.a.weight
    shared = nn.Linear(8, 4)
    m.c = shared
    m.d = shared  # the same module under two names
    m.e = nn.Linear(8, 4)
    rep = sparsify(m)
    assert rep.swapped == ["e"]
    assert "b.weight" in rep.skipped["a"] and "a.weight" in rep.skipped["b"]
    assert "d.weight" in rep.skipped["c"]
    assert type(m.a) is nn.Linear and type(m.b) is nn.Linear and m.c is shared and m.d is shared


def test_second_sparsify_is_a_no_op(model):
    sparsify(model)
    before = {n: id(m) for n, m in model.named_modules()}
    rep = sparsify(model)
    assert rep.swapped == []
    assert {n: id(m) for n, m in model.named_modules()} == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models(model, ids, dtype):
    model.to(dtype)
    magnitude = {n: nm_mask(model.get_submodule(n).weight.detach().abs()) for n in PROJ + MLP}
    ref = masked_dense_reference(model, magnitude)
    rep = sparsify(model)
    assert sorted(rep.swapped) == sorted(PROJ + MLP)
    assert all(model.get_submodule(n).values.dtype == dtype for n in rep.swapped)
    with torch.no_grad():
        assert_outputs_close(model(ids), ref(ids), rtol=5e-2, atol=5e-2)


def test_float64_is_skipped_with_reason():
    m = nn.Sequential(nn.Linear(8, 8).double(), nn.Linear(8, 4))
    rep = sparsify(m)
    assert rep.swapped == ["1"]
    assert "float64" in rep.skipped["0"]


# ------------------------------------------------------------------ selection
def test_targets_suffix(model):
    rep = sparsify(model, targets="q_proj")
    assert rep.swapped == ["attn.q_proj"]
    assert rep.skipped == {}
    assert sparse_names(model) == {"attn.q_proj"}


def test_targets_list_and_exact(model):
    rep = sparsify(model, targets=["q_proj", "mlp.down_proj", "odd"])
    assert sorted(rep.swapped) == ["attn.q_proj", "mlp.down_proj"]
    assert set(rep.skipped) == {"odd"}


def test_targets_glob(model, ids):
    magnitude = {n: nm_mask(model.get_submodule(n).weight.detach().abs()) for n in MLP}
    ref = masked_dense_reference(model, magnitude)
    rep = sparsify(model, targets="mlp.*")
    assert sorted(rep.swapped) == sorted(MLP)
    assert sparse_names(model) == set(MLP)
    rep2 = sparsify(model, targets="*_proj")
    assert sorted(rep2.swapped) == sorted(PROJ)
    with torch.no_grad():
        out = model(ids)
    ref_all = masked_dense_reference(
        ref, {n: nm_mask(ref.get_submodule(n).weight.detach().abs()) for n in PROJ}
    )
    with torch.no_grad():
        assert_outputs_close(out, ref_all(ids))


def test_targets_matching_nothing(model):
    rep = sparsify(model, targets="no_such_layer")
    assert rep.swapped == [] and rep.skipped == {}
    assert sparse_names(model) == set()


def test_exclude(model):
    rep = sparsify(model, exclude=["k_proj", "mlp.*"])
    assert sorted(rep.swapped) == ["attn.o_proj", "attn.q_proj", "attn.v_proj"]
    assert rep.skipped["attn.k_proj"] == "excluded by name"
    assert rep.skipped["mlp.up_proj"] == "excluded by name"
    assert rep.skipped["mlp.down_proj"] == "excluded by name"
    assert type(model.attn.k_proj) is nn.Linear
    rep = sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), exclude="0")
    assert rep.swapped == ["1"] and rep.skipped == {"0": "excluded by name"}


def test_name_matches():
    assert name_matches("model.layers.0.q_proj", "q_proj")
    assert name_matches("q_proj", "q_proj")
    assert not name_matches("model.layers.0.xq_proj", "q_proj")
    assert name_matches("model.layers.0.mlp.up", "*.mlp.*")
    assert not name_matches("model.layers.0.attn.up", "*.mlp.*")
    assert name_matches("layers.3.mlp.up_proj", "mlp.up_proj")


# ------------------------------------------------------------------ masks
def test_masks_are_honoured(model, ids):
    g = torch.Generator().manual_seed(9)
    masks = {
        "attn.q_proj": nm_mask(torch.rand(D, D, generator=g)),
        "mlp.down_proj": nm_mask(torch.rand(D, HIDDEN, generator=g)) & (torch.rand(D, HIDDEN, generator=g) > 0.3),
    }
    ref = masked_dense_reference(model, masks)
    rep = sparsify(model, masks=masks)
    assert sorted(rep.swapped) == ["attn.q_proj", "mlp.down_proj"]
    for n in PROJ + MLP:
        if n not in masks:
            assert rep.skipped[n] == "no mask given for this layer"
            assert type(model.get_submodule(n)) is nn.Linear
    assert torch.equal(model.attn.q_proj.mask(), masks["attn.q_proj"])
    assert torch.equal(model.mlp.down_proj.weight.detach(), ref.mlp.down_proj.weight.detach())
    with torch.no_grad():
        assert_outputs_close(model(ids), ref(ids))


@pytest.mark.parametrize("bad", ["attn.q", "emb", "attn", "nope.q_proj"])
def test_unknown_mask_names_raise_before_modifying(model, bad):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = {n: id(m) for n, m in model.named_modules()}
    masks = {"attn.q_proj": nm_mask(torch.rand(D, D)), bad: torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ValueError) as ei:
        sparsify(model, masks=masks)
    assert bad in str(ei.value)
    assert {n: id(m) for n, m in model.named_modules()} == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_bad_mask_raises_before_modifying(model):
    modules = {n: id(m) for n, m in model.named_modules()}
    masks = {"attn.q_proj": nm_mask(torch.rand(D, D)), "attn.v_proj": torch.ones(D, D, dtype=torch.bool)}
    with pytest.raises(ValueError, match="2:4"):
        sparsify(model, masks=masks)
    assert {n: id(m) for n, m in model.named_modules()} == modules
    with pytest.raises(ValueError, match="shape"):
        sparsify(model, masks={"attn.q_proj": torch.ones(D, 8, dtype=torch.bool)})
    assert {n: id(m) for n, m in model.named_modules()} == modules


def test_training_after_sparsify(model, ids):
    sparsify(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    metas = {n: m.meta.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    target = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        logits, _ = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert torch.equal(m.meta, metas[n])
            assert m.values.grad is not None
