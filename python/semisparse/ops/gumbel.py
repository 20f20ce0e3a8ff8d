"""The fused Gumbel N:M mask sampler (MaskLLM): schemas (defined once, here), fake kernels,
autograd formulas and the pure-torch references.

Every group of ``m`` consecutive weights (along the last dim) chooses one of the
``C = C(m, n)`` binary patterns that keep ``n`` of them. ``logits [G, C]`` hold one row per
group (``G = weight.numel() / m``); the candidates are ordered as
``itertools.combinations(range(m), n)`` (2:4: kept (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)).
For each group::

    y_c    = (kappa * logits_c + g_c) / tau        g_c ~ Gumbel(0, 1)
    p      = softmax(y)                            (over the C candidates)
    mask_j = sum_c p_c * P[c, j]                   P = pattern table [C, m]

``hard=True`` returns the pattern of ``argmax_c y_c`` instead (a sample from
``softmax(kappa * logits)``) with the soft mask's gradient (straight-through).

The noise is counter-based, so the backward recomputes it and saves nothing but the
logits (and the weight): ``u`` comes from Philox4x32-10 with key ``seed`` (64 bits, low word
first) and counter ``(idx lo, idx hi, offset lo, offset hi)``, where
``idx = group * ceil(C / 4) + c // 4`` and candidate ``c`` takes output word ``c % 4``.
``u = min(((word >> 8) + 0.5) * 2**-24, 1 - 2**-24)`` and ``g = -log(-log(u))``, computed
in fp32 (fp64 for fp64 logits). In fp32 the sum ``(word >> 8) + 0.5`` rounds to even for
``word >> 8 >= 2**23``, and ``word >> 8 = 2**24 - 1`` would round to ``u = 1`` (``g = +inf``,
a NaN softmax): the clamp keeps u in (0, 1); it changes nothing else (in fp64 the sum is
exact and u <= 1 - 2**-25). The CPU kernels (and the
CUDA kernel to come) and this reference draw the same noise for the same (seed, offset, element).

Ops (``torch.ops.semisparse``):

* ``gumbel_nm_mask(logits, seed, offset, tau, kappa, n, m, hard=False) -> mask [G, m]``
  in the logits' dtype;
* ``gumbel_nm_masked_weight(weight, logits, seed, offset, tau, kappa, n, m, hard=False)
  -> weight * mask`` in the weight's shape and dtype;
* their backwards ``gumbel_nm_mask_backward`` / ``gumbel_nm_masked_weight_backward``
  return the gradient of the logits (the kernels recompute the noise).

All arithmetic accumulates in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import itertools
import math
import torch

__all__ = [
    "SUPPORTED_NM",
    "num_patterns",
    "pattern_table",
    "philox4x32",
    "gumbel_noise",
    "gumbel_nm_mask",
    "gumbel_nm_masked_weight",
    "gumbel_nm_mask_reference",
    "gumbel_nm_masked_weight_reference",
    "gumbel_nm_mask_backward_reference",
    "gumbel_nm_masked_weight_backward_reference",
    "check_gumbel_args",
]

_lib = torch.library.Library("semisparse", "FRAGMENT")  # noqa: TOR901
_lib.define(
    "gumbel_nm_mask(Tensor logits, int seed, int offset, float tau, float kappa, int n, int m, "
    "bool hard=False) -> Tensor"
)
_lib.define(
    "gumbel_nm_masked_weight(Tensor weight, Tensor logits, int seed, int offset, float tau, "
    "float kappa, int n, int m, bool hard=False) -> Tensor"
)
_lib.define(
    "gumbel_nm_mask_backward(Tensor grad_mask, Tensor logits, int seed, int offset, float tau, "
    "float kappa, int n, int m) -> Tensor"
)
_lib.define(
    "gumbel_nm_masked_weight_backward(Tensor grad_out, Tensor weight, Tensor logits, int seed, "
    "int offset, float tau, float kappa, int n, int m) -> Tensor"
)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_M = 8
SUPPORTED_NM = "1 <= n < m <= 8 (e.g. 2:4, 1:4, 4:8)"


# ------------------------------------------------------------------ patterns
def num_patterns(n: int, m: int) -> int:
    """C(m, n): the number of candidate patterns of an n:m group."""
    return math.comb(m, n)


_ROWS: dict[tuple[int, int], tuple[tuple[int, ...], ...]] = {
    (n, m): tuple(tuple(1 if j in keep else 0 for j in range(m)) for keep in itertools.combinations(range(m), n))
    for m in range(2, MAX_M + 1)
    for n in range(1, m)
}


def _pattern_rows(n: int, m: int) -> tuple[tuple[int, ...], ...]:
    return _ROWS[(n, m)]


def pattern_table(n: int, m: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The candidate patterns ``[C(m, n), m]`` (1 = kept), in ``itertools.combinations`` order."""
    return torch.tensor(_pattern_rows(n, m), dtype=dtype, device=device)


# ---------------------------------------------------------------- validation
def check_gumbel_args(logits, tau, kappa, n, m, op: str, weight=None) -> None:
    """Raise (``torch._check``: RuntimeError/ValueError through the op) on bad arguments."""
    torch._check(
        isinstance(n, int) and isinstance(m, int) and 1 <= n < m <= MAX_M,
        lambda: f"{op}: n:m = {n}:{m} is not supported; expected {SUPPORTED_NM}",
    )
    torch._check(
        math.isfinite(tau) and tau > 0, lambda: f"{op}: tau must be a finite number > 0, got {tau}"
    )
    torch._check(math.isfinite(kappa), lambda: f"{op}: kappa must be finite, got {kappa}")
    c = num_patterns(n, m)
    torch._check(logits.dtype in _FLOATS, lambda: f"{op}: logits must be float32/bfloat16/float16/float64, got {logits.dtype}")
    torch._check(
        logits.dim() == 2 and logits.shape[1] == c,
        lambda: f"{op}: logits must have shape [groups, C({m},{n}) = {c}], got {tuple(logits.shape)}",
    )
    if weight is not None:
        torch._check(weight.dtype in _FLOATS, lambda: f"{op}: weight must be float32/bfloat16/float16/float64, got {weight.dtype}")
        torch._check(
            weight.dim() >= 1 and weight.shape[-1] % m == 0,
            lambda: f"{op}: the weight's last dim must be a multiple of m={m}, got shape {tuple(weight.shape)}",
        )
        torch._check(
            logits.shape[0] * m == weight.numel(),
            lambda: (
                f"{op}: logits shape {tuple(logits.shape)} does not match the weight {tuple(weight.shape)}: "
                f"expected [{weight.numel() // m}, {c}] (weight.numel() / m groups)"
            ),
        )
        torch._check(
            weight.device == logits.device,
            lambda: f"{op}: weight is on {weight.device} but logits are on {logits.device}",
        )


# --------------------------------------------------------- Philox4x32-10 (torch)
_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * b for a 32-bit constant ``a`` and int64 tensors holding
    32-bit values, without int64 overflow."""
    bl, bh = b & 0xFFFF, b >> 16
    p1, p2 = a * bl, a * bh  # each < 2**48
    t = p1 + ((p2 & 0xFFFF) << 16)
    return ((p2 >> 16) + (t >> 32)) & _M32, t & _M32


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple[int, int], rounds: int = 10):
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors holding 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0, k1 = (k0 + _PHILOX_W0) & _M32, (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def gumbel_noise(groups: int, c: int, seed: int, offset: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The Gumbel(0, 1) noise ``[groups, c]`` the op draws for (seed, offset); fp32 (fp64
    for dtype=float64)."""
    blocks = (c + 3) // 4
    idx = torch.arange(groups * blocks, dtype=torch.int64, device=device)
    s, o = seed & 0xFFFFFFFFFFFFFFFF, offset & 0xFFFFFFFFFFFFFFFF
    zeros = torch.zeros_like(idx)
    ctr = (idx & _M32, idx >> 32, zeros + (o & _M32), zeros + (o >> 32))
    words = torch.stack(philox4x32(ctr, (s & _M32, s >> 32)), dim=-1)  # [groups*blocks, 4]
    words = words.reshape(groups, blocks * 4)[:, :c]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = ((words >> 8).to(acc) + 0.5) * (2.0**-24)
    if acc == torch.float32:
        u = u.clamp_max(1.0 - 2.0**-24)  # (2**24 - 1) + 0.5 rounds to 2**24 in fp32: u = 1
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------- references
def _acc_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _soft(logits, seed, offset, tau, kappa, acc):
    g = gumbel_noise(logits.shape[0], logits.shape[1], seed, offset, dtype=acc, device=logits.device)
    y = (kappa * logits.to(acc) + g) / tau
    return y, torch.softmax(y, dim=-1)


def _mask_from(y, p, n, m, hard, acc):
    table = pattern_table(n, m, dtype=acc, device=y.device)
    if hard:
        return table[y.argmax(dim=-1)]
    return p @ table


def gumbel_nm_mask_reference(logits, seed, offset, tau, kappa, n, m, hard=False) -> torch.Tensor:
    acc = _acc_dtype(logits)
    y, p = _soft(logits, seed, offset, tau, kappa, acc)
    return _mask_from(y, p, n, m, hard, acc).to(logits.dtype)


def gumbel_nm_masked_weight_reference(weight, logits, seed, offset, tau, kappa, n, m, hard=False) -> torch.Tensor:
    acc = _acc_dtype(weight, logits)
    y, p = _soft(logits, seed, offset, tau, kappa, acc)
    mask = _mask_from(y, p, n, m, hard, acc)
    return (weight.to(acc).reshape(-1, m) * mask).reshape(weight.shape).to(weight.dtype)


def _logit_grad(gmask, logits, seed, offset, tau, kappa, n, m, acc):
    _, p = _soft(logits, seed, offset, tau, kappa, acc)
    table = pattern_table(n, m, dtype=acc, device=logits.device)
    dp = gmask @ table.t()  # [G, C]
    dy = p * (dp - (p * dp).sum(-1, keepdim=True))
    return (dy * (kappa / tau)).to(logits.dtype)


def gumbel_nm_mask_backward_reference(grad_mask, logits, seed, offset, tau, kappa, n, m) -> torch.Tensor:
    acc = _acc_dtype(logits, grad_mask)
    return _logit_grad(grad_mask.to(acc).reshape(-1, m), logits, seed, offset, tau, kappa, n, m, acc)


def gumbel_nm_masked_weight_backward_reference(grad_out, weight, logits, seed, offset, tau, kappa, n, m) -> torch.Tensor:
    acc = _acc_dtype(logits, weight, grad_out)
    gmask = grad_out.to(acc).reshape(-1, m) * weight.to(acc).reshape(-1, m)
    return _logit_grad(gmask, logits, seed, offset, tau, kappa, n, m, acc)


# ------------------------------------------------- default (reference) kernels
def _mask_default(logits, seed, offset, tau, kappa, n, m, hard=False):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_mask")
    return gumbel_nm_mask_reference(logits, seed, offset, tau, kappa, n, m, hard)


def _masked_weight_default(weight, logits, seed, offset, tau, kappa, n, m, hard=False):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_masked_weight", weight)
    return gumbel_nm_masked_weight_reference(weight, logits, seed, offset, tau, kappa, n, m, hard)


def _mask_backward_default(grad_mask, logits, seed, offset, tau, kappa, n, m):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_mask_backward")
    _check_grad_shape(grad_mask, (logits.shape[0], m), "gumbel_nm_mask_backward")
    return gumbel_nm_mask_backward_reference(grad_mask, logits, seed, offset, tau, kappa, n, m)


def _masked_weight_backward_default(grad_out, weight, logits, seed, offset, tau, kappa, n, m):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_masked_weight_backward", weight)
    _check_grad_shape(grad_out, tuple(weight.shape), "gumbel_nm_masked_weight_backward")
    return gumbel_nm_masked_weight_backward_reference(grad_out, weight, logits, seed, offset, tau, kappa, n, m)


def _check_grad_shape(g, shape, op):
    torch._check(tuple(g.shape) == tuple(shape), lambda: f"{op}: the gradient must have shape {tuple(shape)}, got {tuple(g.shape)}")
    torch._check(g.dtype in _FLOATS, lambda: f"{op}: the gradient must be a floating tensor, got {g.dtype}")


_lib.impl("gumbel_nm_mask", _mask_default, "CompositeExplicitAutograd")
_lib.impl("gumbel_nm_masked_weight", _masked_weight_default, "CompositeExplicitAutograd")
_lib.impl("gumbel_nm_mask_backward", _mask_backward_default, "CompositeExplicitAutograd")
_lib.impl("gumbel_nm_masked_weight_backward", _masked_weight_backward_default, "CompositeExplicitAutograd")


# ------------------------------------------------------------- fake kernels
@torch.library.register_fake("semisparse::gumbel_nm_mask")
def _mask_fake(logits, seed, offset, tau, kappa, n, m, hard=False):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_mask")
    return logits.new_empty(logits.shape[0], m)


@torch.library.register_fake("semisparse::gumbel_nm_masked_weight")
def _masked_weight_fake(weight, logits, seed, offset, tau, kappa, n, m, hard=False):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_masked_weight", weight)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("semisparse::gumbel_nm_mask_backward")
def _mask_backward_fake(grad_mask, logits, seed, offset, tau, kappa, n, m):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_mask_backward")
    _check_grad_shape(grad_mask, (logits.shape[0], m), "gumbel_nm_mask_backward")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("semisparse::gumbel_nm_masked_weight_backward")
def _masked_weight_backward_fake(grad_out, weight, logits, seed, offset, tau, kappa, n, m):
    check_gumbel_args(logits, tau, kappa, n, m, "gumbel_nm_masked_weight_backward", weight)
    _check_grad_shape(grad_out, tuple(weight.shape), "gumbel_nm_masked_weight_backward")
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- autograd
# The backward saves only the logits (and the weight) and recomputes the noise from
# (seed, offset). The straight-through gradient of hard=True is the soft mask's.
def _mask_setup(ctx, inputs, output):
    logits, seed, offset, tau, kappa, n, m, _hard = inputs
    ctx.save_for_backward(logits)
    ctx.args = (seed, offset, tau, kappa, n, m)


def _mask_backward(ctx, grad):
    (logits,) = ctx.saved_tensors
    g = torch.ops.semisparse.gumbel_nm_mask_backward(grad.contiguous(), logits, *ctx.args)
    return g, None, None, None, None, None, None, None


torch.library.register_autograd("semisparse::gumbel_nm_mask", _mask_backward, setup_context=_mask_setup)


def _masked_weight_setup(ctx, inputs, output):
    weight, logits, seed, offset, tau, kappa, n, m, hard = inputs
    ctx.save_for_backward(weight, logits)
    ctx.args = (seed, offset, tau, kappa, n, m)
    ctx.hard = hard


def _masked_weight_backward(ctx, grad):
    weight, logits = ctx.saved_tensors
    grad = grad.contiguous()
    gw = gl = None
    if ctx.needs_input_grad[1]:
        gl = torch.ops.semisparse.gumbel_nm_masked_weight_backward(grad, weight, logits, *ctx.args)
    if ctx.needs_input_grad[0]:
        # d(W * mask)/dW = mask: recompute the mask (only when the weights train)
        mask = torch.ops.semisparse.gumbel_nm_mask(logits, *ctx.args, ctx.hard)
        gw = (grad.reshape(mask.shape) * mask.to(grad.dtype)).reshape(weight.shape)
    return gw, gl, None, None, None, None, None, None, None


torch.library.register_autograd(
    "semisparse::gumbel_nm_masked_weight", _masked_weight_backward, setup_context=_masked_weight_setup
)


# ---------------------------------------------------------- python entry points
def gumbel_nm_mask(logits, seed: int, offset: int, tau: float, kappa: float, n: int = 2, m: int = 4, hard: bool = False):
    """Soft (or hard, straight-through) N:M mask ``[G, m]`` sampled from ``logits [G, C(m,n)]``."""
    return torch.ops.semisparse.gumbel_nm_mask(logits, seed, offset, float(tau), float(kappa), n, m, hard)


def gumbel_nm_masked_weight(
    weight, logits, seed: int, offset: int, tau: float, kappa: float, n: int = 2, m: int = 4, hard: bool = False
):
    """``weight * mask`` (the mask sampled as in :func:`gumbel_nm_mask`), in the weight's shape."""
    return torch.ops.semisparse.gumbel_nm_masked_weight(
        weight, logits, seed, offset, float(tau), float(kappa), n, m, hard
    )
