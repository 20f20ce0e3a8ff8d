"""2:4 semi-structured sparsity ops: schemas (defined once, here), fake kernels,
autograd formulas and the pure-torch references.

The C++ libraries register CPU / CUDA kernels under the same names; the references are
registered as the ``CompositeExplicitAutograd`` (default) kernel, so any device without
a native kernel runs them.

Layout "cpu" of a 2:4 matrix ``W`` of shape ``[N, K]`` (``K % 4 == 0``):

* ``values [N, K/2]``: the two kept entries of each group of 4 columns, in column order;
* ``meta [N, ceil(K/8)]`` uint8: a 4-bit code ``idx0 | idx1 << 2`` per group (kept
  positions, ``idx0 < idx1``), group ``g`` in byte ``g // 2``, low nibble for even ``g``.

Groups with fewer than two non-zeros are encoded exactly as PyTorch/CUTLASS encode them
(``CODE_FROM_MASK``), so the ``cutlass_sm80`` layout is a pure reordering of this one.
Zeros of either sign count as pruned and are stored as ``+0.0``.
"""

from __future__ import annotations

import torch

__all__ = [
    "CODE_FROM_MASK",
    "meta_cols",
    "codes_from_meta",
    "kept_columns",
    "check_meta",
    "compress_reference",
    "decompress_reference",
    "linear_reference",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_linear",
]

_lib = torch.library.Library("semisparse", "FRAGMENT")  # noqa: TOR901
_lib.define("sparse24_compress(Tensor dense) -> (Tensor values, Tensor meta)")
_lib.define("sparse24_decompress(Tensor values, Tensor meta) -> Tensor")
_lib.define("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor")

# non-zero mask of a group (bit i = element i non-zero) -> code idx0 | idx1 << 2
CODE_FROM_MASK = (14, 8, 9, 4, 14, 8, 9, 4, 14, 12, 13, 4, 14, 12, 13, 4)
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def meta_cols(k: int) -> int:
    return (k + 7) // 8


# ----------------------------------------------------------------- references
def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return t != 0  # False for both +0.0 and -0.0


def compress_reference(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = dense.shape
    g = dense.reshape(n, k // 4, 4)
    bits = (_nonzero(g).to(torch.uint8) << torch.arange(4, device=dense.device, dtype=torch.uint8)).sum(
        -1, dtype=torch.int64
    )
    code = torch.tensor(CODE_FROM_MASK, dtype=torch.int64, device=dense.device)[bits]
    idx = torch.stack((code & 3, code >> 2), dim=-1)
    vals = g.gather(-1, idx)
    vals = torch.where(_nonzero(vals), vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    values = vals.reshape(n, k // 2).contiguous()
    codes = code.to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(n, -1, 2)
    meta = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return values, meta


def codes_from_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta [N, ceil(K/8)] uint8 -> int64 codes [N, K/4]."""
    lo = meta & 15
    hi = meta >> 4
    codes = torch.stack((lo, hi), dim=-1).reshape(meta.shape[0], -1)[:, : k // 4]
    return codes.to(torch.int64)


def kept_columns(meta: torch.Tensor, k: int) -> torch.Tensor:
    """The column index of every stored value: int64 [N, K/2]."""
    codes = codes_from_meta(meta, k)
    base = torch.arange(0, k, 4, device=meta.device, dtype=torch.int64)
    cols = torch.stack((base + (codes & 3), base + (codes >> 2)), dim=-1)
    return cols.reshape(meta.shape[0], k // 2)


def check_meta(meta: torch.Tensor, k: int, where: str = "meta") -> None:
    """Raise ValueError unless every 4-bit code of ``meta`` (layout "cpu", K columns) names
    two distinct kept positions in increasing order, as compress writes them. Kernels
    read any code, but codes outside that set are not a 2:4 layout."""
    codes = codes_from_meta(meta, k)
    bad = (codes & 3) >= (codes >> 2)
    if bool(bad.any()):
        r, g = (int(i) for i in bad.nonzero()[0])
        c = int(codes[r, g])
        raise ValueError(
            f"{where}: invalid 2:4 metadata at row {r}, columns {4 * g}..{4 * g + 3}: code {c:#06b} "
            f"keeps positions {c & 3} and {c >> 2} (expected two distinct positions, the lower first)"
        )


def decompress_reference(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    n, h = values.shape
    k = 2 * h
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, kept_columns(meta, k), values)


def linear_reference(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W^T + bias, accumulated in fp32 (fp64 for fp64), returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = decompress_reference(values, meta).to(acc)
    b = None if bias is None else bias.to(acc)
    return torch.nn.functional.linear(x.to(acc), w, b).to(x.dtype)


# ------------------------------------------------------------- input checking
def _check_compressed(values: torch.Tensor, meta: torch.Tensor, op: str) -> None:
    torch._check(values.dim() == 2, lambda: f"{op}: values must be 2-D [N, K/2], got {values.dim()} dims")
    torch._check(meta.dim() == 2, lambda: f"{op}: meta must be 2-D [N, ceil(K/8)], got {meta.dim()} dims")
    torch._check(meta.dtype == torch.uint8, lambda: f"{op}: meta must be uint8, got {meta.dtype}")
    torch._check(values.dtype in _SUPPORTED, lambda: f"{op}: values must be float32/bfloat16/float16, got {values.dtype}")
    k = 2 * values.shape[1]
    torch._check(k % 4 == 0, lambda: f"{op}: values must have K/2 columns with K a multiple of 4, got {values.shape[1]}")
    torch._check(
        tuple(meta.shape) == (values.shape[0], meta_cols(k)),
        lambda: f"{op}: meta must have shape ({values.shape[0]}, {meta_cols(k)}), got {tuple(meta.shape)}",
    )


def _check_linear(x, values, meta, bias) -> None:
    op = "sparse24_linear"
    _check_compressed(values, meta, op)
    k = 2 * values.shape[1]
    torch._check(x.dim() >= 1 and x.shape[-1] == k, lambda: f"{op}: x must end in K={k} features, got shape {tuple(x.shape)}")
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x has dtype {x.dtype} but the sparse weight has {values.dtype}")
    torch._check(x.device == values.device, lambda: f"{op}: x is on {x.device} but the sparse weight is on {values.device}")
    if bias is not None:
        torch._check(bias.dtype == values.dtype, lambda: f"{op}: bias has dtype {bias.dtype}, expected {values.dtype}")
        torch._check(tuple(bias.shape) == (values.shape[0],), lambda: f"{op}: bias must have shape ({values.shape[0]},), got {tuple(bias.shape)}")


# ------------------------------------------------- default (reference) kernels
def _compress_default(dense):
    torch._check(dense.dim() == 2, lambda: f"sparse24_compress: dense must be 2-D, got {dense.dim()} dims")
    torch._check(dense.shape[1] % 4 == 0, lambda: f"sparse24_compress: last dim must be a multiple of 4, got {dense.shape[1]}")
    return compress_reference(dense)


def _decompress_default(values, meta):
    _check_compressed(values, meta, "sparse24_decompress")
    return decompress_reference(values, meta)


def _linear_default(x, values, meta, bias=None):
    _check_linear(x, values, meta, bias)
    return linear_reference(x, values, meta, bias)


_lib.impl("sparse24_compress", _compress_default, "CompositeExplicitAutograd")
_lib.impl("sparse24_decompress", _decompress_default, "CompositeExplicitAutograd")
_lib.impl("sparse24_linear", _linear_default, "CompositeExplicitAutograd")


# ------------------------------------------------------------- fake kernels
@torch.library.register_fake("semisparse::sparse24_compress")
def _compress_fake(dense):
    torch._check(dense.dim() == 2, lambda: "sparse24_compress: dense must be 2-D")
    n, k = dense.shape
    return dense.new_empty(n, k // 2), dense.new_empty(n, meta_cols(k), dtype=torch.uint8)


@torch.library.register_fake("semisparse::sparse24_decompress")
def _decompress_fake(values, meta):
    _check_compressed(values, meta, "sparse24_decompress")
    return values.new_empty(values.shape[0], 2 * values.shape[1])


@torch.library.register_fake("semisparse::sparse24_linear")
def _linear_fake(x, values, meta, bias=None):
    _check_linear(x, values, meta, bias)
    return x.new_empty(*x.shape[:-1], values.shape[0])


# ---------------------------------------------------------------- autograd
def _linear_setup(ctx, inputs, output):
    x, values, meta, bias = inputs
    ctx.save_for_backward(x, values, meta)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, gy):
    x, values, meta = ctx.saved_tensors
    gx = gvalues = gbias = None
    k = x.shape[-1]
    if ctx.needs_input_grad[0]:
        w = torch.ops.semisparse.sparse24_decompress(values, meta)
        gx = gy @ w
    if ctx.needs_input_grad[1]:
        # dL/dW restricted to the kept positions (the mask is fixed): an SDDMM
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, k)
        gw = g2.transpose(0, 1) @ x2
        gvalues = gw.gather(1, kept_columns(meta, k))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gbias = gy.reshape(-1, gy.shape[-1]).sum(0)
    return gx, gvalues, None, gbias


torch.library.register_autograd("semisparse::sparse24_linear", _linear_backward, setup_context=_linear_setup)


# dense = scatter(values at the kept columns): the gradient of values is a gather
def _decompress_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _decompress_backward(ctx, gdense):
    (meta,) = ctx.saved_tensors
    return gdense.gather(1, kept_columns(meta, gdense.shape[1])), None


torch.library.register_autograd(
    "semisparse::sparse24_decompress", _decompress_backward, setup_context=_decompress_setup
)


# ---------------------------------------------------------- python entry points
def sparse24_compress(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.semisparse.sparse24_compress(dense)


def sparse24_decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return torch.ops.semisparse.sparse24_decompress(values, meta)


def sparse24_linear(x, values, meta, bias=None) -> torch.Tensor:
    return torch.ops.semisparse.sparse24_linear(x, values, meta, bias)
