"""semisparse.eval: sliding-window perplexity and hidden-state fidelity."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semisparse.eval import fidelity, perplexity, perplexity_windows

V = 48


class Bigram(nn.Module):
    """logits[t] depend on token t only: perplexity does not depend on the context given."""

    def __init__(self, vocab=V):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        self.drop = nn.Dropout(0.5)

    def forward(self, ids):
        return SimpleNamespace(logits=self.drop(self.table(ids)))


class Uniform(nn.Module):
    def __init__(self, vocab=V):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab) * self.dummy


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=False).eval()


def tokens(n, seed=0, vocab=V):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def hand_ppl(logits_list, targets_list) -> float:
    """exp(sum of per-token CE (float32, summed in float64) / count), the documented rule."""
    nll, count = torch.zeros((), dtype=torch.float64), 0
    for lg, tg in zip(logits_list, targets_list):
        nll += F.cross_entropy(lg.float(), tg, reduction="none").double().sum()
        count += tg.numel()
    return math.exp(nll.item() / count)


# ------------------------------------------------------------------ windows
@pytest.mark.parametrize("length, seqlen, stride", [(10, 4, 4), (10, 4, 2), (9, 4, 3), (5, 8, 8), (12, 4, 1), (8, 4, 4)])
def test_windows_score_each_token_once(length, seqlen, stride):
    scored = []
    for b, e, first in perplexity_windows(length, seqlen, stride):
        assert e - b <= seqlen and b < first <= e
        scored += range(first, e)
    assert len(scored) == len(set(scored)) and 0 not in scored
    if stride < seqlen:
        assert sorted(scored) == list(range(1, length))
    else:  # non-overlapping windows: each window's first token has no context
        starts = {b for b, _, _ in perplexity_windows(length, seqlen, stride)}
        assert sorted(scored) == [t for t in range(length) if t not in starts]


# --------------------------------------------------------------- perplexity
def test_uniform_logits_give_vocab_size():
    assert perplexity(Uniform(), tokens(50), seqlen=16, progress=False) == pytest.approx(V, rel=1e-6)
    assert perplexity(Uniform(), tokens(50), seqlen=16, stride=5, progress=False) == pytest.approx(V, rel=1e-6)


def test_llama_one_window_is_whole_sequence_cross_entropy(llama):
    ids = tokens(40)
    with torch.no_grad():
        logits = llama(ids).logits[0]
    want = hand_ppl([logits[:-1]], [ids[0, 1:]])
    assert perplexity(llama, ids, seqlen=40, progress=False) == want
    assert perplexity(llama, ids, seqlen=64, progress=False) == want
    assert perplexity(llama, ids[0], seqlen=64, progress=False) == want  # 1-D tokens
    assert want == pytest.approx(math.exp(F.cross_entropy(logits[:-1], ids[0, 1:]).item()), rel=1e-6)


@pytest.mark.parametrize("seqlen, stride", [(16, 16), (16, 6), (16, 1), (12, 12)])
def test_llama_sliding_windows_by_hand(llama, seqlen, stride):
    ids = tokens(40, seed=1)
    lgs, tgs = [], []
    with torch.no_grad():
        for b, e, first in perplexity_windows(40, seqlen, stride):
            logits = llama(ids[:, b:e]).logits[0]
            lgs.append(logits[first - 1 - b : e - 1 - b])
            tgs.append(ids[0, first:e])
    want = hand_ppl(lgs, tgs)
    got = perplexity(llama, ids, seqlen=seqlen, stride=stride, progress=False)
    assert got == pytest.approx(want, rel=1e-12)
    # batching windows gives the same result (up to float reordering)
    assert perplexity(llama, ids, seqlen=seqlen, stride=stride, batch_size=3, progress=False) == pytest.approx(
        want, rel=1e-5
    )


def test_bigram_context_free_model_is_window_invariant():
    torch.manual_seed(0)
    model = Bigram()
    ids = tokens(57, seed=2)
    full = perplexity(model, ids, seqlen=64, progress=False)
    for seqlen, stride in [(8, 4), (8, 1), (16, 5), (57, 7)]:
        assert perplexity(model, ids, seqlen=seqlen, stride=stride, progress=False) == pytest.approx(full, rel=1e-12)
    # non-overlapping windows skip the first token of every window
    with torch.no_grad():
        lg = model.eval().table(ids[0])
    keep = [t for t in range(1, 57) if t % 8 != 0]
    want = hand_ppl([lg[[t - 1 for t in keep]]], [ids[0, keep]])
    assert perplexity(model, ids, seqlen=8, progress=False) == pytest.approx(want, rel=1e-12)


def test_multiple_rows_are_independent_sequences():
    torch.manual_seed(0)
    model = Bigram().eval()
    a, b = tokens(20, seed=3), tokens(20, seed=4)
    with torch.no_grad():
        la, lb = model.table(a[0]), model.table(b[0])
    want = hand_ppl([la[:-1], lb[:-1]], [a[0, 1:], b[0, 1:]])
    assert perplexity(model, torch.cat([a, b]), seqlen=32, progress=False) == pytest.approx(want, rel=1e-12)
    assert perplexity(model, torch.cat([a, b]), seqlen=32, batch_size=2, progress=False) == pytest.approx(want, rel=1e-12)


def test_perplexity_eval_mode_restored():
    torch.manual_seed(0)
    model = Bigram().train()
    ids = tokens(30)
    p1 = perplexity(model, ids, seqlen=8, progress=False)
    assert model.training  # restored
    assert perplexity(model, ids, seqlen=8, progress=False) == p1  # dropout was off: deterministic


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"seqlen": 1}, ValueError, "seqlen must be an integer >= 2"),
    ({"stride": 0}, ValueError, "stride must be an integer in 1..seqlen"),
    ({"stride": 17}, ValueError, "stride must be an integer in 1..seqlen=16"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ({"tokens": torch.rand(1, 10)}, TypeError, "integer token ids"),
    ({"tokens": torch.zeros(1, 2, 3, dtype=torch.long)}, ValueError, r"\[T\] or \[N, T\]"),
    ({"tokens": torch.zeros(1, 1, dtype=torch.long)}, ValueError, "at least 2 tokens"),
    ({"tokens": [1, 2, 3]}, TypeError, "must be a LongTensor"),
])
def test_perplexity_bad_arguments(kwargs, exc, match):
    args = {"tokens": tokens(20), "seqlen": 16} | kwargs
    with pytest.raises(exc, match=match):
        perplexity(Uniform(), progress=False, **args)


def test_perplexity_needs_logits():
    class NoLogits(nn.Module):
        def forward(self, ids):
            return {"hidden": ids}

    with pytest.raises(TypeError, match="expected an output with .logits"):
        perplexity(NoLogits(), tokens(10), seqlen=8, progress=False)


# ----------------------------------------------------------------- fidelity
def test_fidelity_of_a_model_with_itself_is_one(bert, llama):
    ids = tokens(40).reshape(2, 20)
    assert fidelity(bert, bert, ids, progress=False) == pytest.approx(1.0, abs=1e-12)
    assert fidelity(bert, copy.deepcopy(bert), ids, seqlen=8, batch_size=2, progress=False) == pytest.approx(1.0, abs=1e-12)
    # a causal LM has no last_hidden_state: hidden_states[-1] is used
    assert fidelity(llama, llama, ids, progress=False) == pytest.approx(1.0, abs=1e-12)


def test_fidelity_of_a_pruned_model_by_hand(bert):
    pruned = copy.deepcopy(bert)
    with torch.no_grad():
        for m in pruned.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(torch.rand_like(m.weight) > 0.5)
    ids = tokens(30)
    with torch.no_grad():
        a = pruned(ids).last_hidden_state
        b = bert(ids).last_hidden_state
    want = F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()
    got = fidelity(pruned, bert, ids, progress=False)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0 < got < 1


def test_fidelity_batches_with_attention_mask(bert):
    pruned = copy.deepcopy(bert)
    with torch.no_grad():
        pruned.encoder.layer[0].intermediate.dense.weight.zero_()
    ids = tokens(16).reshape(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        a = pruned(input_ids=ids, attention_mask=mask).last_hidden_state
        b = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1)[mask.bool()]
    got = fidelity(pruned, bert, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert got == pytest.approx(cos.mean().item(), rel=1e-12)
    # a list of tensors: every position counts
    assert fidelity(pruned, bert, [ids[:1], ids[1:]], progress=False) == pytest.approx(
        fidelity(pruned, bert, ids, progress=False), rel=1e-12
    )


def test_fidelity_errors(bert):
    class Other(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 7)

    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(bert, Other(), tokens(8), progress=False)
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        fidelity(bert, bert, [{"attention_mask": torch.ones(1, 4)}], progress=False)
    with pytest.raises(TypeError, match="not one dict"):
        fidelity(bert, bert, {"input_ids": tokens(4)}, progress=False)
    with pytest.raises(ValueError, match="no tokens"):
        fidelity(bert, bert, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fidelity(bert, bert, tokens(4), batch_size=0, progress=False)
