"""CUDA kernels of the gumbel_nm_* ops (libsemisparse_cuda, csrc/gumbel/gumbel_cuda.cu):
the same noise keying as the CPU kernels (fp64: equal to the CPU fp64 path within 1e-10;
fp32 / bf16 / fp16: within each dtype's tolerance), the same hard patterns away from
rounding ties, the same sample statistics, opcheck, gradcheck and errors. Skipped unless
a CUDA device is present and the native CUDA library is loaded; inputs are fresh random
tensors and outputs are checked against the CPU op."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda_skip_reason
from semisparse.ops import gumbel as G
from test_gumbel_ops import (
    CHI2_LIMIT,
    NM,
    STAT_KAPPA,
    STAT_LOGITS,
    STAT_REPS,
    acc_of,
    chi2_stat,
    clear_groups,
    rand_inputs,
    ref_y,
    sampled_counts,
    tol,
)


_SKIP = cuda_skip_reason("gumbel_nm_mask")
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

ops = torch.ops.semisparse
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ARGS = ((7, 3, 0.9, 1.7), (-5, 2**40 + 3, 0.5, 4.0), (2**63 - 1, 2**32 - 1, 2.0, 0.3))


def _close(a_cuda: torch.Tensor, b_cpu: torch.Tensor, dtype, acc, scale: float = 1.0) -> None:
    assert a_cuda.is_cuda and a_cuda.dtype == b_cpu.dtype and a_cuda.shape == b_cpu.shape
    rt, at = tol(dtype, acc)
    torch.testing.assert_close(a_cuda.cpu(), b_cpu, rtol=rt, atol=at * scale)


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("args", ARGS)
def test_soft_forward_and_backward_match_cpu(n, m, dtype, args):
    seed, offset, tau, kappa = args
    gen = torch.Generator().manual_seed(n * 10 + m)
    logits, weight = rand_inputs(1000, n, m, dtype, dtype, gen)
    acc = acc_of(dtype)
    a = (seed, offset, tau, kappa, n, m)
    _close(ops.gumbel_nm_mask(logits.cuda(), *a, False), ops.gumbel_nm_mask(logits, *a, False), dtype, acc)
    wm = ops.gumbel_nm_masked_weight(weight.cuda(), logits.cuda(), *a, False)
    _close(wm, ops.gumbel_nm_masked_weight(weight, logits, *a, False), dtype, acc, weight.double().abs().max().item())
    scale = abs(kappa / tau) * 4
    gmask = torch.randn(1000, m, generator=gen, dtype=torch.float64).to(dtype)
    gout = torch.randn(weight.shape, generator=gen, dtype=torch.float64).to(dtype)
    gl = ops.gumbel_nm_mask_backward(gmask.cuda(), logits.cuda(), *a)
    _close(gl, ops.gumbel_nm_mask_backward(gmask, logits, *a), dtype, acc, scale)
    gw = ops.gumbel_nm_masked_weight_backward(gout.cuda(), weight.cuda(), logits.cuda(), *a)
    _close(gw, ops.gumbel_nm_masked_weight_backward(gout, weight, logits, *a), dtype, acc, scale * 4)


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_hard_patterns_match_cpu_away_from_ties(n, m, dtype):
    gen = torch.Generator().manual_seed(3)
    logits, weight = rand_inputs(4000, n, m, dtype, dtype, gen)
    a = (11, 2**33 + 5, 0.5, 2.0, n, m)
    got = ops.gumbel_nm_mask(logits.cuda(), *a, True).cpu()
    want = ops.gumbel_nm_mask(logits, *a, True)
    ok = clear_groups(ref_y(logits, 11, 2**33 + 5, 0.5, 2.0, acc_of(dtype)))
    assert ok.float().mean() > 0.9
    assert torch.equal(got[ok], want[ok])
    assert bool(((got == 0) | (got == 1)).all()) and bool((got.sum(-1) == n).all())
    gw = ops.gumbel_nm_masked_weight(weight.cuda(), logits.cuda(), *a, True).cpu().reshape(-1, m)
    assert torch.equal(gw[ok], (weight.reshape(-1, m) * want)[ok])


def test_hard_samples_follow_softmax_on_cuda():
    logits = STAT_LOGITS.repeat_interleave(STAT_REPS, 0).cuda()
    mask = ops.gumbel_nm_mask(logits, 2024, 1, 0.37, STAT_KAPPA, 2, 4, True).cpu()
    counts = sampled_counts(mask)
    probs = torch.softmax(STAT_KAPPA * STAT_LOGITS.double(), -1)
    stat = chi2_stat(counts, probs)
    assert stat < CHI2_LIMIT, (stat, counts, probs * STAT_REPS)


def test_large_grid_stride_and_shaped_weight():
    gen = torch.Generator().manual_seed(4)
    rows, cols = 3000, 1024  # 768k groups: more than one grid-stride pass
    logits = torch.randn(rows * cols // 4, 6, generator=gen)
    weight = torch.randn(rows, cols, generator=gen)
    a = (1, 2, 0.7, 3.0, 2, 4)
    got = ops.gumbel_nm_masked_weight(weight.cuda(), logits.cuda(), *a, False)
    assert got.shape == weight.shape
    _close(got, ops.gumbel_nm_masked_weight(weight, logits, *a, False), torch.float32, torch.float32, 4.0)


def test_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 64, generator=gen).t()  # [64, 6], not contiguous
    a = (3, 4, 1.0, 1.0, 2, 4)
    _close(ops.gumbel_nm_mask(logits.cuda(), *a, False), ops.gumbel_nm_mask(logits.contiguous(), *a, False),
           torch.float32, torch.float32)
    empty = ops.gumbel_nm_mask(torch.empty(0, 6, device="cuda"), *a, False)
    assert empty.shape == (0, 4) and empty.is_cuda


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_opcheck_cuda(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 6, generator=gen).to(dtype).cuda().requires_grad_()
    weight = torch.randn(3, 16, generator=gen).to(dtype).cuda()
    args = (5, -7, 0.8, 1.5, 2, 4)
    for hard in (False, True):
        torch.library.opcheck(ops.gumbel_nm_mask, (logits, *args, hard))
        torch.library.opcheck(ops.gumbel_nm_masked_weight, (weight.clone().requires_grad_(), logits, *args, hard))
    torch.library.opcheck(ops.gumbel_nm_mask_backward, (torch.randn(12, 4).to(dtype).cuda(), logits.detach(), *args))
    torch.library.opcheck(ops.gumbel_nm_masked_weight_backward,
                          (torch.randn(3, 16).to(dtype).cuda(), weight, logits.detach(), *args))


@pytest.mark.parametrize("n,m", ((2, 4), (3, 8)))
def test_gradcheck_cuda(n, m):
    gen = torch.Generator().manual_seed(2)
    c = G.num_patterns(n, m)
    logits = torch.randn(5, c, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    weight = torch.randn(5 * m, generator=gen, dtype=torch.float64).cuda().requires_grad_()
    args = (3, 2**33 + 1, 0.7, 1.3, n, m)
    assert torch.autograd.gradcheck(lambda lg: ops.gumbel_nm_mask(lg, *args), (logits,))
    assert torch.autograd.gradcheck(lambda w, lg: ops.gumbel_nm_masked_weight(w, lg, *args), (weight, logits))


def test_device_mismatch_is_a_clear_error():
    logits = torch.randn(4, 6, device="cuda")
    with pytest.raises(RuntimeError, match="CUDA|device"):
        ops.gumbel_nm_masked_weight(torch.randn(16), logits, 1, 2, 1.0, 1.0, 2, 4, False)
    with pytest.raises((RuntimeError, ValueError), match=r"n:m|n < m"):
        ops.gumbel_nm_mask(torch.randn(4, 6, device="cuda"), 1, 2, 1.0, 1.0, 4, 4, False)
