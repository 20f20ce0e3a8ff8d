"""Initialisations of DSFormer's ``W ~ S D`` (``S`` N:M sparse along ``k``).

* :func:`init_svd_alternating` (task-unaware): truncated SVD ``W ~ U_k S_k V_k^T``,
  ``S0 = U_k S_k^{1/2}`` (N:M projected), ``D0 = S_k^{1/2} V_k^T``; then alternate

  - mask: ``M <- top-N per group of |W D^+|`` (the unconstrained least-squares ``S``),
  - values: ``S <- argmin ||W - (S * M) D||_F`` over the entries kept by ``M`` (a few
    conjugate-gradient steps on the normal equations ``((S * M) D D^T) * M = (W D^T) * M``,
    started from ``(W D^+) * M``; ``cg_iters=0`` keeps the plain projection),
  - basis: ``D <- S^+ W`` (least squares for the masked ``S``).

  The mask step can raise the error, so the error is not monotone; the best iterate (the
  start included) is returned. The value refit matters: on the demo model's layers and on
  a random 1024x1024 Gaussian matrix at 2x it takes the error from above the same-budget
  truncated SVD's to 5-15% below it (``bench/dsformer_quality.py`` prints both).
* :func:`init_data_aware`: the same, minimising ``||(W - S D) X^T||_F`` with the
  calibration Gram ``H = X^T X`` (+ damping): with ``H = L L^T``, factorise ``W L`` and map
  back ``D <- D' L^{-1}``.

Work is done in float64; the results come back in ``W``'s dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..formats.sparse24 import nm_mask
from ..nn.dense_sparse_linear import check_k, parse_pattern

__all__ = ["Factorization", "damped_gram", "gram", "init_data_aware", "init_data_aware_blocks", "init_svd_alternating", "relative_error"]


class Factorization(NamedTuple):
    S: torch.Tensor  # [out, k], N:M sparse along k (pruned entries exactly 0)
    D: torch.Tensor  # [k, in]
    errors: list  # relative error of the start (index 0) and after each iteration
    best: int  # index into errors of the returned iterate


def relative_error(W: torch.Tensor, S: torch.Tensor, D: torch.Tensor, H: torch.Tensor | None = None) -> float:
    """``||W - S D||_F / ||W||_F``, or with ``H = X^T X`` the X-weighted
    ``||(W - S D) X^T||_F / ||W X^T||_F`` (``= sqrt(tr(E H E^T) / tr(W H W^T))``)."""
    W, S, D = (t.detach().double() for t in (W, S, D))
    E = W - S @ D
    if H is None:
        return float(E.norm() / W.norm().clamp_min(1e-300))
    H = H.detach().double()
    num = ((E @ H) * E).sum().clamp_min(0)
    den = ((W @ H) * W).sum().clamp_min(1e-300)
    return float((num / den).sqrt())


def gram(X: torch.Tensor) -> torch.Tensor:
    """``X^T X`` (float64) of calibration inputs ``X`` ``[..., in]``."""
    X = X.detach().reshape(-1, X.shape[-1]).double()
    return X.T @ X


def damped_gram(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The Gram matrix :func:`init_data_aware` factorises against: ``H`` symmetrised, plus
    ``damp * mean(diag H)`` (at least ``1e-12 * max(mean(diag H), 1)``) on the diagonal."""
    H = (H + H.T) / 2
    mean_diag = float(H.diagonal().mean())
    return H + max(damp * mean_diag, 1e-12 * max(mean_diag, 1.0)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def _lstsq(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares ``argmin_X ||A X - B||`` (rank-deficient ``A`` allowed)."""
    if A.device.type == "cpu":
        return torch.linalg.lstsq(A, B, driver="gelsd").solution
    return torch.linalg.pinv(A) @ B


def _project(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return S * nm_mask(S.abs(), n, m)


def _refit(W: torch.Tensor, D: torch.Tensor, M: torch.Tensor, S0: torch.Tensor, iters: int) -> torch.Tensor:
    """``argmin_S ||W - (S * M) D||_F`` over the entries kept by the mask ``M``: conjugate
    gradient on the normal equations ``((S * M) G) * M = (W D^T) * M``, ``G = D D^T``, started
    from ``S0 * M`` (``iters`` steps; the system is positive semi-definite on the support)."""
    Mf = M.to(W.dtype)
    S = S0 * Mf
    if iters <= 0:
        return S
    G = D @ D.T
    B = (W @ D.T) * Mf
    R = B - (S @ G) * Mf
    P = R.clone()
    rs = (R * R).sum()
    tol = 1e-24 * float(B.square().sum().clamp_min(1e-300))
    for _ in range(iters):
        if float(rs) <= tol:
            break
        AP = (P @ G) * Mf
        pap = (P * AP).sum()
        if float(pap) <= 0:
            break
        a = rs / pap
        S = S + a * P
        R = R - a * AP
        rn = (R * R).sum()
        P = R + (rn / rs) * P
        rs = rn
    return S


def _alternate(W: torch.Tensor, k: int, n: int, m: int, iters: int, cg_iters: int = 10):
    """Factorise float64 ``W`` (out x in); returns (S, D, errors, best) in float64."""
    out_f, in_f = W.shape
    U, sig, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(k, sig.numel())
    root = sig[:r].sqrt()
    S = torch.zeros(out_f, k, dtype=W.dtype, device=W.device)
    D = torch.zeros(k, in_f, dtype=W.dtype, device=W.device)
    S[:, :r] = U[:, :r] * root
    D[:r] = root[:, None] * Vh[:r]
    S = _project(S, n, m)
    wn = W.norm().clamp_min(1e-300)

    def err(S, D):
        return float((W - S @ D).norm() / wn)

    errors = [err(S, D)]
    best = (errors[0], S, D, 0)
    for it in range(1, iters + 1):
        Sf = _lstsq(D.T, W.T).T  # unconstrained S = W D^+
        S = _refit(W, D, nm_mask(Sf.abs(), n, m), Sf, cg_iters)  # its top-N mask, values refit
        D = _lstsq(S, W)  # D <- S^+ W for the masked S
        errors.append(err(S, D))
        if errors[-1] < best[0]:
            best = (errors[-1], S, D, it)
    return best[1], best[2], errors, best[3]


def _check(W: torch.Tensor, k: int, pattern, iters: int, where: str, cg_iters: int = 0) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}: W must be a 2-D floating tensor [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    n, m = parse_pattern(pattern)
    check_k(W.shape[0], W.shape[1], k, n, m, where=where)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{where}: iters must be an integer >= 0, got {iters!r}")
    if not isinstance(cg_iters, int) or isinstance(cg_iters, bool) or cg_iters < 0:
        raise ValueError(f"{where}: cg_iters must be an integer >= 0, got {cg_iters!r}")
    return n, m


def init_svd_alternating(W: torch.Tensor, k: int, pattern="2:4", iters: int = 10, cg_iters: int = 10) -> Factorization:
    """Task-unaware init of ``W ~ S D`` (see the module docs); ``errors`` are relative
    Frobenius errors, ``errors[0]`` that of plain SVD + N:M projection. Cost per iteration:
    two least-squares solves plus ``cg_iters`` products ``[out, k] @ [k, k]`` (float64)."""
    n, m = _check(W, k, pattern, iters, "init_svd_alternating", cg_iters)
    S, D, errors, best = _alternate(W.detach().double(), k, n, m, iters, cg_iters)
    return Factorization(S.to(W.dtype), D.to(W.dtype), errors, best)


def init_data_aware(
    W: torch.Tensor, X_or_gram: torch.Tensor, k: int, pattern="2:4", iters: int = 10,
    damp: float = 0.01, is_gram: bool | None = None, cg_iters: int = 10,
) -> Factorization:
    """Init minimising ``||(W - S D) X^T||_F``. ``X_or_gram``: calibration inputs ``X``
    ``[..., in]`` or their Gram ``X^T X`` ``[in, in]`` (taken as a Gram when square
    ``in x in`` and symmetric, unless ``is_gram`` says otherwise). ``damp`` adds
    ``damp * mean(diag H)`` to the diagonal. ``errors`` are relative X-weighted errors under
    the damped ``H``."""
    return init_data_aware_blocks(W, X_or_gram, k, 1, pattern, iters, damp, is_gram, cg_iters)[0][0]


def init_data_aware_blocks(
    W: torch.Tensor, X_or_gram: torch.Tensor, k: int, blocks: int, pattern="2:4", iters: int = 10,
    damp: float = 0.01, is_gram: bool | None = None, cg_iters: int = 10,
) -> tuple[list[Factorization], torch.Tensor]:
    """:func:`init_data_aware` on each of ``blocks`` equal contiguous row blocks of ``W``
    (per-row-block bases): the blocks share their input, so one damped Gram ``H`` and one
    Cholesky factor serve them all. Returns the blocks' factorizations and ``H`` (float64)."""
    n, m = _check(W, k, pattern, iters, "init_data_aware", cg_iters)
    out_f, in_f = W.shape
    if not isinstance(blocks, int) or blocks < 1 or out_f % blocks:
        raise ValueError(f"init_data_aware: blocks must be a positive integer dividing out={out_f}, got {blocks!r}")
    A = X_or_gram.detach().double().to(W.device)
    if is_gram is None:
        is_gram = A.dim() == 2 and tuple(A.shape) == (in_f, in_f) and bool(torch.allclose(A, A.T))
    H = A if is_gram else gram(A)
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"init_data_aware: the Gram matrix must be [{in_f}, {in_f}], got {tuple(H.shape)}")
    H = damped_gram(H, damp)
    L = torch.linalg.cholesky(H)  # H = L L^T
    WL = W.detach().double() @ L
    r = out_f // blocks
    results = []
    for b in range(blocks):
        S, Dp, errors, best = _alternate(WL[b * r:(b + 1) * r], k, n, m, iters, cg_iters)
        # D = D' L^{-1}  <=>  D L = D'  <=>  L^T D^T = D'^T
        D = torch.linalg.solve_triangular(L.T, Dp.T, upper=True).T
        results.append(Factorization(S.to(W.dtype), D.to(W.dtype), errors, best))
    return results, H
