"""Shared fixtures, helpers and hypothesis strategies for the semisparse tests.

Run with: ``SEMISPARSE_LIB_DIR=build/dev PYTHONPATH=python python -m pytest tests -q``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import semisparse
from semisparse import _native

settings.register_profile(
    "semisparse",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile("semisparse")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------ helpers
def native_loaded() -> bool:
    return semisparse.native_status()["cpu"].loaded


def random_24(
    n: int,
    k: int,
    dtype: torch.dtype = torch.float32,
    *,
    generator: torch.Generator | None = None,
    underfill: float = 0.0,
    neg_zero: bool = False,
) -> torch.Tensor:
    """A random 2:4-sparse ``[n, k]`` tensor. ``underfill`` is the probability that a kept
    entry is zeroed too (groups with 0 or 1 non-zeros); ``neg_zero`` writes the pruned
    entries as -0.0 instead of +0.0."""
    w = torch.randn(n, k, generator=generator, dtype=torch.float64)
    # keep away from zero so no kept value rounds to zero in 16-bit dtypes
    w = torch.where(w.abs() < 1e-2, torch.full_like(w, 0.5), w)
    keep = semisparse.nm_mask(torch.rand(n, k, generator=generator), 2, 4)
    if underfill > 0:
        keep &= torch.rand(n, k, generator=generator) >= underfill
    zero = torch.tensor(-0.0 if neg_zero else 0.0, dtype=torch.float64)
    return torch.where(keep, w, zero).to(dtype)


def canon_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with -0.0 replaced by +0.0 (exact otherwise)."""
    return torch.where(t == 0, torch.zeros((), dtype=t.dtype), t)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float tensor, for bit-exact comparisons (-0.0 != +0.0)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    return t.contiguous().view(view)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(bits(a), bits(b))


def linear_tol(dtype: torch.dtype, k: int) -> tuple[float, float]:
    """(rtol, atol) for comparing sparse24_linear with linear_reference; errors scale with
    the magnitude of the result, roughly sqrt(K) for unit-variance inputs."""
    scale = max(1.0, (k / 2) ** 0.5)
    if dtype == torch.float64:
        return 1e-10, 1e-10 * scale
    if dtype == torch.float32:
        return 1e-4, 1e-4 * scale
    if dtype == torch.bfloat16:
        return 2e-2, 2e-2 * scale
    return 5e-3, 5e-3 * scale  # float16


# ----------------------------------------------------------------- fixtures
ISAS = ("scalar", "avx2_fma", "avx512_bf16")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per CPU SIMD path; restore ``auto`` afterwards."""
    name = request.param
    if not native_loaded():
        pytest.skip("native CPU library not loaded: no SIMD paths to choose from")
    try:
        semisparse.set_cpu_isa(name)
    except ValueError:
        pytest.skip(f"this CPU/build cannot run {name} (best: {_native.cpu_isa_best()})")
    try:
        assert semisparse.cpu_isa() == name
        yield name
    finally:
        semisparse.set_cpu_isa("auto")


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(1234)
    return g


@pytest.fixture(autouse=True)
def _restore_isa_and_seed():
    """Every test starts from the auto SIMD path and a fixed seed."""
    torch.manual_seed(0)
    yield
    if native_loaded() and semisparse.cpu_isa() != _native.cpu_isa_best():
        semisparse.set_cpu_isa("auto")


# --------------------------------------------------------------- strategies
@st.composite
def sparse24_dense(draw, dtypes=DTYPES, max_n: int = 70, max_k: int = 300):
    """A dense 2:4 tensor: N in 1..max_n (odd included), K a multiple of 4 in 4..max_k,
    groups holding 0, 1 or 2 non-zeros, pruned entries of either zero sign."""
    n = draw(st.integers(1, max_n))
    k = 4 * draw(
        st.one_of(
            st.integers(1, max_k // 4),
            st.sampled_from([1, 3, 5, 9, 13, 25, 33, 75]),  # K%8==4, K%16!=0
        )
    )
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    underfill = draw(st.sampled_from([0.0, 0.25, 0.6, 1.0]))
    neg_zero = draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    return random_24(n, k, dtype, generator=g, underfill=underfill, neg_zero=neg_zero)


def tiny_llama_dir(tmp_path_factory, train_sentences: int, test_sentences: int):
    """A tiny Llama (word-level tokenizer, 2 layers, hidden 32, GQA) saved with
    save_pretrained under ``<tmp>/model``, plus ``train.txt`` / ``test.txt`` of the demo's
    synthetic language; the folder ``<tmp>``. Shared by the CLI tests' fixtures."""
    import transformers

    from semisparse.demo.language import generate_corpus, word_tokenizer

    tok = word_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=None, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("llama")
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    (d / "train.txt").write_text(generate_corpus(train_sentences, seed=0))
    (d / "test.txt").write_text(generate_corpus(test_sentences, seed=1))
    return d


def cuda_skip_reason(kernel: str | None = None) -> str | None:
    """Why the CUDA tests of a module cannot run here (no device, no native CUDA library,
    or the library has no CUDA kernel for op ``semisparse::<kernel>``), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    st = semisparse.native_status()["cuda"]
    if not st.loaded:
        return f"native CUDA library not loaded: {st.reason}"
    if kernel and not torch._C._dispatch_has_kernel_for_dispatch_key(f"semisparse::{kernel}", "CUDA"):
        return f"the loaded CUDA library has no {kernel} kernel"
    return None
