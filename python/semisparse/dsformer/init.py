"""Initialisations of DSFormer's ``W ~ S D`` (``S`` N:M sparse along ``k``).

* :func:`init_svd_alternating` (task-unaware): truncated SVD ``W ~ U_k S_k V_k^T``,
  ``S0 = U_k S_k^{1/2}`` (N:M projected), ``D0 = S_k^{1/2} V_k^T``; then alternate
  ``S <- P_NM(W D^+)`` and ``D <- S^+ W`` (least squares for the masked ``S``). The
  projection can raise the error, so the error is not monotone; the best iterate (the start
  included) is returned.
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

__all__ = ["Factorization", "gram", "init_data_aware", "init_svd_alternating", "relative_error"]


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


def _lstsq(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares ``argmin_X ||A X - B||`` (rank-deficient ``A`` allowed)."""
    if A.device.type == "cpu":
        return torch.linalg.lstsq(A, B, driver="gelsd").solution
    return torch.linalg.pinv(A) @ B


def _project(S: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return S * nm_mask(S.abs(), n, m)


def _alternate(W: torch.Tensor, k: int, n: int, m: int, iters: int):
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
        S = _project(_lstsq(D.T, W.T).T, n, m)  # S <- P_NM(W D^+)
        D = _lstsq(S, W)  # D <- S^+ W for the masked S
        errors.append(err(S, D))
        if errors[-1] < best[0]:
            best = (errors[-1], S, D, it)
    return best[1], best[2], errors, best[3]


def _check(W: torch.Tensor, k: int, pattern, iters: int, where: str) -> tuple[int, int]:
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}: W must be a 2-D floating tensor [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    n, m = parse_pattern(pattern)
    check_k(W.shape[0], W.shape[1], k, n, m, where=where)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"{where}: iters must be an integer >= 0, got {iters!r}")
    return n, m


def init_svd_alternating(W: torch.Tensor, k: int, pattern="2:4", iters: int = 10) -> Factorization:
    """Task-unaware init of ``W ~ S D`` (see the module docs); ``errors`` are relative
    Frobenius errors, ``errors[0]`` that of plain SVD + N:M projection."""
    n, m = _check(W, k, pattern, iters, "init_svd_alternating")
    S, D, errors, best = _alternate(W.detach().double(), k, n, m, iters)
    return Factorization(S.to(W.dtype), D.to(W.dtype), errors, best)


def init_data_aware(
    W: torch.Tensor, X_or_gram: torch.Tensor, k: int, pattern="2:4", iters: int = 10,
    damp: float = 0.01, is_gram: bool | None = None,
) -> Factorization:
    """Init minimising ``||(W - S D) X^T||_F``. ``X_or_gram``: calibration inputs ``X``
    ``[..., in]`` or their Gram ``X^T X`` ``[in, in]`` (taken as a Gram when square
    ``in x in`` and symmetric, unless ``is_gram`` says otherwise). ``damp`` adds
    ``damp * mean(diag H)`` to the diagonal. ``errors`` are relative X-weighted errors under
    the damped ``H``."""
    n, m = _check(W, k, pattern, iters, "init_data_aware")
    in_f = W.shape[1]
    A = X_or_gram.detach().double().to(W.device)
    if is_gram is None:
        is_gram = A.dim() == 2 and tuple(A.shape) == (in_f, in_f) and bool(torch.allclose(A, A.T))
    H = A if is_gram else gram(A)
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"init_data_aware: the Gram matrix must be [{in_f}, {in_f}], got {tuple(H.shape)}")
    H = (H + H.T) / 2
    mean_diag = float(H.diagonal().mean())
    H = H + max(damp * mean_diag, 1e-12 * max(mean_diag, 1.0)) * torch.eye(in_f, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)  # H = L L^T
    S, Dp, errors, best = _alternate(W.detach().double() @ L, k, n, m, iters)
    # D = D' L^{-1}  <=>  D L = D'  <=>  L^T D^T = D'^T
    D = torch.linalg.solve_triangular(L.T, Dp.T, upper=True).T
    return Factorization(S.to(W.dtype), D.to(W.dtype), errors, best)
