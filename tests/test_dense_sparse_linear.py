"""DenseSparseLinear (DSFormer W ~ S D, STF training, 2:4 compressed inference) and the
dsformer initialisations."""

from __future__ import annotations

import pytest
import torch
from semisparse.dsformer import (
    DenseSparseLinear,
    dense_sparse_params,
    gram,
    init_data_aware,
    init_svd_alternating,
    k_for_compression,
    relative_error,
)
from semisparse.formats.sparse24 import nm_mask
from torch import nn


def _mod(in_f=32, out_f=24, k=16, pattern="2:4", bias=True, seed=0):
    torch.manual_seed(seed)
    return DenseSparseLinear(in_f, out_f, k, pattern=pattern, bias=bias)


def _ref(mod, x):
    s = mod.S_latent.detach() * nm_mask(mod.S_latent.detach().abs(), mod.n, mod.m)
    y = x @ (s @ mod.D.detach()).T
    return y if mod.bias is None else y + mod.bias.detach()


# ------------------------------------------------------------- shapes / counts
def test_shapes_and_param_counts():
    mod = _mod(32, 24, 16)
    assert mod.D.shape == (16, 32) and mod.S_latent.shape == (24, 16) and mod.bias.shape == (24,)
    assert mod(torch.randn(5, 32)).shape == (5, 24)
    assert mod(torch.randn(2, 3, 32)).shape == (2, 3, 24)
    assert dense_sparse_params(24, 32, 16) == 16 * 32 + 24 * 8
    assert dense_sparse_params(24, 32, 16, bias=True) == 16 * 32 + 24 * 8 + 24
    assert dense_sparse_params(24, 32, 16, n=1, m=4) == 16 * 32 + 24 * 4
    assert mod.num_params() == 16 * 32 + 24 * 8 + 24
    mod.compress()
    assert mod.values.shape == (24, 8) and mod.meta.dtype == torch.uint8
    assert mod.num_params(bias=False) == mod.D.numel() + mod.values.numel()


@pytest.mark.parametrize("out_f,in_f", [(256, 256), (512, 128)])
def test_k_for_compression_2x(out_f, in_f):
    k = k_for_compression(out_f, in_f, 2)
    assert k == 84  # 84 * (in + out/2) = 84 * 384 = 32256 <= 32768 < 88 * 384
    assert k % 4 == 0
    assert dense_sparse_params(out_f, in_f, k) <= out_f * in_f / 2 < dense_sparse_params(out_f, in_f, k + 4)
    k3 = k_for_compression(out_f, in_f, 3.57)
    assert dense_sparse_params(out_f, in_f, k3) <= out_f * in_f / 3.57 < dense_sparse_params(out_f, in_f, k3 + 4)
    mod = DenseSparseLinear.from_linear(nn.Linear(in_f, out_f), compression=2, iters=1)
    assert mod.k == 84


# ------------------------------------------------------------------- forward
def test_forward_training_state_matches_factorization():
    mod = _mod()
    x = torch.randn(7, 32)
    torch.testing.assert_close(mod(x), _ref(mod, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.to_dense_weight(), mod.sparse_factor() @ mod.D)
    s = mod.sparse_factor().detach()
    assert bool(((s != 0).reshape(24, -1, 4).sum(-1) <= 2).all())


@pytest.mark.parametrize("bias", [True, False])
def test_compressed_forward_equals_masked_factorization(bias):
    mod = _mod(bias=bias)
    x = torch.randn(2, 5, 32)
    y_train = mod(x).detach()
    w_train = mod.to_dense_weight().detach()
    ref = _ref(mod, x)
    mod.compress()
    assert mod.compressed and mod.S_latent is None
    torch.testing.assert_close(mod.to_dense_weight().detach(), w_train, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod(x).detach(), y_train, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod(x).detach(), ref, rtol=1e-5, atol=1e-5)
    # values are trainable (as in SparseLinear); the mask stays fixed
    mod(x).sum().backward()
    assert mod.values.grad is not None and mod.D.grad is not None


def test_other_pattern_uses_masked_dense_and_refuses_compress():
    mod = _mod(k=16, pattern="1:4")
    x = torch.randn(3, 32)
    torch.testing.assert_close(mod(x), _ref(mod, x), rtol=1e-5, atol=1e-5)
    assert bool(((mod.sparse_factor() != 0).reshape(24, -1, 4).sum(-1) <= 1).all())
    with pytest.raises(ValueError, match="2:4"):
        mod.compress()


# ------------------------------------------------------------------- STF grads
def test_straight_through_gradient_reaches_pruned_entries():
    mod = _mod()
    x = torch.randn(9, 32)
    mask = nm_mask(mod.S_latent.detach().abs(), 2, 4)
    s = (mod.S_latent.detach() * mask).requires_grad_(True)
    y_ref = torch.nn.functional.linear(x @ mod.D.detach().T, s, mod.bias.detach())
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (mod(x) * g).sum().backward()
    torch.testing.assert_close(mod.S_latent.grad, s.grad, rtol=1e-5, atol=1e-6)
    assert bool((mod.S_latent.grad[~mask] != 0).all())  # pruned entries get dL/dS too


def test_freeze_mask_zero_grad_on_pruned():
    mod = _mod()
    mod.freeze_mask()
    mask = mod.mask.clone()
    mod(torch.randn(9, 32)).square().sum().backward()
    assert bool((mod.S_latent.grad[~mask] == 0).all())
    assert bool((mod.S_latent.grad[mask] != 0).any())
    # the frozen mask does not follow the latent magnitudes
    with torch.no_grad():
        mod.S_latent[~mask] = 100.0
    assert torch.equal(mod.current_mask(), mask)
    s = mod.sparse_factor()
    assert bool((s[~mask] == 0).all())
    mod.unfreeze_mask()
    assert not torch.equal(mod.current_mask(), mask)


def test_mask_recomputed_each_forward():
    mod = _mod()
    x = torch.randn(4, 32)
    m0 = mod.current_mask().clone()
    r, c = (int(i) for i in (~m0).nonzero()[0])
    with torch.no_grad():
        mod.S_latent[r, c] = 1e3  # a pruned entry becomes the largest of its group
    m1 = mod.current_mask()
    assert bool(m1[r, c]) and not torch.equal(m0, m1)
    torch.testing.assert_close(mod(x), _ref(mod, x), rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------ inits
def test_svd_alternating_improves_on_plain_svd_projection():
    torch.manual_seed(1)
    W = torch.randn(64, 48)
    k = 32
    res = init_svd_alternating(W, k, "2:4", iters=8)
    # plain truncated SVD + 2:4 projection
    U, sig, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    S0 = U[:, :k] * sig[:k].sqrt()
    S0 = S0 * nm_mask(S0.abs(), 2, 4)
    D0 = sig[:k].sqrt()[:, None] * Vh[:k]
    e0 = relative_error(W, S0, D0)
    assert res.errors[0] == pytest.approx(e0, rel=1e-9)
    e = relative_error(W, res.S, res.D)
    assert e <= e0 + 1e-12 and e < 0.98 * e0
    assert e == pytest.approx(min(res.errors), rel=1e-6)
    assert res.S.dtype == W.dtype and res.S.shape == (64, k) and res.D.shape == (k, 48)
    assert bool(((res.S != 0).reshape(64, -1, 4).sum(-1) <= 2).all())
    # never worse than the start, whatever the iteration count
    for iters in (0, 1, 3):
        r = init_svd_alternating(W, k, "2:4", iters=iters)
        assert relative_error(W, r.S, r.D) <= e0 + 1e-6


def test_value_refit_beats_plain_projection_and_same_budget_svd():
    """The conjugate-gradient refit of S on its mask (cg_iters) lowers the error, and at 2x
    the factorisation beats the truncated SVD of the same budget (Gaussian matrix, and one
    with a decaying spectrum like trained weights)."""
    torch.manual_seed(3)
    n = 256
    k = k_for_compression(n, n, 2.0)  # 84: 84 * (256 + 128) = 32,256 <= 32,768
    r = 64  # low rank at the same budget: 64 * 512 = 32,768
    gauss = torch.randn(n, n, dtype=torch.float64)
    decay = torch.randn(n, n, dtype=torch.float64) @ torch.diag(torch.logspace(0, -1.5, n, dtype=torch.float64)) \
        @ torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    for W, refit_gain in ((gauss, 0.995), (decay, 0.95)):
        sig = torch.linalg.svdvals(W)
        e_lowrank = float(sig[r:].norm() / sig.norm())
        plain = init_svd_alternating(W, k, iters=6, cg_iters=0)
        refit = init_svd_alternating(W, k, iters=6, cg_iters=10)
        e_plain, e_refit = relative_error(W, plain.S, plain.D), relative_error(W, refit.S, refit.D)
        assert e_refit < refit_gain * e_plain
        assert e_refit < 0.9 * e_lowrank
        assert bool(((refit.S != 0).reshape(n, -1, 4).sum(-1) <= 2).all())
    with pytest.raises(ValueError, match="cg_iters"):
        init_svd_alternating(gauss, k, cg_iters=-1)


def test_data_aware_beats_unweighted_in_x_norm():
    torch.manual_seed(2)
    in_f, out_f, k = 48, 40, 24
    W = torch.randn(out_f, in_f)
    X = torch.randn(400, in_f) * torch.logspace(-2, 1, in_f)  # anisotropic inputs
    H = gram(X)
    plain = init_svd_alternating(W, k, iters=6)
    data = init_data_aware(W, X, k, iters=6)
    data_g = init_data_aware(W, H, k, iters=6)
    e_plain = relative_error(W, plain.S, plain.D, H)
    e_data = relative_error(W, data.S, data.D, H)
    assert e_data <= e_plain and e_data < 0.8 * e_plain
    torch.testing.assert_close(data.D, data_g.D)
    assert data.errors[data.best] == min(data.errors) <= data.errors[0]
    # through the module
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(W)
    mod = DenseSparseLinear.from_linear(lin, k=k, init="data", calib_gram=H, iters=6)
    ws = mod.sparse_factor().detach()
    assert relative_error(W, ws, mod.D.detach(), H) == pytest.approx(e_data, rel=1e-4)
    x = torch.randn(3, in_f)
    torch.testing.assert_close(mod(x), x @ mod.to_dense_weight().T + lin.bias, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- state dicts
def _roundtrip(mod, fresh):
    fresh.load_state_dict(mod.state_dict(), strict=True)
    return fresh


def test_state_dict_roundtrip_both_states(tmp_path):
    x = torch.randn(4, 32)
    mod = _mod()
    y = mod(x).detach()
    sd = mod.state_dict()
    assert set(sd) == {"D", "S_latent", "bias"}
    other = _roundtrip(mod, _mod(seed=5))
    torch.testing.assert_close(other(x), y)

    mod.freeze_mask()
    assert set(mod.state_dict()) == {"D", "S_latent", "bias", "mask"}
    other = _roundtrip(mod, _mod(seed=5))
    assert other.mask_frozen and torch.equal(other.mask, mod.mask)

    mod.compress()
    assert set(mod.state_dict()) == {"D", "values", "meta", "bias"}
    other = _roundtrip(mod, _mod(seed=5))  # a training-state module switches to compressed
    assert other.compressed
    torch.testing.assert_close(other(x), y, rtol=1e-5, atol=1e-5)
    # and back: a compressed module loads a training-state dict
    back = _mod(seed=3).compress()
    back.load_state_dict(_mod().state_dict(), strict=True)
    assert not back.compressed
    torch.testing.assert_close(back(x), y)

    # save / load files
    for m in (_mod(), _mod().compress()):
        p = tmp_path / f"m{int(m.compressed)}.safetensors"
        m.save(p)
        got = DenseSparseLinear.load(p)
        assert got.compressed == m.compressed and got.k == m.k and got.pattern == m.pattern
        torch.testing.assert_close(got(x), m(x))


def test_load_rejects_bad_meta():
    mod = _mod().compress()
    sd = mod.state_dict()
    sd["meta"] = torch.full_like(sd["meta"], 0xFF)  # code 0b1111: both positions 3
    with pytest.raises(ValueError, match="invalid 2:4 metadata"):
        _mod().load_state_dict(sd)


# ------------------------------------------------------------------- compile
def test_torch_compile_training_and_compressed():
    torch._dynamo.reset()
    mod = _mod()
    x = torch.randn(6, 32)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    torch.testing.assert_close(y_c, mod(x), rtol=1e-5, atol=1e-5)
    y_c.square().sum().backward()
    g_c = [p.grad.clone() for p in (mod.D, mod.S_latent, mod.bias)]
    mod.zero_grad()
    mod(x).square().sum().backward()
    for gc, p in zip(g_c, (mod.D, mod.S_latent, mod.bias)):
        torch.testing.assert_close(gc, p.grad, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    mod.compress()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    torch.testing.assert_close(y_c, mod(x), rtol=1e-5, atol=1e-5)
    y_c.sum().backward()
    assert mod.values.grad is not None


# ---------------------------------------------------------------- bad input
def test_k_not_multiple_of_m_reports_budget():
    with pytest.raises(ValueError, match=r"k=18 is not a multiple of M=4.*parameter budget"):
        DenseSparseLinear(32, 24, 18)
    with pytest.raises(ValueError, match=r"parameter budget 384\.0.*k=16: 704"):
        DenseSparseLinear.from_linear(nn.Linear(32, 24), k=18, compression=2)


def test_k_too_large_for_compression_reports_both_numbers():
    # 256x256 at 2x: budget 32768; k=88 needs 88*384 = 33792
    with pytest.raises(ValueError, match=r"33792.*32768\.0"):
        DenseSparseLinear.from_linear(nn.Linear(256, 256), k=88, compression=2)
    with pytest.raises(ValueError, match=r"needs .* parameters, more than the budget"):
        k_for_compression(8, 8, 100)


@pytest.mark.parametrize("pattern", ["2-4", "4:4", "0:4", "5:4", "a:b", "2:4:8", "", 24, (2, 4.0)])
def test_invalid_pattern(pattern):
    with pytest.raises(ValueError, match="pattern must be"):
        DenseSparseLinear(32, 24, 16, pattern=pattern)


def test_from_linear_bad_args():
    lin = nn.Linear(32, 24)
    with pytest.raises(ValueError, match="give k or compression"):
        DenseSparseLinear.from_linear(lin)
    with pytest.raises(ValueError, match="calib_gram"):
        DenseSparseLinear.from_linear(lin, k=16, init="data")
    with pytest.raises(ValueError, match="init must be"):
        DenseSparseLinear.from_linear(lin, k=16, init="nope")
    with pytest.raises(TypeError):
        DenseSparseLinear.from_linear(nn.Conv1d(2, 2, 1), k=16)
