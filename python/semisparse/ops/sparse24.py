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
(``CODE_FROM_MASK``), so the GPU layouts are pure reorderings of this one.
Zeros of either sign count as pruned and are stored as ``+0.0``.

GPU layouts (``LAYOUTS``; fp16/bf16 values ``[N, K/2]`` row-major as above, the same 4-bit
codes, moved; the index math is shared with the C++/CUDA kernels in
``csrc/sparse24/meta_layout.h``):

* ``cutlass_sm80`` (``N % 32 == 0``, ``K % 32 == 0``): meta int16 ``[N, K/16]`` in CUTLASS
  2.x's ColumnMajorInterleaved<2> order (bit-identical to PyTorch's
  ``sparse_semi_structured_from_dense_cutlass``); read by the sm80 GEMM and the small-M kernel.
* ``cutlass_sm90`` (``N % 64 == 0``, ``K % 64 == 0``): meta uint8 ``[K/64, N/64, 512]``, the
  E layout of CUTLASS 3.x's ``Sm90GemmSparseConfig`` for 16-bit operands with tile K 64;
  read by the sm90a GEMM and the small-M kernel.

Ops on every layout: ``sparse24_pack`` (dense -> values, meta; optionally pruning by
magnitude on the fly), ``sparse24_unpack`` (the inverse) and ``sparse24_mm``
(``act(x @ W^T + b)`` with the activation fused).
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
    "LAYOUTS",
    "ACTIVATIONS",
    "layout_meta_spec",
    "check_layout_shape",
    "meta_to_cpu",
    "meta_from_cpu",
    "pack_reference",
    "unpack_reference",
    "mm_reference",
    "sparse24_pack",
    "sparse24_unpack",
    "sparse24_mm",
]

_lib = torch.library.Library("semisparse", "FRAGMENT")  # noqa: TOR901
_lib.define("sparse24_compress(Tensor dense) -> (Tensor values, Tensor meta)")
_lib.define("sparse24_decompress(Tensor values, Tensor meta) -> Tensor")
_lib.define("sparse24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor")
_lib.define("sparse24_pack(Tensor dense, str layout, bool prune=False) -> (Tensor values, Tensor meta)")
_lib.define("sparse24_unpack(Tensor values, Tensor meta, str layout) -> Tensor")
_lib.define(
    "sparse24_mm(Tensor x, Tensor values, Tensor meta, str layout, Tensor? bias=None, "
    "str activation='none') -> Tensor"
)

LAYOUTS = ("cpu", "cutlass_sm80", "cutlass_sm90")
ACTIVATIONS = ("none", "relu", "gelu", "silu")
# (rows, columns) multiples of each GPU layout
_LAYOUT_MULTIPLE = {"cutlass_sm80": (32, 32), "cutlass_sm90": (64, 64)}

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


def _check_x_bias(x, values, bias, op: str) -> None:
    """x [..., K] and bias [N] against the sparse weight's values [N, K/2]."""
    k = 2 * values.shape[1]
    torch._check(x.dim() >= 1 and x.shape[-1] == k, lambda: f"{op}: x must end in K={k} features, got shape {tuple(x.shape)}")
    torch._check(x.dtype == values.dtype, lambda: f"{op}: x has dtype {x.dtype} but the sparse weight has {values.dtype}")
    torch._check(x.device == values.device, lambda: f"{op}: x is on {x.device} but the sparse weight is on {values.device}")
    if bias is not None:
        torch._check(bias.dtype == values.dtype, lambda: f"{op}: bias has dtype {bias.dtype}, expected {values.dtype}")
        torch._check(tuple(bias.shape) == (values.shape[0],), lambda: f"{op}: bias must have shape ({values.shape[0]},), got {tuple(bias.shape)}")
        torch._check(bias.device == values.device, lambda: f"{op}: bias is on {bias.device} but the sparse weight is on {values.device}")


def _check_linear(x, values, meta, bias) -> None:
    _check_compressed(values, meta, "sparse24_linear")
    _check_x_bias(x, values, bias, "sparse24_linear")


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


# ================================================================ GPU layouts
def layout_meta_spec(layout: str, n: int, k: int) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of the metadata of an ``[n, k]`` matrix in ``layout``."""
    if layout == "cpu":
        return (n, meta_cols(k)), torch.uint8
    if layout == "cutlass_sm80":
        return (n, k // 16), torch.int16
    if layout == "cutlass_sm90":
        return (k // 64, n // 64, 512), torch.uint8
    raise ValueError(f"semisparse: layout must be one of {LAYOUTS}, got {layout!r}")


def check_layout_shape(layout: str, n: int, k: int, dtype: torch.dtype, op: str) -> None:
    """Raise ValueError / TypeError unless an ``[n, k]`` matrix of ``dtype`` fits ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "cpu":
        if k % 4:
            raise ValueError(f"{op}: layout 'cpu' needs K a multiple of 4, got K={k} (shape {(n, k)})")
        return
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: layout {layout!r} takes float16 or bfloat16, got {dtype}")
    rm, cm = _LAYOUT_MULTIPLE[layout]
    if n % rm:
        raise ValueError(f"{op}: layout {layout!r} needs N a multiple of {rm}, got N={n} (shape {(n, k)})")
    if k % cm:
        raise ValueError(f"{op}: layout {layout!r} needs K a multiple of {cm}, got K={k} (shape {(n, k)})")


def _sm80_word_offsets(rows: int, ncols: int, device) -> torch.Tensor:
    """Flat int16-word index in the cutlass_sm80 metadata of every word (r, c) of the
    row-major ``[rows, K/16]`` code words (meta_layout.h: sm80_meta_word)."""
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, ncols)
    c = torch.arange(ncols, device=device).unsqueeze(0).expand(rows, ncols)
    r = (r // 32) * 32 + (r % 8) * 4 + (r % 32) // 8
    swap_up = (r % 2 == 0) & (c % 2 == 1)  # top-right of a 2x2 block -> bottom-left
    swap_dn = (r % 2 == 1) & (c % 2 == 0)
    d = swap_up.long() - swap_dn.long()
    r = r + d
    c = c - d
    return ((c // 2) * rows * 2 + r * 2 + (c % 2)).reshape(-1)


def _sm90_byte_offsets(rows: int, nbytes: int, device) -> torch.Tensor:
    """Flat byte index in the cutlass_sm90 metadata of every byte (r, j) (columns 8j..8j+7
    of row r) of the row-major ``[rows, K/8]`` code bytes (meta_layout.h: sm90_meta_byte)."""
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, nbytes)
    k = 8 * torch.arange(nbytes, device=device).unsqueeze(0).expand(rows, nbytes)
    m_in, k_in = r % 64, k % 64
    idx = (
        (k_in % 16) + 16 * ((m_in // 8) % 2) + 32 * (k_in // 32) + 64 * (m_in % 8)
        + 512 * ((k_in // 16) % 2) + 1024 * (m_in // 16) + 4096 * (r // 64) + (k // 64) * rows * 64
    )
    return (idx // 8).reshape(-1)


def meta_from_cpu(meta: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """Layout "cpu" metadata of an ``[n, k]`` matrix -> the same codes in ``layout``."""
    if layout == "cpu":
        return meta
    shape, dtype = layout_meta_spec(layout, n, k)
    if layout == "cutlass_sm80":
        words = meta.contiguous().view(torch.int16)  # 4 groups per little-endian int16
        out = torch.empty(n * (k // 16), dtype=torch.int16, device=meta.device)
        out[_sm80_word_offsets(n, k // 16, meta.device)] = words.reshape(-1)
    else:
        out = torch.empty(n * (k // 8), dtype=torch.uint8, device=meta.device)
        out[_sm90_byte_offsets(n, k // 8, meta.device)] = meta.reshape(-1)
    return out.view(shape)


def meta_to_cpu(meta: torch.Tensor, layout: str, n: int, k: int) -> torch.Tensor:
    """``layout`` metadata of an ``[n, k]`` matrix -> layout "cpu" (uint8 ``[n, ceil(k/8)]``)."""
    if layout == "cpu":
        return meta
    if layout == "cutlass_sm80":
        words = meta.reshape(-1)[_sm80_word_offsets(n, k // 16, meta.device)]
        return words.view(n, k // 16).contiguous().view(torch.uint8)
    if layout == "cutlass_sm90":
        return meta.reshape(-1)[_sm90_byte_offsets(n, k // 8, meta.device)].view(n, k // 8)
    raise ValueError(f"semisparse: layout must be one of {LAYOUTS}, got {layout!r}")


def _check_layout_meta(values: torch.Tensor, meta: torch.Tensor, layout: str, op: str) -> None:
    torch._check(values.dim() == 2, lambda: f"{op}: values must be 2-D [N, K/2], got {values.dim()} dims")
    torch._check(values.dtype in _SUPPORTED, lambda: f"{op}: values must be float32/bfloat16/float16, got {values.dtype}")
    n, k = values.shape[0], 2 * values.shape[1]
    check_layout_shape(layout, n, k, values.dtype, op)
    shape, dtype = layout_meta_spec(layout, n, k)
    torch._check(
        meta.dtype == dtype and tuple(meta.shape) == shape,
        lambda: f"{op}: layout {layout!r} meta must be {dtype} of shape {shape}, got {meta.dtype} {tuple(meta.shape)}",
    )
    torch._check(meta.device == values.device, lambda: f"{op}: meta is on {meta.device} but values are on {values.device}")


def _check_pack(dense: torch.Tensor, layout: str, op: str = "sparse24_pack") -> None:
    torch._check(dense.dim() == 2, lambda: f"{op}: dense must be 2-D [N, K], got {dense.dim()} dims")
    torch._check(dense.dtype in _SUPPORTED, lambda: f"{op}: dense must be float32/bfloat16/float16 (or float64), got {dense.dtype}")
    check_layout_shape(layout, dense.shape[0], dense.shape[1], dense.dtype, op)


def _check_mm(x, values, meta, layout, bias, activation) -> None:
    op = "sparse24_mm"
    torch._check(activation in ACTIVATIONS, lambda: f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    _check_layout_meta(values, meta, layout, op)
    _check_x_bias(x, values, bias, op)


# ------------------------------------------------------------- references
def prune_reference(dense: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every group of 4 (ties: the lower index; NaN
    ranks lowest); the rest become +0.0."""
    from ..formats.sparse24 import nm_mask  # (formats imports this module)

    mask = nm_mask(dense.abs(), 2, 4)
    return torch.where(mask, dense, torch.zeros((), dtype=dense.dtype, device=dense.device))


def pack_reference(dense: torch.Tensor, layout: str, prune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    if prune:
        dense = prune_reference(dense)
    values, meta = compress_reference(dense)
    n, k = dense.shape
    return values, meta_from_cpu(meta, layout, n, k)


def unpack_reference(values: torch.Tensor, meta: torch.Tensor, layout: str) -> torch.Tensor:
    n, k = values.shape[0], 2 * values.shape[1]
    return decompress_reference(values, meta_to_cpu(meta, layout, n, k))


def _activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)  # exact (erf)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    return z


def mm_reference(x, values, meta, layout: str, bias=None, activation: str = "none") -> torch.Tensor:
    """act(x @ W^T + bias), accumulated and activated in fp32 (fp64 for fp64), rounded once
    to x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = unpack_reference(values, meta, layout).to(acc)
    z = torch.nn.functional.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return _activate(z, activation).to(x.dtype)


# --------------------------------------------------- default (reference) kernels
def _pack_default(dense, layout, prune=False):
    _check_pack(dense, layout)
    return pack_reference(dense, layout, prune)


def _unpack_default(values, meta, layout):
    _check_layout_meta(values, meta, layout, "sparse24_unpack")
    return unpack_reference(values, meta, layout)


def _mm_default(x, values, meta, layout, bias=None, activation="none"):
    _check_mm(x, values, meta, layout, bias, activation)
    return mm_reference(x, values, meta, layout, bias, activation)


_lib.impl("sparse24_pack", _pack_default, "CompositeExplicitAutograd")
_lib.impl("sparse24_unpack", _unpack_default, "CompositeExplicitAutograd")
_lib.impl("sparse24_mm", _mm_default, "CompositeExplicitAutograd")


@torch.library.register_fake("semisparse::sparse24_pack")
def _pack_fake(dense, layout, prune=False):
    _check_pack(dense, layout)
    n, k = dense.shape
    shape, dtype = layout_meta_spec(layout, n, k)
    return dense.new_empty(n, k // 2), dense.new_empty(shape, dtype=dtype)


@torch.library.register_fake("semisparse::sparse24_unpack")
def _unpack_fake(values, meta, layout):
    _check_layout_meta(values, meta, layout, "sparse24_unpack")
    return values.new_empty(values.shape[0], 2 * values.shape[1])


@torch.library.register_fake("semisparse::sparse24_mm")
def _mm_fake(x, values, meta, layout, bias=None, activation="none"):
    _check_mm(x, values, meta, layout, bias, activation)
    return x.new_empty(*x.shape[:-1], values.shape[0])


# ------------------------------------------------------------------ autograd
def _unpack_setup(ctx, inputs, output):
    values, meta, layout = inputs
    ctx.save_for_backward(meta)
    ctx.layout = layout


def _unpack_backward(ctx, gdense):
    (meta,) = ctx.saved_tensors
    n, k = gdense.shape
    cols = kept_columns(meta_to_cpu(meta, ctx.layout, n, k), k)
    return gdense.gather(1, cols), None, None


torch.library.register_autograd("semisparse::sparse24_unpack", _unpack_backward, setup_context=_unpack_setup)


def _act_grad(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act / d z at z (fp32 or fp64)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476))
        pdf = torch.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _mm_setup(ctx, inputs, output):
    x, values, meta, layout, bias, activation = inputs
    ctx.save_for_backward(x, values, meta, bias)
    ctx.layout, ctx.activation = layout, activation


def _mm_backward(ctx, gy):
    x, values, meta, bias = ctx.saved_tensors
    layout, activation = ctx.layout, ctx.activation
    n, k = values.shape[0], 2 * values.shape[1]
    gz = gy
    if activation != "none":
        # recompute the pre-activation (one more GEMM) rather than keep it alive
        z = torch.ops.semisparse.sparse24_mm(x, values, meta, layout, bias, "none")
        acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
        gz = (gy.to(acc) * _act_grad(z.to(acc), activation)).to(gy.dtype)
    gx = gvalues = gbias = None
    if ctx.needs_input_grad[0]:
        # the transposed product: W is 2:4 along K, not along N, so expand it and use the
        # dense GEMM
        gx = gz @ torch.ops.semisparse.sparse24_unpack(values, meta, layout)
    g2 = gz.reshape(-1, n)
    if ctx.needs_input_grad[1]:
        # dL/dW at the kept positions only (the pattern is fixed): an SDDMM
        gw = g2.transpose(0, 1) @ x.reshape(-1, k)
        gvalues = gw.gather(1, kept_columns(meta_to_cpu(meta, layout, n, k), k))
    if bias is not None and ctx.needs_input_grad[4]:
        gbias = g2.sum(0)
    return gx, gvalues, None, None, gbias, None


torch.library.register_autograd("semisparse::sparse24_mm", _mm_backward, setup_context=_mm_setup)


def sparse24_pack(dense: torch.Tensor, layout: str = "cpu", prune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.semisparse.sparse24_pack(dense, layout, prune)


def sparse24_unpack(values: torch.Tensor, meta: torch.Tensor, layout: str = "cpu") -> torch.Tensor:
    return torch.ops.semisparse.sparse24_unpack(values, meta, layout)


def sparse24_mm(x, values, meta, layout: str = "cpu", bias=None, activation: str = "none") -> torch.Tensor:
    return torch.ops.semisparse.sparse24_mm(x, values, meta, layout, bias, activation)
