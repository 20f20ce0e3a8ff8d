"""The fused Gumbel N:M mask ops (semisparse::gumbel_nm_*): Philox known answers, the native
CPU kernels against the pure-torch references under every SIMD path, opcheck, gradcheck,
determinism, the sampling distribution, torch.compile and argument checks.

Run with the native library: ``SEMISPARSE_REQUIRE_NATIVE=1 SEMISPARSE_LIB_DIR=build/dev
PYTHONPATH=python python -m pytest tests/test_gumbel_ops.py``. Without it, the tests that
compare native with reference (and the ISA variants) are skipped; the rest run on the
references.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import native_loaded
from semisparse.ops import gumbel as G

ops = torch.ops.semisparse
NM = ((2, 4), (1, 4), (4, 8), (1, 2), (3, 8))
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (seed, offset): negative, > 2**32, > 2**63 as unsigned
SEEDS = ((0, 0), (1234, 7), (-5, 2**40 + 3), (2**33 + 17, -(2**62)), (2**63 - 1, 2**32 - 1))

needs_native = pytest.mark.skipif(
    not native_loaded(), reason="native CPU library not loaded (the references are tested elsewhere)"
)


@pytest.fixture(scope="module", autouse=True)
def _require_native():
    if os.environ.get("SEMISPARSE_REQUIRE_NATIVE") == "1":
        assert native_loaded(), "SEMISPARSE_REQUIRE_NATIVE=1 but the native CPU library is not loaded"


def has_native_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"semisparse::{name}", "CPU")


# ---------------------------------------------------------------- helpers
def acc_of(*dts):
    return torch.float64 if torch.float64 in dts else torch.float32


def tol(dtype, acc):
    """(rtol, atol) for an output of ``dtype`` computed in ``acc``."""
    if acc == torch.float64 and dtype == torch.float64:
        return 1e-10, 1e-10
    return {
        torch.float64: (1e-5, 1e-5),  # fp32 accumulation written to fp64 (not used: acc is fp64 then)
        torch.float32: (1e-5, 1e-5),
        torch.bfloat16: (1.6e-2, 1e-5),
        torch.float16: (2e-3, 1e-5),
    }[dtype]


def ref_y(logits, seed, offset, tau, kappa, acc):
    y, _ = G._soft(logits, seed, offset, tau, kappa, acc)
    return y


def clear_groups(y, gap=1e-3):
    """Groups whose top-2 y differ by more than ``gap`` (relative to |y|): their argmax is not
    decided by float rounding."""
    if y.shape[1] < 2:
        return torch.ones(y.shape[0], dtype=torch.bool)
    top = y.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]) > gap * top[:, 0].abs().clamp_min(1.0)


def rand_inputs(groups, n, m, ldt, wdt, gen, lead=None):
    c = G.num_patterns(n, m)
    logits = torch.randn(groups, c, generator=gen, dtype=torch.float64).mul(2).to(ldt)
    shape = lead if lead is not None else (groups * m,)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(wdt)
    return logits, weight


# ------------------------------------------------------------------ Philox
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expect", KAT)
def test_philox_known_answers(ctr, key, expect):
    out = G.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in ctr), key)
    assert tuple(int(o.item()) for o in out) == expect


def test_reference_noise_finite_at_u_one():
    # seed 7, offset 8473436: group 0's Philox word 3 has top 24 bits all ones, where the
    # unclamped fp32 u rounds to 1 (g = +inf, a NaN softmax)
    g = G.gumbel_noise(1, 6, 7, 8473436)
    assert torch.isfinite(g).all()
    assert g[0, 3] > 15  # the largest noise value the definition can produce
    logits = torch.zeros(1, 6)
    assert torch.isfinite(G.gumbel_nm_mask_reference(logits, 7, 8473436, 1.0, 1.0, 2, 4)).all()


@needs_native
def test_native_finite_at_u_one(isa):
    logits = torch.zeros(1, 6)
    mask = ops.gumbel_nm_mask(logits, 7, 8473436, 1.0, 1.0, 2, 4)
    ref = G.gumbel_nm_mask_reference(logits, 7, 8473436, 1.0, 1.0, 2, 4)
    assert torch.isfinite(mask).all()
    torch.testing.assert_close(mask, ref, rtol=1e-5, atol=1e-6)
    hard = ops.gumbel_nm_mask(logits, 7, 8473436, 1.0, 1.0, 2, 4, True)
    assert torch.equal(hard, G.pattern_table(2, 4)[3:4])  # candidate 3 has the largest noise


@needs_native
@pytest.mark.parametrize("seed,offset", SEEDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_native_noise_equals_reference(isa, seed, offset, dtype):
    """With kappa = 0, tau = 1 and 1:8 (C = 8: two Philox blocks, patterns = identity) the
    soft mask is softmax(g): its logs give the native noise up to a per-group constant."""
    groups = 257
    logits = torch.randn(groups, 8, dtype=dtype)
    mask = ops.gumbel_nm_mask(logits, seed, offset, 1.0, 0.0, 1, 8)
    g = G.gumbel_noise(groups, 8, seed, offset, dtype=dtype)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mask, torch.softmax(g, -1), rtol=rtol, atol=rtol * 1e-2)
    lg = mask.log()
    torch.testing.assert_close(lg - lg[:, :1], g - g[:, :1], rtol=rtol, atol=10 * rtol)


# ------------------------------------------------------- native vs reference
def _check_forward(n, m, groups, ldt, wdt, hard, seed, offset, tau, kappa, gen, lead=None):
    logits, weight = rand_inputs(groups, n, m, ldt, wdt, gen, lead)
    mask = ops.gumbel_nm_mask(logits, seed, offset, tau, kappa, n, m, hard)
    mref = G.gumbel_nm_mask_reference(logits, seed, offset, tau, kappa, n, m, hard)
    wm = ops.gumbel_nm_masked_weight(weight, logits, seed, offset, tau, kappa, n, m, hard)
    wref = G.gumbel_nm_masked_weight_reference(weight, logits, seed, offset, tau, kappa, n, m, hard)
    assert mask.shape == (groups, m) and mask.dtype == ldt
    assert wm.shape == weight.shape and wm.dtype == wdt
    assert torch.isfinite(mask).all() and torch.isfinite(wm).all()
    if hard:
        # exact pattern match, except where two y are within rounding of each other
        ok = clear_groups(ref_y(logits, seed, offset, tau, kappa, acc_of(ldt)))
        assert ok.float().mean() > 0.9
        assert torch.equal(mask[ok], mref[ok])
        okw = clear_groups(ref_y(logits, seed, offset, tau, kappa, acc_of(ldt, wdt)))
        assert torch.equal(wm.reshape(-1, m)[okw], wref.reshape(-1, m)[okw])
    else:
        rt, at = tol(ldt, acc_of(ldt))
        torch.testing.assert_close(mask, mref, rtol=rt, atol=at)
        rt, at = tol(wdt, acc_of(ldt, wdt))
        torch.testing.assert_close(wm, wref, rtol=rt, atol=at * weight.double().abs().max().item())


def _check_backward(n, m, groups, ldt, wdt, seed, offset, tau, kappa, gen, lead=None):
    logits, weight = rand_inputs(groups, n, m, ldt, wdt, gen, lead)
    gmask = torch.randn(groups, m, generator=gen, dtype=torch.float64).to(ldt)
    gout = torch.randn(weight.shape, generator=gen, dtype=torch.float64).to(wdt)
    gl = ops.gumbel_nm_mask_backward(gmask, logits, seed, offset, tau, kappa, n, m)
    gref = G.gumbel_nm_mask_backward_reference(gmask, logits, seed, offset, tau, kappa, n, m)
    assert gl.shape == logits.shape and gl.dtype == ldt
    scale = abs(kappa / tau) * 4  # |dy| <= kappa/tau * 2 max|dp|, |dp| <= n max|g|
    rt, at = tol(ldt, acc_of(ldt))
    torch.testing.assert_close(gl, gref, rtol=rt, atol=at * scale)
    gw = ops.gumbel_nm_masked_weight_backward(gout, weight, logits, seed, offset, tau, kappa, n, m)
    gwref = G.gumbel_nm_masked_weight_backward_reference(gout, weight, logits, seed, offset, tau, kappa, n, m)
    assert gw.shape == logits.shape and gw.dtype == ldt
    rt, at = tol(ldt, acc_of(ldt, wdt))
    torch.testing.assert_close(gw, gwref, rtol=rt, atol=at * scale * 4)


@needs_native
@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("hard", (False, True))
def test_forward_matches_reference(isa, n, m, hard):
    gen = torch.Generator().manual_seed(100 * n + m + hard)
    for i, groups in enumerate((1, 3, 17, 33, 1001)):
        seed, offset = SEEDS[i % len(SEEDS)]
        _check_forward(n, m, groups, torch.float32, torch.float32, hard, seed, offset, 0.7, 2.0, gen)


@needs_native
@pytest.mark.parametrize("n,m", NM)
def test_backward_matches_reference(isa, n, m):
    gen = torch.Generator().manual_seed(10 * n + m)
    for i, groups in enumerate((1, 5, 31, 1003)):
        seed, offset = SEEDS[(i + 1) % len(SEEDS)]
        _check_backward(n, m, groups, torch.float32, torch.float32, seed, offset, 0.7, 2.0, gen)


@needs_native
@pytest.mark.parametrize("ldt", FLOATS)
@pytest.mark.parametrize("wdt", FLOATS)
def test_dtypes_match_reference(isa, ldt, wdt):
    gen = torch.Generator().manual_seed(7)
    for n, m in ((2, 4), (3, 8)):
        for hard in (False, True):
            _check_forward(n, m, 67, ldt, wdt, hard, -9, 2**35, 0.9, 1.5, gen)
        _check_backward(n, m, 67, ldt, wdt, 3, 11, 0.9, 1.5, gen)


@needs_native
@pytest.mark.parametrize("n,m", ((2, 4), (4, 8)))
def test_large_and_shaped(isa, n, m):
    """Many groups (several threads' chunks), a 2-D weight, extreme tau / kappa."""
    gen = torch.Generator().manual_seed(3)
    rows = 61
    cols = 8 * (397 if n == 2 else 53)  # 4:8 (C = 70): the reference's Philox is slow
    groups = rows * cols // m
    _check_forward(n, m, groups, torch.float32, torch.float32, False, 5, 6, 1.0, 1.0, gen, lead=(rows, cols))
    _check_forward(n, m, groups, torch.float32, torch.float32, True, 5, 6, 1.0, 1.0, gen, lead=(rows, cols))
    _check_backward(n, m, groups, torch.float32, torch.float32, 5, 6, 1.0, 1.0, gen, lead=(rows, cols))


@needs_native
@pytest.mark.parametrize("tau,kappa", ((0.05, 500.0), (0.05, -500.0), (1e-3, 1.0), (50.0, 0.0), (0.05, 1e4)))
def test_extreme_temperatures_finite(isa, tau, kappa):
    """tau 0.05, kappa 500: y spans ~1e5; exp must underflow to 0 cleanly (no NaN/Inf)."""
    gen = torch.Generator().manual_seed(11)
    logits, weight = rand_inputs(4099, 2, 4, torch.float32, torch.float32, gen)
    mask = ops.gumbel_nm_mask(logits, 1, 2, tau, kappa, 2, 4)
    ref = G.gumbel_nm_mask_reference(logits, 1, 2, tau, kappa, 2, 4)
    assert torch.isfinite(mask).all()
    assert (mask >= 0).all() and (mask <= 1 + 1e-6).all()
    torch.testing.assert_close(mask.sum(-1), torch.full((4099,), 2.0), rtol=1e-5, atol=1e-5)
    ok = clear_groups(ref_y(logits, 1, 2, tau, kappa, torch.float32), gap=1e-4)
    # wherever the soft mask is (numerically) decided it must agree with the reference
    torch.testing.assert_close(mask[ok], ref[ok], rtol=1e-4, atol=1e-4)
    gl = ops.gumbel_nm_mask_backward(torch.randn(4099, 4), logits, 1, 2, tau, kappa, 2, 4)
    assert torch.isfinite(gl).all()


@needs_native
def test_non_contiguous_inputs(isa):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 40, generator=gen).t()  # [40, 6], non-contiguous
    weight = torch.randn(32, 5, generator=gen).t()  # [5, 32], 160 = 40 * 4
    assert not logits.is_contiguous() and not weight.is_contiguous()
    out = ops.gumbel_nm_masked_weight(weight, logits, 1, 2, 0.5, 2.0, 2, 4)
    ref = G.gumbel_nm_masked_weight_reference(weight, logits, 1, 2, 0.5, 2.0, 2, 4)
    assert out.shape == weight.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn(32, 5, generator=gen).t()
    gl = ops.gumbel_nm_masked_weight_backward(gout, weight, logits, 1, 2, 0.5, 2.0, 2, 4)
    gref = G.gumbel_nm_masked_weight_backward_reference(gout, weight, logits, 1, 2, 0.5, 2.0, 2, 4)
    torch.testing.assert_close(gl, gref, rtol=1e-5, atol=1e-4)


@needs_native
def test_empty(isa):
    logits = torch.empty(0, 6)
    assert ops.gumbel_nm_mask(logits, 1, 2, 1.0, 1.0, 2, 4).shape == (0, 4)
    assert ops.gumbel_nm_masked_weight(torch.empty(0, 8), logits, 1, 2, 1.0, 1.0, 2, 4).shape == (0, 8)
    assert ops.gumbel_nm_mask_backward(torch.empty(0, 4), logits, 1, 2, 1.0, 1.0, 2, 4).shape == (0, 6)


@needs_native
def test_isas_agree():
    """The SIMD paths agree with each other (same noise; log/exp to a few ulp)."""
    import semisparse

    gen = torch.Generator().manual_seed(21)
    logits, weight = rand_inputs(4001, 2, 4, torch.float32, torch.float32, gen)
    outs = []
    for name in ("scalar", "avx2_fma", "avx512_bf16"):
        try:
            semisparse.set_cpu_isa(name)
        except ValueError:
            continue
        outs.append(ops.gumbel_nm_masked_weight(weight, logits, 9, 10, 0.5, 3.0, 2, 4))
    semisparse.set_cpu_isa("auto")
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("n,m", ((2, 4), (3, 8)))
def test_opcheck(dtype, n, m):
    gen = torch.Generator().manual_seed(1)
    c = G.num_patterns(n, m)
    logits = torch.randn(12, c, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(3, 4 * m, generator=gen).to(dtype)
    args = (5, -7, 0.8, 1.5, n, m)
    for hard in (False, True):
        torch.library.opcheck(ops.gumbel_nm_mask, (logits, *args, hard))
        torch.library.opcheck(ops.gumbel_nm_masked_weight, (weight, logits, *args, hard))
        torch.library.opcheck(ops.gumbel_nm_masked_weight, (weight.clone().requires_grad_(), logits, *args, hard))
    torch.library.opcheck(ops.gumbel_nm_mask_backward, (torch.randn(12, m).to(dtype), logits.detach(), *args))
    torch.library.opcheck(
        ops.gumbel_nm_masked_weight_backward, (torch.randn(3, 4 * m).to(dtype), weight, logits.detach(), *args)
    )


# ---------------------------------------------------------------- autograd
@pytest.mark.parametrize("n,m", ((2, 4), (1, 4), (3, 8)))
def test_gradcheck(n, m):
    gen = torch.Generator().manual_seed(2)
    c = G.num_patterns(n, m)
    logits = torch.randn(5, c, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5 * m, generator=gen, dtype=torch.float64, requires_grad=True)
    args = (3, 2**33 + 1, 0.7, 1.3, n, m)
    assert torch.autograd.gradcheck(lambda lg: ops.gumbel_nm_mask(lg, *args), (logits,))
    assert torch.autograd.gradcheck(lambda w, lg: ops.gumbel_nm_masked_weight(w, lg, *args), (weight, logits))


def test_hard_gradient_is_straight_through():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(50, 6, generator=gen, requires_grad=True)
    weight = torch.randn(10, 20, generator=gen)
    gout = torch.randn(10, 20, generator=gen)
    grads = []
    for hard in (False, True):
        (gl,) = torch.autograd.grad(
            ops.gumbel_nm_masked_weight(weight, logits, 1, 2, 0.5, 2.0, 2, 4, hard), logits, gout
        )
        grads.append(gl)
    assert torch.equal(grads[0], grads[1])
    gmask = torch.randn(50, 4, generator=gen)
    g_soft, g_hard = (
        torch.autograd.grad(ops.gumbel_nm_mask(logits, 1, 2, 0.5, 2.0, 2, 4, h), logits, gmask)[0]
        for h in (False, True)
    )
    assert torch.equal(g_soft, g_hard)
    # and W's gradient under hard=True is the hard mask
    w = weight.clone().requires_grad_()
    out = ops.gumbel_nm_masked_weight(w, logits, 1, 2, 0.5, 2.0, 2, 4, True)
    (gw,) = torch.autograd.grad(out, w, gout)
    hard_mask = ops.gumbel_nm_mask(logits.detach(), 1, 2, 0.5, 2.0, 2, 4, True)
    torch.testing.assert_close(gw, gout * hard_mask.reshape(10, 20))


def test_autograd_matches_reference_formula():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(64, 6, generator=gen, requires_grad=True)
    weight = torch.randn(16, 16, generator=gen)
    gout = torch.randn(16, 16, generator=gen)
    (gl,) = torch.autograd.grad(ops.gumbel_nm_masked_weight(weight, logits, 8, 9, 0.6, 2.5, 2, 4), logits, gout)
    lref = logits.detach().clone().requires_grad_()
    (gref,) = torch.autograd.grad(G.gumbel_nm_masked_weight_reference(weight, lref, 8, 9, 0.6, 2.5, 2, 4), lref, gout)
    torch.testing.assert_close(gl, gref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ determinism
def test_same_seed_offset_deterministic():
    logits = torch.randn(1000, 6)
    a = ops.gumbel_nm_mask(logits, 11, 12, 0.5, 1.0, 2, 4)
    b = ops.gumbel_nm_mask(logits, 11, 12, 0.5, 1.0, 2, 4)
    assert torch.equal(a, b)
    c = ops.gumbel_nm_mask(logits, 11, 13, 0.5, 1.0, 2, 4)
    d = ops.gumbel_nm_mask(logits, 12, 12, 0.5, 1.0, 2, 4)
    e = ops.gumbel_nm_mask(logits, 11, 12 + 2**32, 0.5, 1.0, 2, 4)
    for other in (c, d, e):
        assert (other - a).abs().max() > 0.1
        assert ((other - a).abs() > 1e-6).float().mean() > 0.9  # nearly every group changed
    # under threads: identical to a single-threaded run
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        big = torch.randn(50_000, 6)
        one = ops.gumbel_nm_mask(big, 1, 2, 0.5, 1.0, 2, 4)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(one, ops.gumbel_nm_mask(big, 1, 2, 0.5, 1.0, 2, 4))


# ------------------------------------------------------------ distribution
STAT_LOGITS = torch.tensor(
    [
        [0.0, 0.5, -0.5, 1.0, 0.0, -1.0],
        [1.2, 0.0, 0.0, 0.0, 0.0, -0.3],
        [-1.0, -1.0, -1.0, -1.0, -1.0, 0.4],
    ]
)
STAT_KAPPA, STAT_REPS = 1.5, 100_000


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square over all rows (counts, probs [rows, C])."""
    expect = probs.double() * counts.sum(-1, keepdim=True).double()
    return float(((counts.double() - expect) ** 2 / expect).sum())


# 3 rows x 5 degrees of freedom = 15: P(chi2_15 > 50) ~ 1e-5
CHI2_LIMIT = 50.0


def sampled_counts(mask: torch.Tensor) -> torch.Tensor:
    """Hard masks [3 * REPS, 4] -> per-row candidate counts [3, 6]."""
    table = G.pattern_table(2, 4)
    idx = (mask.float() @ table.t()).argmax(-1)  # the pattern with 2 matching ones
    assert torch.equal(table[idx], mask.float())
    return torch.stack([torch.bincount(r, minlength=6) for r in idx.reshape(3, STAT_REPS)])


def test_hard_samples_follow_softmax():
    logits = STAT_LOGITS.repeat_interleave(STAT_REPS, 0)
    mask = ops.gumbel_nm_mask(logits, 2024, 1, 0.37, STAT_KAPPA, 2, 4, True)
    counts = sampled_counts(mask)
    probs = torch.softmax(STAT_KAPPA * STAT_LOGITS.double(), -1)
    stat = chi2_stat(counts, probs)
    assert stat < CHI2_LIMIT, (stat, counts, probs * STAT_REPS)
    assert (counts / STAT_REPS - probs).abs().max() < 0.01
    # the negative controls: wrong samplers the check must reject
    gen = torch.Generator().manual_seed(0)
    g = -torch.log(-torch.log(torch.rand(logits.shape, generator=gen, dtype=torch.float64)))
    missing_kappa = (logits.double() + g).argmax(-1)
    uniform_noise = (STAT_KAPPA * logits.double() + torch.rand(logits.shape, generator=gen)).argmax(-1)
    right = (STAT_KAPPA * logits.double() + g).argmax(-1)
    table = G.pattern_table(2, 4)
    for wrong in (missing_kappa, uniform_noise):
        assert chi2_stat(sampled_counts(table[wrong]), probs) > 10 * CHI2_LIMIT
    assert chi2_stat(sampled_counts(table[right]), probs) < CHI2_LIMIT  # the control sampler itself


def test_soft_mask_mean_is_marginal():
    """E[soft mask] as tau -> small approaches the pattern marginals of softmax(kappa l)."""
    logits = STAT_LOGITS.repeat_interleave(20_000, 0)
    mask = ops.gumbel_nm_mask(logits, 5, 5, 0.05, STAT_KAPPA, 2, 4).reshape(3, 20_000, 4).double().mean(1)
    expect = torch.softmax(STAT_KAPPA * STAT_LOGITS.double(), -1) @ G.pattern_table(2, 4, torch.float64)
    assert (mask - expect).abs().max() < 0.02


# ------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph_backward():
    torch._dynamo.reset()

    def step(weight, logits, x):
        w = ops.gumbel_nm_masked_weight(weight, logits, 3, 4, 0.5, 2.0, 2, 4, False)
        return (x @ w.t()).square().mean()

    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(16, 32, generator=gen)
    x = torch.randn(5, 32, generator=gen)
    l1 = torch.randn(128, 6, generator=gen, requires_grad=True)
    l2 = l1.detach().clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(weight, l1, x)
    loss.backward()
    ref = step(weight, l2, x)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(l1.grad, l2.grad)


# ------------------------------------------------------------ bad input
def _bad_calls():
    lg = torch.randn(8, 6)
    w = torch.randn(4, 8)
    return [
        (lambda f: f["mw"](torch.randn(4, 12), lg, 1, 2, 1.0, 1.0, 2, 4), r"does not match the weight"),
        (lambda f: f["mw"](torch.randn(3, 6), lg, 1, 2, 1.0, 1.0, 2, 4), r"multiple of m=4"),
        (lambda f: f["mask"](lg, 1, 2, 1.0, 1.0, 0, 4), r"n:m = 0:4 is not supported"),
        (lambda f: f["mask"](lg, 1, 2, 1.0, 1.0, 4, 4), r"n:m = 4:4 is not supported"),
        (lambda f: f["mask"](torch.randn(8, 120), 1, 2, 1.0, 1.0, 2, 16), r"n:m = 2:16 is not supported"),
        (lambda f: f["mask"](lg, 1, 2, 0.0, 1.0, 2, 4), r"tau must be a finite number > 0"),
        (lambda f: f["mask"](lg, 1, 2, -1.0, 1.0, 2, 4), r"tau must be a finite number > 0"),
        (lambda f: f["mask"](lg, 1, 2, float("nan"), 1.0, 2, 4), r"tau must be a finite number > 0"),
        (lambda f: f["mask"](lg, 1, 2, 1.0, float("inf"), 2, 4), r"kappa must be finite"),
        (lambda f: f["mask"](torch.randn(8, 5), 1, 2, 1.0, 1.0, 2, 4), r"logits must have shape \[groups, C\(4,2\) = 6\]"),
        (lambda f: f["mask"](torch.randn(48), 1, 2, 1.0, 1.0, 2, 4), r"logits must have shape"),
        (lambda f: f["mask"](torch.randn(2, 8, 6), 1, 2, 1.0, 1.0, 2, 4), r"logits must have shape"),
        (lambda f: f["mask"](torch.zeros(8, 6, dtype=torch.int32), 1, 2, 1.0, 1.0, 2, 4), r"logits must be float32"),
        (lambda f: f["mbwd"](torch.randn(8, 3), lg, 1, 2, 1.0, 1.0, 2, 4), r"gradient must have shape \(8, 4\)"),
        (lambda f: f["mwbwd"](torch.randn(4, 4), w, lg, 1, 2, 1.0, 1.0, 2, 4), r"gradient must have shape \(4, 8\)"),
        (lambda f: f["mwbwd"](torch.randn(4, 8), torch.randn(40), lg, 1, 2, 1.0, 1.0, 2, 4), r"does not match the weight"),
    ]


NATIVE_FNS = {
    "mask": ops.gumbel_nm_mask,
    "mw": ops.gumbel_nm_masked_weight,
    "mbwd": ops.gumbel_nm_mask_backward,
    "mwbwd": ops.gumbel_nm_masked_weight_backward,
}
REFERENCE_FNS = {  # the pure-torch kernels the ops fall back to (CompositeExplicitAutograd)
    "mask": G._mask_default,
    "mw": G._masked_weight_default,
    "mbwd": G._mask_backward_default,
    "mwbwd": G._masked_weight_backward_default,
}
FAKE_FNS = {
    "mask": G._mask_fake,
    "mw": G._masked_weight_fake,
    "mbwd": G._mask_backward_fake,
    "mwbwd": G._masked_weight_backward_fake,
}


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_python(case):
    call, match = _bad_calls()[case]
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(REFERENCE_FNS)
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(FAKE_FNS)


@needs_native
@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_native(case):
    for name in ("gumbel_nm_mask", "gumbel_nm_masked_weight", "gumbel_nm_mask_backward", "gumbel_nm_masked_weight_backward"):
        assert has_native_kernel(name), name
    call, match = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call(NATIVE_FNS)  # eager CPU: dispatches to the native kernel
