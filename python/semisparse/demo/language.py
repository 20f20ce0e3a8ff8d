"""A synthetic language with real structure, generated here (nothing is downloaded).

Sentences come from a small probabilistic grammar whose regularities a small model can
learn and then lose when it is pruned:

* subject-verb agreement in number, also across a relative clause
  ("the red cats that see a dog run .");
* selectional preferences: each verb takes objects from its own noun class;
* adjectives before nouns, prepositional phrases after them;
* closed-form facts: "three plus fourteen is seventeen ." (256 sums to learn by heart,
  the part that most needs the model's capacity);
* copies: "say blue fox blue fox ." repeats a phrase (in-context recall).

`generate_corpus(n_sentences, seed)` returns the text; `word_tokenizer(text)` builds a
word-level tokenizer (transformers.PreTrainedTokenizerFast, saved with the model).
"""

from __future__ import annotations

import random

__all__ = ["generate_corpus", "word_tokenizer", "VOCAB"]

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
            "nineteen"]
_TENS = ["", "", "twenty", "thirty"]
_SUM_RANGE = 16   # addends 0..15: 256 facts to learn
_P_SUM = 0.4      # share of sentences that are sums


def _num(v: int) -> list[str]:
    if v < 20:
        return [_NUMBERS[v]]
    t, u = divmod(v, 10)
    return [_TENS[t]] + ([_NUMBERS[u]] if u else [])
# noun classes: singular -> plural
_ANIMALS = {"cat": "cats", "dog": "dogs", "fox": "foxes", "bird": "birds", "horse": "horses", "mouse": "mice"}
_FOODS = {"apple": "apples", "bread": "breads", "cake": "cakes", "fish": "fishes", "seed": "seeds"}
_PLACES = {"house": "houses", "garden": "gardens", "river": "rivers", "hill": "hills", "field": "fields"}
_TOOLS = {"key": "keys", "box": "boxes", "rope": "ropes", "lamp": "lamps", "cup": "cups"}
# verbs: (3rd person singular, plural) and the noun class of their object (None: intransitive)
_VERBS = [
    (("sees", "see"), "animals"), (("chases", "chase"), "animals"), (("eats", "eat"), "foods"),
    (("likes", "like"), "foods"), (("visits", "visit"), "places"), (("leaves", "leave"), "places"),
    (("holds", "hold"), "tools"), (("finds", "find"), "tools"), (("runs", "run"), None),
    (("sleeps", "sleep"), None), (("sings", "sing"), None),
]
_CLASSES = {"animals": _ANIMALS, "foods": _FOODS, "places": _PLACES, "tools": _TOOLS}
_ADJ = ["red", "blue", "small", "big", "old", "young", "green", "quiet"]
_PREP = ["near", "under", "behind", "beside"]
_DET_SG = ["the", "a", "this", "that"]
_DET_PL = ["the", "some", "these", "those", "two", "three"]

VOCAB = sorted(
    set(_NUMBERS) | {"twenty", "thirty"} | set(_ADJ) | set(_PREP) | set(_DET_SG) | set(_DET_PL)
    | {w for c in _CLASSES.values() for pair in c.items() for w in pair}
    | {w for (forms, _) in _VERBS for w in forms}
    | {"plus", "is", "say", "that", ".", "and"}
)


def _np(rng: random.Random, cls: str, plural: bool, depth: int) -> list[str]:
    nouns = _CLASSES[cls]
    sg = rng.choice(sorted(nouns))
    words = [rng.choice(_DET_PL if plural else _DET_SG)]
    if rng.random() < 0.4:
        words.append(rng.choice(_ADJ))
    words.append(nouns[sg] if plural else sg)
    if depth == 0 and rng.random() < 0.2:
        words += [rng.choice(_PREP)] + _np(rng, "places", rng.random() < 0.5, depth + 1)
    return words


def _vp(rng: random.Random, plural: bool, depth: int) -> list[str]:
    forms, obj = rng.choice(_VERBS)
    words = [forms[1] if plural else forms[0]]
    if obj is not None:
        words += _np(rng, obj, rng.random() < 0.5, depth + 1)
    return words


def _sentence(rng: random.Random) -> list[str]:
    r = rng.random()
    if r < _P_SUM:
        a, b = rng.randrange(_SUM_RANGE), rng.randrange(_SUM_RANGE)
        return _num(a) + ["plus"] + _num(b) + ["is"] + _num(a + b) + ["."]
    if r < _P_SUM + 0.1:
        phrase = [rng.choice(_ADJ), rng.choice(sorted(_ANIMALS))]
        return ["say"] + phrase + phrase + ["."]
    plural = rng.random() < 0.5
    subj = _np(rng, "animals", plural, 0)
    if rng.random() < 0.35:  # relative clause between subject and verb
        subj += ["that"] + _vp(rng, plural, 1)  # the clause agrees with its head noun
    words = subj + _vp(rng, plural, 0)
    if rng.random() < 0.15:
        words += ["and"] + _vp(rng, plural, 0)
    return words + ["."]


def generate_corpus(n_sentences: int, seed: int = 0) -> str:
    """``n_sentences`` sentences of the language, space-separated words, one per line."""
    rng = random.Random(seed)
    return "\n".join(" ".join(_sentence(rng)) for _ in range(n_sentences))


def word_tokenizer():
    """A word-level tokenizer over VOCAB (plus <unk>, <eos>), as a PreTrainedTokenizerFast:
    newlines become <eos> so sentences are separated in the token stream."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for w in VOCAB:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("\n", " <eos> ")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
