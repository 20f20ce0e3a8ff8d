"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with an approximate second-order
(OBS) weight update, written from the paper's description.

Formulation. A layer ``Y = X W^T`` (``W`` is ``[out, in]``, ``X`` is ``[tokens, in]``) is
pruned row by row to minimise ``||X w - X w'||^2`` for every output row ``w``. The rows
share the Hessian ``H = (2/n) X^T X`` (``[in, in]``, ``n`` calibration tokens). Removing
input ``j`` from the set ``F`` of not-yet-processed columns costs (optimal brain surgeon)
``w_j^2 / [H_F^-1]_jj`` and is compensated by ``delta_F = -(w_j / [H_F^-1]_jj) H_F^-1[:, j]``.
SparseGPT processes columns left to right so every row shares the same sequence of
``H_F^-1``; row ``j`` of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``) is
exactly ``H_F^-1[j, j:] / sqrt([H_F^-1]_jj)`` with ``F = {j, j+1, ...}``, so with
``d_j = U_jj``:

- saliency of ``w_j``: ``w_j^2 / d_j^2``;
- after fixing column ``j`` to ``q_j`` (``w_j`` or 0): ``err = (w_j - q_j) / d_j`` and
  ``W[:, j:] -= err U[j, j:]``.

Columns run in blocks of ``blocksize``: inside a block the update is applied column by
column; the remaining columns receive the block's accumulated ``Err @ U[block, rest]``
once at the end of the block ("lazy batch" update, identical in exact arithmetic).

Mask selection. N:M: at the first column of every group of M, each row keeps the N of
the group's M weights with the largest saliency (using the weights as updated by all
earlier columns). Unstructured with ratio ``p``: at the start of every column block, the
``round(p * rows * blocksize)`` lowest-saliency weights of the block are pruned
("adaptive mask selection"; the block is ranked as a whole, across rows).

Choices where the paper is silent, following the authors' public implementation:
``H`` gets ``damp * mean(diag(H))`` added to its diagonal (``damp=0.01``); a "dead"
input (``H_jj == 0``: the feature was always zero on the calibration data) gets
``H_jj = 1`` and its column of ``W`` is zeroed before anything else (its weight never
mattered on the data). Ties in the saliency keep the lower index. The computation runs in
float32 (float64 for a float64 weight) whatever the layer's dtype.

``update=False`` is the mask-only variant (MaskLLM's prior): the mask is selected by the
same sequential procedure (with the compensation applied internally, as selection
depends on it) but the returned weight is the original weight times the mask.
"""

from __future__ import annotations

import torch

from .patterns import SparsityPattern, keep_nm, keep_top_flat, n_pruned_of

__all__ = ["sparsegpt_prune", "HessianStats"]


class HessianStats:
    """Accumulates ``X^T X`` over the calibration tokens of one layer's input; ``hessian()``
    returns ``H = (2/n) X^T X``. float32 (float64 for a float64 layer)."""

    def __init__(self, in_features: int, device, dtype: torch.dtype = torch.float32):
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``[tokens, in_features]``."""
        x = x.to(device=self.xtx.device, dtype=self.xtx.dtype)
        self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    *,
    update: bool = True,
    damp: float = 0.01,
    blocksize: int = 128,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune a ``[out, in]`` weight with SparseGPT given its ``[in, in]`` Hessian.

    Returns ``(new_weight, keep)``: the pruned (and, with ``update=True``, compensated)
    weight in ``weight``'s dtype and device, and the bool keep-mask. Neither input is
    modified. ``name`` only labels error messages.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt: {name}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"sparsegpt: {name}: Hessian shape {tuple(hessian.shape)} does not match in_features={cols}")
    if pattern.structured and (cols % pattern.m or blocksize % pattern.m):
        raise ValueError(
            f"sparsegpt: {name}: in_features={cols} and blocksize={blocksize} must be multiples of M={pattern.m}"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype=dtype, copy=True)
    H = hessian.detach().to(device=W.device, dtype=dtype, copy=True)

    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    W[:, dead] = 0.0
    diag.add_(damp * diag.mean())
    chol, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(
            f"sparsegpt: {name}: the damped Hessian is not positive definite (damp={damp}); "
            "increase damp or the amount of calibration data"
        )
    del H, chol

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        if pattern.structured:
            p1 = torch.zeros_like(W1, dtype=torch.bool)
        else:
            p1 = ~keep_top_flat(W1.square() / d1.square(), n_pruned_of(W1.numel(), pattern.ratio))
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                p1[:, g] = ~keep_nm(W1[:, g].square() / d1[g].square(), pattern)
            w = W1[:, i]
            q = w.masked_fill(p1[:, i], 0.0)
            err = (w - q) / d1[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1.0)
            W1[:, i] = q  # exact: w - err * d == q up to rounding
            Err1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
        pruned[:, i1:i2] = p1

    keep = ~pruned
    if update:
        new = W.to(weight.dtype)
    else:
        new = weight.detach().masked_fill(pruned, 0.0)
    return new, keep
