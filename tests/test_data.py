"""semisparse.data: text sources, calibration windows, evaluation tokens."""

from __future__ import annotations

import json
import time

import pytest
import torch

from semisparse.data import calibration_samples, eval_tokens, load_text, parse_dataset_spec, tokenize

WORDS = "the cat sat on a mat and the dog ran to the red house by the old river".split()


def corpus(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    lines = [" ".join(WORDS[i] for i in idx[s : s + 12]) for s in range(0, n_words, 12)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A word-level tokenizer trained here on a small text, as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([corpus(400)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", model_max_length=16)


def char_tokenizer(text: str) -> list[int]:
    return [ord(c) % 97 for c in text]


# ---------------------------------------------------------------- load_text
def test_load_text_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello\nworld\n", encoding="utf-8")
    assert load_text(f) == "hello\nworld\n"
    assert load_text(str(f)) == "hello\nworld\n"


def test_load_text_folder_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes").write_text("no suffix")  # plain text without an extension counts
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("nested")
    (tmp_path / "empty.txt").write_text("")  # skipped
    (tmp_path / ".hidden.txt").write_text("hidden")  # skipped
    assert load_text(tmp_path) == "first\n\nsecond\n\nno suffix\n\nnested"


def test_load_text_folder_skips_binary_with_warning(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02")
    with pytest.warns(UserWarning, match="b.bin"):
        assert load_text(tmp_path) == "text"


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "holds no files"),
        (lambda d: (d / "a.txt").write_text("  \n"), "no non-empty plain-text files"),
        (lambda d: (d / ".x.txt").write_text("hidden only"), "holds no files"),
    ],
)
def test_load_text_bad_folders(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_text(tmp_path)


def test_load_text_folder_of_binaries(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not UTF-8 text"):
        load_text(tmp_path)


def test_load_text_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder.*missing.txt"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not a plain UTF-8 text file"):
        load_text(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="source is empty"):
        load_text("")
    with pytest.raises(TypeError, match="source must be a path"):
        load_text(3)


def test_parse_dataset_spec():
    s = parse_dataset_spec("wikitext2")
    assert s.config == "wikitext-2-raw-v1" and s.split == "train" and s.field == "text"
    assert "wikitext" in s.names
    assert parse_dataset_spec("wikitext-2:test").split == "test"
    assert parse_dataset_spec("wikitext2", split="validation").split == "validation"
    c4 = parse_dataset_spec("c4:validation")
    assert c4.names == ("allenai/c4",) and c4.data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    h = parse_dataset_spec("hf:org/name:cfg:test:content")
    assert (h.names, h.config, h.split, h.field) == (("org/name",), "cfg", "test", "content")
    h = parse_dataset_spec("hf:org/name::validation")
    assert (h.config, h.split, h.field) == (None, "validation", "text")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("hf:", "non-empty NAME"),
        ("hf:a:b:c:d:e", "hf:NAME"),
        ("wikitext2:dev", "splits train, validation, test"),
        ("wikitext2:test:text", "more parts"),
        ("c4:test", "c4 has splits train, validation"),
        ("imagenet", "unknown dataset spec"),
    ],
)
def test_parse_dataset_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_dataset_spec(spec)


def test_dataset_spec_split_conflict():
    with pytest.raises(ValueError, match="names split 'test' but split='train'"):
        parse_dataset_spec("wikitext2:test", split="train")


def test_unknown_source_is_not_found():
    with pytest.raises(FileNotFoundError, match="not a dataset spec"):
        load_text("imagenet")


@pytest.mark.parametrize("spec", ["wikitext2", "c4:validation", "hf:nonexistent-org-xyz/nothing"])
def test_dataset_not_cached_fails_fast(tmp_path, spec):
    pytest.importorskip("datasets")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local cache.*download=True"):
        load_text(spec, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 10  # offline: no network retries


def test_hf_local_dataset_folder(tmp_path):
    pytest.importorskip("datasets")
    data = tmp_path / "mydata"
    data.mkdir()
    rows = [{"text": f"row {i}", "body": f"body {i}"} for i in range(4)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cache = tmp_path / "cache"
    assert load_text(f"hf:{data}", cache_dir=cache) == "row 0\n\nrow 1\n\nrow 2\n\nrow 3"
    assert load_text(f"hf:{data}::train:body", cache_dir=cache).startswith("body 0\n\nbody 1")
    with pytest.raises(ValueError, match=r"no column 'nope'.*\['text', 'body'\]"):
        load_text(f"hf:{data}:::nope", cache_dir=cache)


# --------------------------------------------------------------- tokenizing
def test_tokenize_kinds(hf_tokenizer):
    text = corpus(50)
    ids = tokenize(text, hf_tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == hf_tokenizer(text)["input_ids"]
    # a raw tokenizers.Tokenizer and a plain function
    assert torch.equal(tokenize(text, hf_tokenizer.backend_tokenizer), ids)
    assert tokenize("abc", char_tokenizer).tolist() == [0, 1, 2]
    assert tokenize("abc", lambda s: {"input_ids": [1, 2]}).tolist() == [1, 2]
    assert tokenize("abc", lambda s: torch.tensor([[5, 6]])).tolist() == [5, 6]


def test_tokenize_long_text_is_not_truncated(hf_tokenizer):
    text = corpus(200)  # far beyond model_max_length=16
    assert tokenize(text, hf_tokenizer).numel() == len(text.split())


def test_tokenize_errors():
    with pytest.raises(TypeError, match="must be ints"):
        tokenize("abc", lambda s: [1.5, 2.0])
    with pytest.raises(TypeError, match="must be integers"):
        tokenize("abc", lambda s: torch.ones(3))
    with pytest.raises(TypeError, match="without 'input_ids'"):
        tokenize("abc", lambda s: {"ids": [1]})
    with pytest.raises(TypeError, match="tokenizer must be"):
        tokenize("abc", 42)
    with pytest.raises(TypeError, match="text must be a str"):
        tokenize(b"abc", char_tokenizer)


# ----------------------------------------------------- calibration_samples
def test_calibration_samples_windows(hf_tokenizer):
    text = corpus(600)
    ids = tokenize(text, hf_tokenizer)
    out = calibration_samples(text, hf_tokenizer, nsamples=8, seqlen=16, seed=3)
    assert out.shape == (8, 16) and out.dtype == torch.long
    # every row is a window of the token stream, and windows do not overlap
    starts = []
    for row in out:
        hits = [s for s in range(ids.numel() - 15) if torch.equal(ids[s : s + 16], row)]
        assert hits
        starts.append(hits)
    # (with a repetitive corpus a row can match several places; pick a disjoint assignment)
    chosen = sorted(h[0] for h in starts)
    assert len(set(chosen)) == 8
    # same seed, same samples; another seed, others
    assert torch.equal(out, calibration_samples(text, hf_tokenizer, 8, 16, seed=3))
    assert not torch.equal(out, calibration_samples(text, hf_tokenizer, 8, 16, seed=4))


def test_calibration_samples_disjoint_positions():
    ids = torch.arange(1000)  # unique tokens: a row's first id is its start position
    for seed in range(5):
        out = calibration_samples(ids, None, nsamples=9, seqlen=100, seed=seed)
        assert torch.equal(out - out[:, :1], torch.arange(100).expand(9, 100))
        starts = out[:, 0].sort().values
        assert bool((starts[1:] - starts[:-1] >= 100).all())
        assert int(starts[-1]) <= 900


def test_calibration_samples_exact_fit_tiles():
    ids = torch.arange(64)
    out = calibration_samples(ids, None, nsamples=4, seqlen=16, seed=0)
    assert torch.equal(out[out[:, 0].argsort()], ids.reshape(4, 16))


def test_calibration_samples_other_tokenizers():
    text = "abcdefghij" * 10
    out = calibration_samples(text, char_tokenizer, nsamples=3, seqlen=10, seed=0)
    assert out.shape == (3, 10)
    assert calibration_samples([1, 2, 3, 4], None, 2, 2, seed=0).shape == (2, 2)


def test_calibration_samples_too_short(hf_tokenizer):
    text = corpus(30)
    n = tokenize(text, hf_tokenizer).numel()
    with pytest.raises(ValueError, match=rf"calibration text has {n} tokens, need nsamples x seqlen = 4 x 16 = 64"):
        calibration_samples(text, hf_tokenizer, nsamples=4, seqlen=16, seed=0)
    with pytest.raises(ValueError, match=r"has 10 tokens, need nsamples x seqlen = 1 x 11 = 11"):
        calibration_samples(torch.arange(10), None, 1, 11, seed=0)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"nsamples": 0}, ValueError, "nsamples must be a positive integer"),
    ({"seqlen": -1}, ValueError, "seqlen must be a positive integer"),
    ({"seqlen": 2.0}, ValueError, "seqlen must be a positive integer"),
    ({"seed": None}, TypeError, "seed must be an int"),
])
def test_calibration_samples_bad_arguments(kwargs, exc, match):
    args = {"nsamples": 2, "seqlen": 4, "seed": 0} | kwargs
    with pytest.raises(exc, match=match):
        calibration_samples(torch.arange(100), None, **args)


def test_calibration_samples_needs_tokenizer_for_text():
    with pytest.raises(TypeError, match="a tokenizer is needed"):
        calibration_samples("some text", None, 1, 2, seed=0)


# ---------------------------------------------------------------- eval_tokens
def test_eval_tokens(hf_tokenizer):
    text = corpus(100)
    t = eval_tokens(text, hf_tokenizer)
    assert t.shape == (1, 100) and t.dtype == torch.long
    assert t[0].tolist() == hf_tokenizer(text)["input_ids"]
    assert eval_tokens("ab", char_tokenizer).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="no tokens"):
        eval_tokens("", char_tokenizer)
    with pytest.raises(ValueError, match="1-D sequence"):
        eval_tokens(torch.zeros(2, 3, dtype=torch.long), None)
