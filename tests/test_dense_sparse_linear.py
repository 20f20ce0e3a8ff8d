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


# ------------------------------------------------------- per-row-block bases
def _bmod(blocks, in_f=32, out_f=24, k=8, pattern="2:4", bias=True, seed=0, dtype=None):
    torch.manual_seed(seed)
    return DenseSparseLinear(in_f, out_f, k, pattern=pattern, bias=bias, blocks=blocks, dtype=dtype)


def _block_weight(s, D, blocks):
    """W = blockdiag(S_0, ..., S_{B-1}) @ D, built independently of the module."""
    r, k = s.shape[0] // blocks, s.shape[1]
    return torch.block_diag(*[s[b * r:(b + 1) * r] for b in range(blocks)]) @ D.reshape(blocks * k, -1)


def _bref(mod, x):
    s = mod.S_latent.detach() * mod.current_mask()
    y = x @ _block_weight(s, mod.D.detach(), mod.blocks).T
    return y if mod.bias is None else y + mod.bias.detach()


@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_shapes_and_param_counts(blocks):
    mod = _bmod(blocks)
    assert mod.blocks == blocks and mod.k == 8
    assert mod.D.shape == (blocks * 8, 32) and mod.S_latent.shape == (24, 8) and mod.bias.shape == (24,)
    assert mod(torch.randn(5, 32)).shape == (5, 24) and mod(torch.randn(2, 3, 32)).shape == (2, 3, 24)
    assert mod(torch.randn(32)).shape == (24,)
    assert dense_sparse_params(24, 32, 8, blocks=blocks) == blocks * 8 * 32 + 24 * 4
    assert dense_sparse_params(24, 32, 8, bias=True, blocks=blocks) == blocks * 8 * 32 + 24 * 4 + 24
    assert mod.num_params() == blocks * 8 * 32 + 24 * 4 + 24
    assert mod.num_params() == sum(p.numel() for p in mod.parameters()) - 24 * 4  # S_latent holds 2x the kept entries
    assert f"blocks={blocks}" in repr(mod)
    mod.compress()
    assert mod.values.shape == (24, 4) and mod.meta.shape == (24, 1) and mod.D.shape == (blocks * 8, 32)
    assert mod.num_params() == sum(p.numel() for p in mod.parameters())
    # the budget counts every basis
    for out_f, in_f, c in ((256, 256, 2), (512, 128, 2), (256, 256, 3.5)):
        kb = k_for_compression(out_f, in_f, c, blocks=blocks)
        assert kb % 4 == 0 and kb < k_for_compression(out_f, in_f, c)
        p = dense_sparse_params(out_f, in_f, kb, blocks=blocks)
        assert p <= out_f * in_f / c < dense_sparse_params(out_f, in_f, kb + 4, blocks=blocks)
    assert k_for_compression(256, 256, 2, blocks=4) == 28  # 28 * (4*256 + 128) = 32256 <= 32768 < 32 * 1152
    assert DenseSparseLinear.from_linear(nn.Linear(256, 256), compression=2, blocks=4, iters=0).k == 28


@pytest.mark.parametrize("blocks", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_forward_is_block_diagonal_composition_both_states(blocks, bias):
    mod = _bmod(blocks, bias=bias)
    x = torch.randn(2, 5, 32)
    s = mod.sparse_factor().detach()
    w = _block_weight(s, mod.D.detach(), blocks)
    r = 24 // blocks
    for b in range(blocks):  # row block b uses basis b only
        torch.testing.assert_close(w[b * r:(b + 1) * r], s[b * r:(b + 1) * r] @ mod.D.detach()[b * 8:(b + 1) * 8])
    torch.testing.assert_close(mod.to_dense_weight().detach(), w, rtol=1e-5, atol=1e-6)
    y_train = mod(x).detach()
    torch.testing.assert_close(y_train, _bref(mod, x), rtol=1e-5, atol=1e-5)
    lin = mod.to_linear()
    torch.testing.assert_close(lin(x).detach(), y_train, rtol=1e-5, atol=1e-5)
    mod.compress()
    assert mod.compressed and mod.S_latent is None
    torch.testing.assert_close(mod.sparse_factor().detach(), s)
    torch.testing.assert_close(mod.to_dense_weight().detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mod(x).detach(), y_train, rtol=1e-5, atol=1e-5)  # compress() preserves outputs
    torch.testing.assert_close(mod.to_linear()(x).detach(), y_train, rtol=1e-5, atol=1e-5)
    mod(x).square().sum().backward()
    assert mod.values.grad is not None and mod.D.grad is not None
    # the gradient of values is the masked dL/dS, block by block
    assert bool(mod.values.grad.ne(0).any()) and mod.D.grad.shape == (blocks * 8, 32)


def test_blocks_other_pattern_masked_dense():
    mod = _bmod(3, out_f=24, k=16, pattern="1:4")
    x = torch.randn(3, 32)
    torch.testing.assert_close(mod(x), _bref(mod, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2:4"):
        mod.compress()


@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_straight_through_gradient(blocks):
    mod = _bmod(blocks)
    x = torch.randn(9, 32)
    mask = nm_mask(mod.S_latent.detach().abs(), 2, 4)
    s = (mod.S_latent.detach() * mask).requires_grad_(True)
    D = mod.D.detach().clone().requires_grad_(True)
    y_ref = x @ _block_weight(s, D, blocks).T + mod.bias.detach()
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    (mod(x) * g).sum().backward()
    torch.testing.assert_close(mod.S_latent.grad, s.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.D.grad, D.grad, rtol=1e-5, atol=1e-5)
    assert bool((mod.S_latent.grad[~mask] != 0).all())  # pruned entries get dL/dS too
    # frozen mask: pruned entries get no gradient
    mod.zero_grad()
    mod.freeze_mask()
    mod(x).square().sum().backward()
    assert bool((mod.S_latent.grad[~mask] == 0).all()) and bool((mod.S_latent.grad[mask] != 0).any())


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_blocks_gradcheck_training_state(blocks):
    from torch.func import functional_call

    mod = _bmod(blocks, dtype=torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    D = mod.D.detach().clone().requires_grad_(True)
    S = mod.S_latent.detach().clone().requires_grad_(True)
    b = mod.bias.detach().clone().normal_().requires_grad_(True)
    # STF (mask recomputed each forward): the straight-through gradient of S_latent is not the
    # derivative of the forward, so S is held fixed; x, D and the bias are checked
    assert torch.autograd.gradcheck(
        lambda x, D, b: functional_call(mod, {"D": D, "S_latent": S.detach(), "bias": b}, (x,)), (x, D, b))
    # frozen mask: the forward is smooth in every argument, S_latent included
    mod.freeze_mask()
    assert torch.autograd.gradcheck(
        lambda x, D, S, b: functional_call(mod, {"D": D, "S_latent": S, "bias": b}, (x,)), (x, D, S, b))
    assert torch.autograd.gradgradcheck(
        lambda x, D, S, b: functional_call(mod, {"D": D, "S_latent": S, "bias": b}, (x,)), (x, D, S, b))


def _check_compiled(mod, x, params):
    """torch.compile(mod) (fullgraph) matches eager in output and in the gradients of params."""
    torch._dynamo.reset()
    mod.zero_grad()
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    torch.testing.assert_close(y_c, mod(x), rtol=1e-5, atol=1e-5)
    y_c.square().sum().backward()
    g_c = [p.grad.clone() for p in params()]
    mod.zero_grad()
    mod(x).square().sum().backward()
    for gc, p in zip(g_c, params()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_torch_compile_training_and_compressed(blocks):
    mod = _bmod(blocks)
    x = torch.randn(2, 6, 32)
    _check_compiled(mod, x, lambda: (mod.D, mod.S_latent, mod.bias))
    mod.compress()
    _check_compiled(mod, x, lambda: (mod.D, mod.values, mod.bias))


@pytest.mark.parametrize("init", ["svd", "data"])
def test_blocks_from_linear_factorises_each_block(init):
    torch.manual_seed(4)
    lin = nn.Linear(32, 24)
    X = torch.randn(200, 32) * torch.logspace(-1, 1, 32)
    H = gram(X)
    kw = {"init": init, "iters": 3, "calib_gram": H if init == "data" else None}
    plain = DenseSparseLinear.from_linear(lin, k=8, **kw)
    assert plain.blocks == 1 and plain.init_error == min(plain.init_errors)
    mod = DenseSparseLinear.from_linear(lin, k=8, blocks=4, **kw)
    assert mod.blocks == 4 and mod.D.shape == (32, 32)
    W = lin.weight.detach()
    for b in range(4):
        wb = W[b * 6:(b + 1) * 6]
        res = init_svd_alternating(wb, 8, iters=3) if init == "svd" else init_data_aware(wb, H, 8, iters=3, is_gram=True)
        torch.testing.assert_close(mod.D[b * 8:(b + 1) * 8].detach(), res.D)
        torch.testing.assert_close(mod.S_latent[b * 6:(b + 1) * 6].detach(), res.S)
    torch.testing.assert_close(mod.bias.detach(), lin.bias.detach())
    # init_error: the whole W's relative error (X-weighted under the damped Gram for "data")
    from semisparse.dsformer.init import damped_gram

    Hd = damped_gram(H, 0.01) if init == "data" else None
    W_ds = mod.to_dense_weight().detach().double()
    err = relative_error(W, W_ds, torch.eye(32, dtype=torch.float64), Hd)
    assert mod.init_error == pytest.approx(err, rel=1e-4, abs=1e-7)
    assert mod.init_error <= min(mod.init_errors) + 1e-12 and len(mod.init_errors) == 4
    # 4 bases of k=8 for 6-row blocks fit W better than one (and exactly with svd: rank 6 <= 8)
    assert mod.init_error < 0.5 * plain.init_error
    if init == "svd":
        assert mod.init_error < 1e-5


def test_blocks_1_is_unchanged():
    x = torch.randn(4, 32)
    a, b = _mod(seed=7), _bmod(1, k=16, seed=7)
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert list(sd_a) == list(sd_b) == ["D", "S_latent", "bias"]
    assert all(torch.equal(sd_a[k], sd_b[k]) and sd_a[k].shape == sd_b[k].shape for k in sd_a)
    assert a.D.shape == (16, 32) and repr(a) == repr(b) and "blocks" not in repr(a)
    assert torch.equal(a(x), b(x))
    lin = nn.Linear(32, 24)
    f0, f1 = DenseSparseLinear.from_linear(lin, k=16, iters=2), DenseSparseLinear.from_linear(lin, k=16, iters=2, blocks=1)
    assert torch.equal(f0.D, f1.D) and torch.equal(f0.S_latent, f1.S_latent) and f0.init_errors == f1.init_errors
    assert dense_sparse_params(24, 32, 16) == dense_sparse_params(24, 32, 16, blocks=1)
    assert k_for_compression(256, 256, 2) == k_for_compression(256, 256, 2, blocks=1) == 84


@pytest.mark.parametrize("blocks", [2, 4])
def test_blocks_state_dict_and_file_round_trip(tmp_path, blocks):
    import json

    from semisparse.io import load_tensors, save_tensors

    x = torch.randn(3, 32)
    for state in ("training", "frozen", "compressed"):
        mod = _bmod(blocks, seed=1)
        if state == "frozen":
            mod.freeze_mask()
        elif state == "compressed":
            mod.compress()
        y = mod(x).detach()
        other = _bmod(blocks, seed=9)
        other.load_state_dict(mod.state_dict(), strict=True)
        torch.testing.assert_close(other(x), y)
        p = tmp_path / f"{state}.safetensors"
        mod.save(p)
        tensors, header = load_tensors(p)
        assert header["blocks"] == blocks and tuple(tensors["D"].shape) == (blocks * 8, 32)
        got = DenseSparseLinear.load(p)
        assert (got.blocks, got.k, got.compressed, got.mask_frozen) == (blocks, 8, mod.compressed, mod.mask_frozen)
        torch.testing.assert_close(got(x), y)
    # a state dict of another block count does not load
    with pytest.raises(RuntimeError, match="size mismatch for D"):
        _bmod(1).load_state_dict(_bmod(blocks).state_dict())
    # a file written before row blocks existed (no "blocks" in its header) loads with blocks=1
    mod = _mod()
    p = tmp_path / "old.safetensors"
    mod.save(p)
    tensors, header = load_tensors(p)
    del header["blocks"]
    save_tensors(tensors, p, header)
    got = DenseSparseLinear.load(p)
    assert got.blocks == 1
    torch.testing.assert_close(got(x), mod(x))
    assert "blocks" not in json.dumps(load_tensors(p)[1])


@pytest.mark.parametrize("blocks, match", [
    (5, r"blocks=5 does not divide out_features=24 \(the 24 output rows are split into 5 equal"),
    (48, r"blocks=48 does not divide out_features=24"),
    (0, r"blocks must be a positive integer .* got 0"),
    (-2, r"blocks must be a positive integer .* got -2"),
    (True, r"blocks must be a positive integer .* got True"),
    (2.0, r"blocks must be a positive integer .* got 2.0"),
    ("heads", r"blocks must be a positive integer .* got 'heads'"),
])
def test_blocks_bad_input(blocks, match):
    with pytest.raises(ValueError, match=r"DenseSparseLinear: " + match):
        DenseSparseLinear(32, 24, 8, blocks=blocks)
    with pytest.raises(ValueError, match=r"DenseSparseLinear.from_linear: " + match):
        DenseSparseLinear.from_linear(nn.Linear(32, 24), k=8, blocks=blocks)
    with pytest.raises(ValueError, match=r"k_for_compression: " + match):
        k_for_compression(24, 32, 2, blocks=blocks)


def test_blocks_budget_messages():
    # 256x256 at 2x with 4 bases: k=28 needs 28 * (4*256 + 128) = 32256 <= 32768, k=32 needs 36864
    with pytest.raises(ValueError, match=r"k=32 needs 36864 parameters \(D 4x8192 = 32768 \+ kept S 4096\), more than "
                                         r"the budget 32768\.0 .* use k <= 28"):
        DenseSparseLinear.from_linear(nn.Linear(256, 256), k=32, compression=2, blocks=4)
    with pytest.raises(ValueError, match=r"k=18 is not a multiple of M=4.*nearest valid k \(k per row block, 2 blocks\) "
                                         r"-> parameters: k=16: 1216, k=20: 1520"):
        DenseSparseLinear(32, 24, 18, blocks=2)
    with pytest.raises(ValueError, match=r"even k=4 per row block \(8 blocks\) needs"):
        k_for_compression(64, 64, 2, blocks=8)


def test_module_file_version_only_bumped_with_blocks(tmp_path):
    from semisparse.io import load_tensors

    for blocks, version in ((1, 1), (2, 2)):
        mod = DenseSparseLinear(16, 8, 8, blocks=blocks)
        mod.save(tmp_path / f"b{blocks}.safetensors")
        _, header = load_tensors(tmp_path / f"b{blocks}.safetensors")
        assert header["version"] == version
        back = DenseSparseLinear.load(tmp_path / f"b{blocks}.safetensors")
        assert back.blocks == blocks and torch.equal(back.D, mod.D)
