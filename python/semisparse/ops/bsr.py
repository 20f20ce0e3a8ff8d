"""Block-sparse (BSR) linear ops: schemas (defined once, here), fake kernels, autograd
formulas and the pure-torch references.

The C++ library registers CPU kernels under the same names; the references are the
``CompositeExplicitAutograd`` (default) kernels, so any device without a native kernel
runs them.

A weight ``W [N, K]`` with blocks ``(bh, bw)`` is stored as torch's BSR:

* ``values [nnz, bh, bw]``: the stored blocks, block-row major;
* ``crow_indices [N/bh + 1]`` int64: block row ``r`` holds blocks ``crow[r]:crow[r+1]``;
* ``col_indices [nnz]`` int64: the block-column index of every stored block (sorted
  within a block row).

Ops:

* ``bsr_linear(x, values, crow, col, out_features, bias)``: ``y = x @ W^T + bias``;
* ``bsr_linear_grad_input(grad_y, values, crow, col, in_features)``: ``grad_y @ W``;
* ``bsr_linear_grad_values(grad_y, x, crow, col, block_h, block_w)``: for each stored block
  ``(r, c)``: ``grad_y[:, r-block]^T @ x[:, c-block]`` (an SDDMM on the stored blocks).

All accumulate in fp32 (fp64 for fp64) and return the input dtype.
"""

from __future__ import annotations

import torch

__all__ = [
    "to_dense_reference",
    "block_rows",
    "linear_reference",
    "grad_input_reference",
    "grad_values_reference",
    "bsr_linear",
    "bsr_linear_grad_input",
    "bsr_linear_grad_values",
]

_lib = torch.library.Library("semisparse", "FRAGMENT")  # noqa: TOR901
_lib.define(
    "bsr_linear(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, int out_features, "
    "Tensor? bias=None) -> Tensor"
)
_lib.define(
    "bsr_linear_grad_input(Tensor grad_y, Tensor values, Tensor crow_indices, Tensor col_indices, "
    "int in_features) -> Tensor"
)
_lib.define(
    "bsr_linear_grad_values(Tensor grad_y, Tensor x, Tensor crow_indices, Tensor col_indices, "
    "int block_h, int block_w) -> Tensor"
)

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- references
def block_rows(crow_indices: torch.Tensor) -> torch.Tensor:
    """The block-row index of every stored block: int64 [nnz]."""
    nbr = crow_indices.shape[0] - 1
    counts = crow_indices[1:] - crow_indices[:-1]
    return torch.repeat_interleave(torch.arange(nbr, device=crow_indices.device), counts)


def to_dense_reference(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, n: int, k: int
) -> torch.Tensor:
    """The dense ``[n, k]`` weight (differentiable in ``values``)."""
    bh, bw = values.shape[1], values.shape[2]
    nbr, nbc = n // bh, k // bw
    rows = block_rows(crow_indices)
    dense = values.new_zeros(nbr, nbc, bh, bw)
    dense = dense.index_put((rows, col_indices), values)
    return dense.permute(0, 2, 1, 3).reshape(n, k)


def linear_reference(x, values, crow_indices, col_indices, out_features, bias=None):
    acc = _acc(x.dtype)
    w = to_dense_reference(values, crow_indices, col_indices, out_features, x.shape[-1]).to(acc)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.linear(x.to(acc), w, b).to(x.dtype)


def grad_input_reference(grad_y, values, crow_indices, col_indices, in_features):
    acc = _acc(grad_y.dtype)
    w = to_dense_reference(values, crow_indices, col_indices, grad_y.shape[-1], in_features).to(acc)
    return (grad_y.to(acc) @ w).to(grad_y.dtype)


def grad_values_reference(grad_y, x, crow_indices, col_indices, block_h, block_w):
    acc = _acc(x.dtype)
    n, k = grad_y.shape[-1], x.shape[-1]
    g2 = grad_y.reshape(-1, n).to(acc)
    x2 = x.reshape(-1, k).to(acc)
    gw = g2.t() @ x2  # [n, k]
    blocks = gw.reshape(n // block_h, block_h, k // block_w, block_w).permute(0, 2, 1, 3)
    return blocks[block_rows(crow_indices), col_indices].to(x.dtype).contiguous()


# ------------------------------------------------------------- input checking
def _check_index(crow_indices, col_indices, nbr: int, op: str) -> None:
    torch._check(crow_indices.dim() == 1, lambda: f"{op}: crow_indices must be 1-D, got {crow_indices.dim()} dims")
    torch._check(col_indices.dim() == 1, lambda: f"{op}: col_indices must be 1-D, got {col_indices.dim()} dims")
    torch._check(crow_indices.dtype == torch.int64, lambda: f"{op}: crow_indices must be int64, got {crow_indices.dtype}")
    torch._check(col_indices.dtype == torch.int64, lambda: f"{op}: col_indices must be int64, got {col_indices.dtype}")
    torch._check(
        crow_indices.shape[0] == nbr + 1,
        lambda: f"{op}: crow_indices must have {nbr + 1} entries (block rows + 1), got {crow_indices.shape[0]}",
    )


def _check_values(values, op: str) -> None:
    torch._check(values.dim() == 3, lambda: f"{op}: values must be 3-D [nnz, bh, bw], got {values.dim()} dims")
    torch._check(values.dtype in _SUPPORTED, lambda: f"{op}: values must be float32/bfloat16/float16/float64, got {values.dtype}")
    torch._check(values.shape[1] > 0 and values.shape[2] > 0, lambda: f"{op}: empty block shape {tuple(values.shape[1:])}")


def _check_same(a, b, an: str, bn: str, op: str) -> None:
    torch._check(a.dtype == b.dtype, lambda: f"{op}: {an} has dtype {a.dtype} but {bn} has {b.dtype}")
    torch._check(a.device == b.device, lambda: f"{op}: {an} is on {a.device} but {bn} is on {b.device}")


def _check_linear(x, values, crow_indices, col_indices, out_features, bias) -> None:
    op = "bsr_linear"
    _check_values(values, op)
    bh, bw = values.shape[1], values.shape[2]
    torch._check(out_features % bh == 0, lambda: f"{op}: out_features={out_features} is not a multiple of the block height {bh}")
    _check_index(crow_indices, col_indices, out_features // bh, op)
    torch._check(col_indices.shape[0] == values.shape[0], lambda: f"{op}: col_indices has {col_indices.shape[0]} entries but values holds {values.shape[0]} blocks")
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dim")
    torch._check(x.shape[-1] % bw == 0, lambda: f"{op}: x must end in K features, a multiple of the block width {bw}, got shape {tuple(x.shape)}")
    _check_same(x, values, "x", "values", op)
    if bias is not None:
        _check_same(bias, values, "bias", "values", op)
        torch._check(tuple(bias.shape) == (out_features,), lambda: f"{op}: bias must have shape ({out_features},), got {tuple(bias.shape)}")


def _check_grad_input(grad_y, values, crow_indices, col_indices, in_features) -> None:
    op = "bsr_linear_grad_input"
    _check_values(values, op)
    bh, bw = values.shape[1], values.shape[2]
    torch._check(grad_y.dim() >= 1, lambda: f"{op}: grad_y must have at least 1 dim")
    n = grad_y.shape[-1]
    torch._check(n % bh == 0, lambda: f"{op}: grad_y must end in N features, a multiple of the block height {bh}, got shape {tuple(grad_y.shape)}")
    torch._check(in_features % bw == 0, lambda: f"{op}: in_features={in_features} is not a multiple of the block width {bw}")
    _check_index(crow_indices, col_indices, n // bh, op)
    torch._check(col_indices.shape[0] == values.shape[0], lambda: f"{op}: col_indices has {col_indices.shape[0]} entries but values holds {values.shape[0]} blocks")
    _check_same(grad_y, values, "grad_y", "values", op)


def _check_grad_values(grad_y, x, crow_indices, col_indices, block_h, block_w) -> None:
    op = "bsr_linear_grad_values"
    torch._check(block_h > 0 and block_w > 0, lambda: f"{op}: block shape must be positive, got ({block_h}, {block_w})")
    torch._check(grad_y.dim() >= 1 and x.dim() >= 1, lambda: f"{op}: grad_y and x must have at least 1 dim")
    torch._check(tuple(grad_y.shape[:-1]) == tuple(x.shape[:-1]), lambda: f"{op}: grad_y {tuple(grad_y.shape)} and x {tuple(x.shape)} differ in their leading dims")
    n, k = grad_y.shape[-1], x.shape[-1]
    torch._check(n % block_h == 0, lambda: f"{op}: N={n} is not a multiple of the block height {block_h}")
    torch._check(k % block_w == 0, lambda: f"{op}: K={k} is not a multiple of the block width {block_w}")
    _check_index(crow_indices, col_indices, n // block_h, op)
    torch._check(x.dtype in _SUPPORTED, lambda: f"{op}: x must be float32/bfloat16/float16/float64, got {x.dtype}")
    _check_same(grad_y, x, "grad_y", "x", op)


# ------------------------------------------------- default (reference) kernels
def _linear_default(x, values, crow_indices, col_indices, out_features, bias=None):
    _check_linear(x, values, crow_indices, col_indices, out_features, bias)
    return linear_reference(x, values, crow_indices, col_indices, out_features, bias)


def _grad_input_default(grad_y, values, crow_indices, col_indices, in_features):
    _check_grad_input(grad_y, values, crow_indices, col_indices, in_features)
    return grad_input_reference(grad_y, values, crow_indices, col_indices, in_features)


def _grad_values_default(grad_y, x, crow_indices, col_indices, block_h, block_w):
    _check_grad_values(grad_y, x, crow_indices, col_indices, block_h, block_w)
    return grad_values_reference(grad_y, x, crow_indices, col_indices, block_h, block_w)


_lib.impl("bsr_linear", _linear_default, "CompositeExplicitAutograd")
_lib.impl("bsr_linear_grad_input", _grad_input_default, "CompositeExplicitAutograd")
_lib.impl("bsr_linear_grad_values", _grad_values_default, "CompositeExplicitAutograd")


# ------------------------------------------------------------- fake kernels
@torch.library.register_fake("semisparse::bsr_linear")
def _linear_fake(x, values, crow_indices, col_indices, out_features, bias=None):
    _check_linear(x, values, crow_indices, col_indices, out_features, bias)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.register_fake("semisparse::bsr_linear_grad_input")
def _grad_input_fake(grad_y, values, crow_indices, col_indices, in_features):
    _check_grad_input(grad_y, values, crow_indices, col_indices, in_features)
    return grad_y.new_empty(*grad_y.shape[:-1], in_features)


@torch.library.register_fake("semisparse::bsr_linear_grad_values")
def _grad_values_fake(grad_y, x, crow_indices, col_indices, block_h, block_w):
    _check_grad_values(grad_y, x, crow_indices, col_indices, block_h, block_w)
    return x.new_empty(col_indices.shape[0], block_h, block_w)


# ---------------------------------------------------------------- autograd
def _linear_setup(ctx, inputs, output):
    x, values, crow_indices, col_indices, out_features, bias = inputs
    ctx.save_for_backward(x, values, crow_indices, col_indices)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, gy):
    x, values, crow_indices, col_indices = ctx.saved_tensors
    gx = gvalues = gbias = None
    gy = gy.contiguous()
    if ctx.needs_input_grad[0]:
        gx = torch.ops.semisparse.bsr_linear_grad_input(gy, values, crow_indices, col_indices, x.shape[-1])
    if ctx.needs_input_grad[1]:
        gvalues = torch.ops.semisparse.bsr_linear_grad_values(
            gy, x, crow_indices, col_indices, values.shape[1], values.shape[2]
        )
    if ctx.has_bias and ctx.needs_input_grad[5]:
        gbias = gy.reshape(-1, gy.shape[-1]).sum(0, dtype=_acc(gy.dtype)).to(gy.dtype)
    return gx, gvalues, None, None, None, gbias


torch.library.register_autograd("semisparse::bsr_linear", _linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------- python entry points
def bsr_linear(x, values, crow_indices, col_indices, out_features: int, bias=None) -> torch.Tensor:
    return torch.ops.semisparse.bsr_linear(x, values, crow_indices, col_indices, out_features, bias)


def bsr_linear_grad_input(grad_y, values, crow_indices, col_indices, in_features: int) -> torch.Tensor:
    return torch.ops.semisparse.bsr_linear_grad_input(grad_y, values, crow_indices, col_indices, in_features)


def bsr_linear_grad_values(grad_y, x, crow_indices, col_indices, block_h: int, block_w: int) -> torch.Tensor:
    return torch.ops.semisparse.bsr_linear_grad_values(grad_y, x, crow_indices, col_indices, block_h, block_w)
