"""One-shot pruning: magnitude, Wanda, SparseGPT (semisparse.prune)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import semisparse
from semisparse import nm_mask, parse_pattern, prune
from semisparse.pruning import find_blocks, sparsegpt_prune, wanda_mask
from semisparse.pruning.patterns import SparsityPattern

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 100


# ------------------------------------------------------------- tiny models
def _llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))


def _qwen2(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))


def _opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=True)


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2, "opt": _opt, "bert": _bert}
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "gpt2": "transformer.h", "opt": "model.decoder.layers", "bert": "encoder.layer"}

_CACHE: dict[str, nn.Module] = {}


def tiny(kind: str) -> nn.Module:
    """A fresh copy of a tiny random model (built once per session, seeded)."""
    if kind not in _CACHE:
        torch.manual_seed(sum(map(ord, kind)))
        _CACHE[kind] = BUILDERS[kind]().eval()
    return copy.deepcopy(_CACHE[kind])


def ids(n=3, seq=12, seed=0):
    return torch.randint(2, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def calib_for(kind: str):
    x = ids()
    if kind == "bert":  # dicts of model inputs, with padding in the last sample
        am = torch.ones_like(x)
        am[-1, 9:] = 0
        return [{"input_ids": x, "attention_mask": am, "token_type_ids": torch.zeros_like(x)}]
    return x


def prunable(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def as_out_in(mask, module):
    return mask.t() if isinstance(module, Conv1D) else mask


def weight_out_in(module):
    w = module.weight.detach()
    return w.t() if isinstance(module, Conv1D) else w


def check_pattern(mask_oi: torch.Tensor, pat: SparsityPattern, method: str, blocksize: int = 128):
    rows, cols = mask_oi.shape
    if pat.structured:
        kept = mask_oi.reshape(rows, cols // pat.m, pat.m).sum(-1)
        assert bool((kept == pat.n).all()), "not exactly N kept in every group of M"
        return
    pruned = (~mask_oi).sum(1)
    if method == "wanda":  # per output row
        assert bool((pruned == round(pat.ratio * cols)).all())
    elif method == "magnitude":  # per layer
        assert int(pruned.sum()) == round(pat.ratio * rows * cols)
    else:  # per column block
        want = sum(round(pat.ratio * rows * min(blocksize, cols - c)) for c in range(0, cols, blocksize))
        assert int(pruned.sum()) == want


# ------------------------------------------------------------ every model
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured:0.3"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", list(BUILDERS))
def test_methods_patterns_models(kind, method, pattern):
    model = tiny(kind)
    before = copy.deepcopy(model.state_dict())
    masks = prune(model, method, pattern, calib=calib_for(kind))
    pat = parse_pattern(pattern)

    layers = prunable(model)
    expected = {n for n in layers if n.startswith(BLOCKS[kind] + ".")}
    assert set(masks) == expected and len(expected) >= 8
    for name, mask in masks.items():
        mod = layers[name]
        assert mask.dtype == torch.bool and mask.shape == mod.weight.shape  # the module's own layout
        check_pattern(as_out_in(mask, mod), pat, method)
        w = mod.weight.detach()
        assert bool((w[~mask] == 0).all()), f"{name}: pruned weights are not zero"
        if method != "sparsegpt":  # no weight update: kept weights unchanged
            assert torch.equal(w[mask], before[f"{name}.weight"][mask])
    # everything else (embeddings, lm_head, norms, biases, pooler) untouched
    changed = {f"{n}.weight" for n in masks}
    for key, value in model.state_dict().items():
        if key not in changed:
            assert torch.equal(value, before[key]), f"{key} changed"
    with torch.no_grad():
        out = model(ids(1, 8, seed=9))
    assert torch.isfinite(out[0]).all()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_find_blocks(kind):
    name, blocks = find_blocks(tiny(kind))
    assert name == BLOCKS[kind] and len(blocks) == 2


def test_no_block_list_prunes_every_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    masks = prune(model, "wanda", "2:4", calib=torch.randn(6, 16))
    assert set(masks) == {"0", "2"}
    for n, m in masks.items():
        check_pattern(m, parse_pattern("2:4"), "wanda")


class _Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.unused = nn.Linear(d, d)

    def forward(self, hidden_states, scale=None):
        out = hidden_states + self.down(torch.relu(self.up(hidden_states))) * scale
        return out, None  # a tuple, as older transformers blocks return


class _Custom(nn.Module):
    """Not a transformers model: blocks called with keyword arguments only, returning tuples."""

    def __init__(self, d=16, n=3):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.out = nn.Linear(d, 4)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(hidden_states=h, scale=0.5)[0]
        return self.out(h)


def test_custom_model_keyword_blocks_and_unreached_layers():
    torch.manual_seed(2)
    model = _Custom().eval()
    calib = torch.randn(4, 5, 8)  # 4 samples of 5 feature vectors
    unused = [f"blocks.{k}.unused" for k in range(3)]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="never reached.*strict=True"):
        prune(copy.deepcopy(model), "sparsegpt", "2:4", calib=calib, strict=True)
    with pytest.warns(UserWarning, match="blocks.0.unused: the calibration forward never reached it") as rec:
        masks = prune(model, "sparsegpt", "2:4", calib=calib)
    assert all(u in str(rec[-1].message) for u in unused)
    assert set(masks) == {f"blocks.{k}.{n}" for k in range(3) for n in ("up", "down")}
    for u in unused:
        assert torch.equal(model.get_submodule(u).weight, before[f"{u}.weight"])
    # the statistics of block 1 come from the pruned block 0: recompute its Hessian
    recorded = []
    h = model.blocks[1].up.register_forward_pre_hook(lambda m, a: recorded.append(a[0].reshape(-1, 16).clone()))
    with torch.no_grad():
        for row in calib:
            model(row[None])
    h.remove()
    X = torch.cat(recorded).double()
    orig = _Custom().eval()
    orig.load_state_dict(before)
    _, want_keep = reference_sparsegpt(orig.blocks[1].up.weight.detach(), X, "2:4")
    assert (masks["blocks.1.up"] == want_keep).float().mean() > 0.97  # float32 vs float64 near-ties


# ------------------------------------------------------------- magnitude
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_magnitude_equals_nm_mask(kind):
    model = tiny(kind)
    orig = {n: weight_out_in(m).clone() for n, m in prunable(model).items()}
    masks = prune(model, "magnitude", "2:4")
    for name, mask in masks.items():
        mod = model.get_submodule(name)
        assert torch.equal(as_out_in(mask, mod), nm_mask(orig[name].abs(), 2, 4))
    masks18 = prune(tiny(kind), "magnitude", "1:8")
    for name, mask in masks18.items():
        mod = model.get_submodule(name)
        assert torch.equal(as_out_in(mask, mod), nm_mask(orig[name].abs(), 1, 8))


def test_magnitude_unstructured_per_layer():
    torch.manual_seed(1)
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2, 3, -4, 5, -6, 7, -8], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]]))
    masks = prune(nn.Sequential(lin), "magnitude", "unstructured:0.5")
    # the 8 smallest |W| of the layer are the whole second row
    assert torch.equal(masks["0"], torch.tensor([[True] * 8, [False] * 8]))


# ------------------------------------------------------------------ wanda
def _hand_layer():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]))
    # two tokens; column norms ||X_j|| = [10, 1, 1, 0.1]
    x = torch.tensor([[10.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.1]])
    return nn.Sequential(lin), x


def test_wanda_hand_made_layer():
    model, x = _hand_layer()
    # scores |W| * ||X_j||: row 0 [10, 2, 3, 0.4], row 1 [40, 3, 2, 0.1]
    masks = prune(model, "wanda", "2:4", calib=x)
    assert torch.equal(masks["0"], torch.tensor([[True, False, True, False], [True, True, False, False]]))
    assert torch.equal(model[0].weight, torch.tensor([[1.0, 0, 3, 0], [4.0, 3, 0, 0]]))
    # the formula directly, and magnitude differs on the same layer
    norms = x.square().sum(0).sqrt()
    assert torch.equal(masks["0"], nm_mask(_hand_layer()[0][0].weight.abs() * norms, 2, 4))
    mag, _ = _hand_layer()
    assert not torch.equal(prune(mag, "magnitude", "2:4")["0"], masks["0"])
    # unstructured: per output row, the lowest quarter of each row's scores
    model, x = _hand_layer()
    masks = prune(model, "wanda", "unstructured:0.25", calib=x)
    assert torch.equal(masks["0"], torch.tensor([[True, True, True, False], [True, True, True, False]]))


def test_wanda_mask_function_matches_formula():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 16, generator=g)
    norms = torch.rand(16, generator=g)
    assert torch.equal(wanda_mask(w, norms, parse_pattern("2:4")), nm_mask(w.abs() * norms, 2, 4))


def test_padding_is_left_out_of_statistics():
    """A right-padded sample (attention_mask 0 on the padding) gives the statistics of the
    unpadded sequence: a causal model's real tokens do not see the padding."""
    x = ids(2, 8, seed=4)
    padded = torch.cat([x, torch.full((2, 4), 7)], 1)
    am = torch.cat([torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)], 1)
    a = prune(tiny("llama"), "wanda", "2:4", calib=x)
    b = prune(tiny("llama"), "wanda", "2:4", calib={"input_ids": padded, "attention_mask": am})
    c = prune(tiny("llama"), "wanda", "2:4", calib=padded)  # without the mask the padding counts
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_calib_forms_agree():
    x = ids(3, 10, seed=5)
    ref = prune(tiny("llama"), "sparsegpt", "2:4", calib=x)
    forms = [
        [x[:2], x[2]],
        {"input_ids": x},
        [{"input_ids": x[:1]}, {"input_ids": x[1:], "attention_mask": torch.ones_like(x[1:])}],
        (row for row in x),
    ]
    for calib in forms:
        got = prune(tiny("llama"), "sparsegpt", "2:4", calib=calib)
        assert all(torch.equal(ref[n], got[n]) for n in ref)
    got = prune(tiny("llama"), "sparsegpt", "2:4", calib=x, act_device="cpu")
    assert all(torch.equal(ref[n], got[n]) for n in ref)


# -------------------------------------------------------------- sequential
def _run_samples(model, calib):
    """Run the model on every calibration sample, one row at a time."""
    with torch.no_grad():
        if isinstance(calib, torch.Tensor):
            for row in calib:
                model(row[None])
        else:
            for d in calib:
                for i in range(d["input_ids"].shape[0]):
                    model(**{k: v[i : i + 1] for k, v in d.items()})


def _layer_inputs(model, calib, layer_names):
    """Inputs of the given modules when the (current) model runs on ``calib``, per sample."""
    seen = {n: [] for n in layer_names}
    hs = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].clone()))
          for n in layer_names]
    try:
        _run_samples(model, calib)
    finally:
        for h in hs:
            h.remove()
    return seen


def _three_block_qwen2_sliding():
    torch.manual_seed(11)
    model = _qwen2(num_hidden_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1).eval()
    assert model.config.layer_types[1:] == ["sliding_attention"] * 2
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("kind", list(BUILDERS) + ["qwen2-sliding"])
def test_sequential_blocks_see_pruned_predecessors(kind, method):
    """The inputs each block is calibrated on are those the pruned model gives it (Qwen2
    with sliding-window attention in blocks 1-2 passes a different mask to each block)."""
    model = _three_block_qwen2_sliding() if kind == "qwen2-sliding" else tiny(kind)
    blocks_name, blocks = find_blocks(model)
    dense = copy.deepcopy(model)
    calib = calib_for(kind)
    later = [f"{blocks_name}.{k}" for k in range(1, len(blocks))]
    recorded = {n: [] for n in later}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: recorded[n].append(a[0].clone()))
             for n in later]
    try:
        prune(model, method, "2:4", calib=calib)
    finally:
        for h in hooks:
            h.remove()
    pruned_in = _layer_inputs(model, calib, later)
    dense_in = _layer_inputs(dense, calib, later)
    n = len(pruned_in[later[0]])
    for name in later:
        # calls: one per sample while recording the block arguments, then the statistics
        # pass, then (all but the last block) the pass producing the next block's inputs
        stats_pass = recorded[name][n : 2 * n]
        assert len(stats_pass) == n
        for got, want, was in zip(stats_pass, pruned_in[name], dense_in[name]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, was, atol=1e-4)


def test_wanda_statistics_come_from_the_pruned_model():
    """Block 1's Wanda masks equal the formula on the inputs its layers get from the pruned
    block 0 (and the still dense block 1, on which the statistics are gathered)."""
    model = tiny("llama")
    orig = copy.deepcopy(model)
    calib = ids(3, 12, seed=7)
    masks = prune(model, "wanda", "2:4", calib=calib)
    names = [n for n in masks if n.startswith("model.layers.1.")]
    hybrid = copy.deepcopy(orig)
    hybrid.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    inputs = _layer_inputs(hybrid, calib, names)
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[n]])
        want = nm_mask(orig.get_submodule(n).weight.detach().abs() * x.square().sum(0).sqrt(), 2, 4)
        assert torch.equal(masks[n], want), n
    # and not the formula on the dense model's inputs
    dense_inputs = _layer_inputs(orig, calib, names)
    differs = 0
    for n in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in dense_inputs[n]])
        differs += not torch.equal(masks[n], nm_mask(orig.get_submodule(n).weight.detach().abs() * x.square().sum(0).sqrt(), 2, 4))
    assert differs


# --------------------------------------------------------------- sparsegpt
def reference_sparsegpt(W, X, pattern, update=True, damp=0.01, blocksize=128):
    """Dense float64 SparseGPT, column by column, no lazy blocks, written in the optimal
    brain surgeon form: the inverse Hessian of the remaining columns ``H_F^-1`` is updated
    by Gaussian elimination after every column, the saliency of ``w_j`` is
    ``w_j^2 / [H_F^-1]_jj`` and the compensation is ``W[:, F] -= (w_j - q_j) / [H_F^-1]_jj *
    H_F^-1[j, F]``. (The unstructured mask is chosen per ``blocksize`` columns, as the
    algorithm defines it.)"""
    pat = parse_pattern(pattern)
    W = W.double().clone()
    X = X.double().reshape(-1, X.shape[-1])
    rows, cols = W.shape
    H = 2.0 / X.shape[0] * X.t() @ X
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W0 = W.clone()
    W[:, dead] = 0.0
    H = H + damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    d, hrows = [], []
    for j in range(cols):  # the sequence of H_F^-1 does not depend on W
        d.append(Hinv[j, j].item())
        hrows.append(Hinv[j].clone())
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
    d = torch.tensor(d, dtype=torch.float64)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if not pat.structured and j % blocksize == 0:
            blk = slice(j, min(j + blocksize, cols))
            s = (W[:, blk].square() / d[blk]).flatten()
            k = round(pat.ratio * s.numel())
            idx = torch.topk(s, k, largest=False).indices
            p = torch.zeros(s.numel(), dtype=torch.bool)
            p[idx] = True
            pruned[:, blk] = p.reshape(rows, -1)
        if pat.structured and j % pat.m == 0:
            g = slice(j, j + pat.m)
            pruned[:, g] = ~nm_mask(W[:, g].square() / d[g], pat.n, pat.m)
        w = W[:, j].clone()
        q = torch.where(pruned[:, j], torch.zeros_like(w), w)
        W[:, j:] -= torch.outer((w - q) / d[j], hrows[j][j:])
        W[:, j] = q
    keep = ~pruned
    return (W if update else W0 * keep), keep


def _layer_data(seed, rows=16, cols=64, tokens=256, dead=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    X = (torch.randn(tokens, 8, generator=g, dtype=torch.float64) @ torch.randn(8, cols, generator=g, dtype=torch.float64)
         + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)) * scale
    if dead:
        X[:, 5] = 0.0  # a dead input
    return W, X


SGPT_CASES = [
    ("2:4", True, 128), ("2:4", True, 16), ("4:8", True, 32), ("1:4", True, 8),
    ("unstructured:0.5", True, 128), ("unstructured:0.5", True, 16),
    ("2:4", False, 16), ("unstructured:0.5", False, 32),
]


@pytest.mark.parametrize("pattern,update,blocksize", SGPT_CASES)
def test_sparsegpt_matches_dense_reference(pattern, update, blocksize):
    W, X = _layer_data(seed=SGPT_CASES.index((pattern, update, blocksize)))
    want_w, want_keep = reference_sparsegpt(W, X, pattern, update=update, blocksize=blocksize)
    # through prune(): a float64 single-Linear model, one calibration row per sample
    lin = nn.Linear(64, 16, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(W)
    model = nn.Sequential(lin)
    masks = prune(model, "sparsegpt", pattern, calib=X, update=update, blocksize=blocksize)
    assert torch.equal(masks["0"], want_keep)
    torch.testing.assert_close(lin.weight.detach(), want_w, rtol=1e-9, atol=1e-9)
    check_pattern(masks["0"], parse_pattern(pattern), "sparsegpt", blocksize)
    if update:
        assert bool((lin.weight[:, 5] == 0).all())  # the dead column is zeroed
    else:
        torch.testing.assert_close(lin.weight.detach(), W * want_keep, rtol=0, atol=0)


def test_sparsegpt_float32_close_to_reference():
    W, X = _layer_data(seed=21, dead=False)
    H = (2.0 / X.shape[0]) * X.t() @ X
    want_w, want_keep = reference_sparsegpt(W, X, "2:4", blocksize=32)
    got_w, got_keep = sparsegpt_prune(W.float(), H.float(), parse_pattern("2:4"), blocksize=32)
    assert got_w.dtype == torch.float32
    assert (got_keep == want_keep).float().mean() > 0.98  # float32 may flip a near tie
    if torch.equal(got_keep, want_keep):
        torch.testing.assert_close(got_w.double(), want_w, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.5"])
def test_sparsegpt_conv1d_layout_matches_reference(pattern):
    """GPT-2's Conv1D stores [in, out]: pruned along the input dim, mask in its own layout."""
    model = tiny("gpt2").double()
    name = "transformer.h.0.attn.c_attn"
    calib = ids()
    W = model.get_submodule(name).weight.detach().t().clone()  # [out, in]
    X = torch.cat([t.reshape(-1, t.shape[-1]) for t in _layer_inputs(model, calib, [name])[name]])
    want_w, want_keep = reference_sparsegpt(W, X, pattern)
    masks = prune(model, "sparsegpt", pattern, calib=calib, targets=name)
    assert masks[name].shape == (32, 96)
    assert torch.equal(masks[name].t(), want_keep)
    torch.testing.assert_close(model.get_submodule(name).weight.detach().t(), want_w, rtol=1e-9, atol=1e-9)


def _output_error(method, pattern, W, X, **opts):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    prune(nn.Sequential(lin), method, pattern, calib=X, **opts)
    with torch.no_grad():
        return (lin(X) - X @ W.t()).norm().item()


@pytest.mark.parametrize("pattern", ["2:4", "unstructured:0.5"])
def test_sparsegpt_output_error_below_magnitude(pattern):
    W, X = _layer_data(seed=5, rows=32, cols=64, tokens=512, dead=False)
    W, X = W.float(), X.float()
    sgpt = _output_error("sparsegpt", pattern, W, X)
    mask_only = _output_error("sparsegpt", pattern, W, X, update=False)
    wanda = _output_error("wanda", pattern, W, X)
    mag = _output_error("magnitude", pattern, W, X)
    assert sgpt < mag and sgpt < mask_only and wanda < mag, (sgpt, mask_only, wanda, mag)


def test_sparsegpt_half_precision_model():
    model = tiny("llama").to(torch.bfloat16)
    masks = prune(model, "sparsegpt", "2:4", calib=ids())
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert w.dtype == torch.bfloat16 and bool((w[~mask] == 0).all())
        check_pattern(mask, parse_pattern("2:4"), "sparsegpt")


def test_sparsegpt_not_positive_definite():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(1, 8).repeat(3, 1)  # rank 1, no damping
    with pytest.raises(ValueError, match="positive definite.*damp"):
        prune(nn.Sequential(lin), "sparsegpt", "2:4", calib=x, damp=0.0)


# ------------------------------------------------------------- bad inputs
def test_unknown_method():
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        prune(tiny("llama"), "obs", "2:4")


@pytest.mark.parametrize("bad", ["2-4", "5:4", "0:4", "2:0", "unstructured:1.5", "unstructured:0",
                                 "unstructured:1", "unstructured:abc", "unstructured", "", "2:4:8", 24, None])
def test_bad_patterns(bad):
    with pytest.raises(ValueError, match='"N:M".*unstructured'):
        parse_pattern(bad)
    with pytest.raises(ValueError, match="pattern"):
        prune(tiny("llama"), "magnitude", bad)


def test_good_patterns():
    assert parse_pattern("2:4") == SparsityPattern(n=2, m=4)
    assert parse_pattern(" 4 : 8 ") == SparsityPattern(n=4, m=8)
    assert parse_pattern("4:4").sparsity == 0.0
    assert parse_pattern("Unstructured:0.7").ratio == 0.7
    assert str(parse_pattern("unstructured:0.50")) == "unstructured:0.5"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_missing_or_bad_calib(method):
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration data"):
        prune(model, method, "2:4")
    for bad in ["some text", 3, [1, 2, 3], torch.empty(0, 4, dtype=torch.long), [], [{"attention_mask": ids()}]]:
        with pytest.raises(ValueError, match="calib"):
            prune(model, method, "2:4", calib=bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_options():
    with pytest.raises(ValueError, match="unknown option.*blocksize, damp, update"):
        prune(tiny("llama"), "sparsegpt", calib=ids(), updte=False)
    with pytest.raises(ValueError, match="valid options: none"):
        prune(tiny("llama"), "magnitude", damp=0.1)
    with pytest.raises(ValueError, match="blocksize must be a multiple of M=8"):
        prune(tiny("llama"), "sparsegpt", "4:8", calib=ids(), blocksize=12)
    with pytest.raises(ValueError, match="damp"):
        prune(tiny("llama"), "sparsegpt", calib=ids(), damp=-1)
    with pytest.raises(ValueError, match="update"):
        prune(tiny("llama"), "sparsegpt", calib=ids(), update="no")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_not_divisible_layers_warn_once_or_raise(method):
    torch.manual_seed(0)
    model = _llama(intermediate_size=66).eval()  # down_proj: in_features=66
    skipped = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="strict=True") as e:
        prune(model, method, "2:4", calib=ids(), strict=True)
    assert all(s in str(e.value) for s in skipped) and "in_features=66" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing modified
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        masks = prune(model, method, "2:4", calib=ids())
    ours = [w for w in rec if "prune:" in str(w.message)]
    assert len(ours) == 1 and all(s in str(ours[0].message) for s in skipped)
    assert not set(skipped) & set(masks) and len(masks) == 12
    for s in skipped:
        assert torch.equal(model.get_submodule(s).weight, before[f"{s}.weight"])
    # unstructured patterns have no divisibility constraint
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert len(prune(copy.deepcopy(model), method, "unstructured:0.5", calib=ids())) == 14
    assert not [w for w in rec if "prune:" in str(w.message)]


# ------------------------------------------------------- targets / exclude
def test_targets_and_exclude():
    masks = prune(tiny("llama"), "wanda", "2:4", calib=ids(), targets="q_proj")
    assert set(masks) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    masks = prune(tiny("llama"), "magnitude", "2:4", exclude=["*.mlp.*", "o_proj"])
    assert len(masks) == 6 and not any("mlp" in n or "o_proj" in n for n in masks)
    masks = prune(tiny("llama"), "magnitude", "2:4", targets="model.layers.1.*", exclude="k_proj")
    assert len(masks) == 6 and all(n.startswith("model.layers.1.") for n in masks)
    with pytest.raises(ValueError, match="match no Linear/Conv1D"):
        prune(tiny("llama"), "magnitude", "2:4", targets="nonexistent")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_target_outside_blocks_lm_head(method):
    """A layer after the blocks is calibrated on the pruned model's outputs."""
    model = tiny("llama")
    orig = copy.deepcopy(model)
    calib = ids()
    masks = prune(model, method, "2:4", calib=calib, targets=["*.mlp.*", "lm_head"])
    assert "lm_head" in masks and len(masks) == 7
    check_pattern(masks["lm_head"], parse_pattern("2:4"), method)
    assert torch.equal(model.model.embed_tokens.weight, orig.model.embed_tokens.weight)
    if method == "wanda":
        inputs = _layer_inputs(model, calib, ["lm_head"])["lm_head"]
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
        want = nm_mask(orig.lm_head.weight.abs() * x.square().sum(0).sqrt(), 2, 4)
        assert torch.equal(masks["lm_head"], want)


def test_tied_lm_head_is_skipped():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match="lm_head: its weight is shared with transformer.wte.weight"):
        masks = prune(model, "magnitude", "2:4", targets=["lm_head", "c_fc"])
    assert set(masks) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}


# ------------------------------------------------------------- restoring
def test_state_restored_after_success_and_error():
    model = tiny("llama")
    model.train()
    model.model.layers[0].eval()  # a mixed state is restored as it was
    model.config.use_cache = True
    calls = []
    user = model.model.layers[0].mlp.up_proj.register_forward_hook(lambda *a: calls.append(1))
    prune(model, "sparsegpt", "2:4", calib=ids())
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert model.config.use_cache is True
    assert calls  # the user's hook ran and is still there
    up = model.model.layers[0].mlp.up_proj
    assert list(up._forward_hooks) == [user.id] and not up._forward_pre_hooks

    def boom(*a):
        raise RuntimeError("boom")

    bad = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        prune(model, "wanda", "2:4", calib=ids())
    bad.remove()
    assert model.training and model.config.use_cache is True
    for blk in model.model.layers:
        assert "forward" not in blk.__dict__
    for m in model.modules():
        assert not m._forward_pre_hooks
    assert semisparse.prune is prune
