"""The native libraries: loading, status, SIMD path selection, ``python -m semisparse info``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import semisparse
from semisparse import _native

ISA_NAMES = {"avx512_bf16", "avx2_fma", "neon", "scalar"}


def _loaded() -> bool:
    return semisparse.native_status()["cpu"].loaded


needs_native = pytest.mark.skipif(not _loaded(), reason="native CPU library not loaded")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_native_required_in_ci():
    st = semisparse.native_status()
    assert set(st) >= {"cpu", "cuda"}
    cpu = st["cpu"]
    if os.environ.get("SEMISPARSE_REQUIRE_NATIVE") == "1":
        assert cpu.loaded, f"SEMISPARSE_REQUIRE_NATIVE=1 but the CPU library did not load: {cpu.reason}"
    if cpu.loaded:
        assert cpu.path and os.path.isfile(cpu.path) and cpu.reason is None
    else:
        assert cpu.reason, "a library that is not loaded must say why"


def test_cuda_status_says_why():
    cuda = semisparse.native_status()["cuda"]
    if torch.version.cuda is None:
        assert not cuda.loaded
        assert "CPU-only" in cuda.reason
    elif not cuda.loaded:
        assert cuda.reason


def test_status_is_cached():
    assert semisparse.native_status() is semisparse.native_status()


@needs_native
def test_cpu_kernels_registered():
    for op in ("sparse24_compress", "sparse24_decompress", "sparse24_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"semisparse::{op}", "CPU"), op


@needs_native
def test_cpu_isa_values():
    assert semisparse.cpu_isa() in ISA_NAMES
    assert _native.cpu_isa_best() in ISA_NAMES
    assert semisparse.cpu_isa() == _native.cpu_isa_best()  # "auto" (the default) picks the best


@needs_native
def test_set_cpu_isa_round_trip():
    try:
        semisparse.set_cpu_isa("scalar")
        assert semisparse.cpu_isa() == "scalar"
        best = _native.cpu_isa_best()
        semisparse.set_cpu_isa(best)
        assert semisparse.cpu_isa() == best
        semisparse.set_cpu_isa("scalar")
    finally:
        semisparse.set_cpu_isa("auto")
    assert semisparse.cpu_isa() == _native.cpu_isa_best()


@pytest.mark.parametrize("bad", ["bogus", "", "AVX2_FMA", "avx512"])
def test_set_cpu_isa_bogus(bad):
    with pytest.raises(ValueError) as ei:
        semisparse.set_cpu_isa(bad)
    assert repr(bad) in str(ei.value)
    if _loaded():
        assert semisparse.cpu_isa() == _native.cpu_isa_best()


@needs_native
def test_set_cpu_isa_unavailable():
    best = _native.cpu_isa_best()
    other = {"avx512_bf16": "neon", "avx2_fma": "avx512_bf16", "neon": "avx2_fma", "scalar": "avx2_fma"}[best]
    with pytest.raises(ValueError, match=other):
        semisparse.set_cpu_isa(other)
    assert semisparse.cpu_isa() == best


@needs_native
def test_avx512_bf16_includes_avx2():
    # the x86 paths nest: a CPU with the AVX-512 BF16 kernel can also run the AVX2 one
    if _native.cpu_isa_best() != "avx512_bf16":
        pytest.skip("no AVX-512 BF16 on this CPU")
    try:
        semisparse.set_cpu_isa("avx2_fma")
        assert semisparse.cpu_isa() == "avx2_fma"
    finally:
        semisparse.set_cpu_isa("auto")


@needs_native
def test_cpu_isa_env_var():
    r = _run_python("import semisparse; print(semisparse.cpu_isa())", SEMISPARSE_CPU_ISA="scalar")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "scalar"


@needs_native
def test_linear_identical_across_isas_on_exact_inputs():
    """Small integers: every path computes the exact result."""
    from semisparse.ops import sparse24 as ops

    g = torch.Generator().manual_seed(0)
    w = torch.randint(-3, 4, (40, 64), generator=g).float() * semisparse.nm_mask(torch.rand(40, 64, generator=g))
    x = torch.randint(-3, 4, (9, 64), generator=g).float()
    v, m = ops.compress_reference(w)
    outs = {}
    try:
        for isa in {"scalar", _native.cpu_isa_best()}:
            semisparse.set_cpu_isa(isa)
            outs[isa] = torch.ops.semisparse.sparse24_linear(x, v, m, None)
    finally:
        semisparse.set_cpu_isa("auto")
    for y in outs.values():
        assert torch.equal(y, x @ w.t())


def test_fallback_without_native_library():
    """With no library to load, the ops still work through the pure-torch references."""
    code = (
        "import torch, semisparse\n"
        "st = semisparse.native_status()['cpu']\n"
        "assert not st.loaded and 'not found' in st.reason, st\n"
        "assert semisparse.cpu_isa().startswith('none')\n"
        "w = torch.randn(8, 16); w = w * semisparse.nm_mask(w.abs())\n"
        "s = semisparse.Sparse24.from_dense(w)\n"
        "assert torch.equal(s.to_dense(), w)\n"
        "x = torch.randn(3, 16)\n"
        "y = torch.ops.semisparse.sparse24_linear(x, s.values, s.meta)\n"
        "assert torch.allclose(y, x @ w.t(), atol=1e-5)\n"
        "try:\n"
        "    semisparse.set_cpu_isa('scalar')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('set_cpu_isa without the library should raise')\n"
        "print('ok')\n"
    )
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(semisparse.__file__)))
    r = _run_python(code, SEMISPARSE_LIB_DIR="/nonexistent-semisparse-libdir", PYTHONPATH=pkg)
    if (
        r.returncode != 0
        and os.path.isfile(os.path.join(os.path.dirname(semisparse.__file__), "lib", "libsemisparse_cpu.so"))
    ):
        pytest.skip("the installed package carries its own library; cannot hide it")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_python_m_semisparse_info():
    if importlib.util.find_spec("semisparse.__main__") is None:
        pytest.skip("python/semisparse/__main__.py does not exist yet")
    r = subprocess.run(
        [sys.executable, "-m", "semisparse", "info"], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.lower()
    assert "cpu" in out and "cuda" in out
    if _loaded():
        assert semisparse.cpu_isa() in out
