"""DenseSparseLinear: DSFormer's ``W ~ S D`` factorised Linear (dense basis x N:M-sparse
coefficients), trained with the Straight-Through Factorizer (STF).

``W`` (``out x in``) is written as ``S @ D``: ``D`` (``k x in``) a small dense basis and
``S`` (``out x k``) N:M sparse along ``k`` (default 2:4: in every row of ``S`` each group of
``M`` consecutive entries keeps at most ``N``). The forward is ``y = (x D^T) S^T + b``: one
small dense GEMM, then one sparse GEMM (the 2:4 kernel once compressed).

Per-row-block bases (``blocks=B``, default 1; e.g. one basis per attention head): the ``out``
rows are split into ``B`` equal contiguous blocks of ``r = out/B`` rows (``out % B == 0``), and
block ``b`` (rows ``b*r:(b+1)*r``) has its own basis ``D_b`` (``k x in``)::

    W[b*r:(b+1)*r] = S[b*r:(b+1)*r] @ D_b,     D = [D_0; D_1; ...; D_{B-1}]  ([B*k, in])

i.e. ``W = blockdiag(S_0, ..., S_{B-1}) @ D`` with ``S_b = S[b*r:(b+1)*r]`` (``r x k``). ``k`` is
the inner dimension per block; ``S`` keeps its ``[out, k]`` shape (row ``i`` uses the basis of
block ``i // r``). The forward is ``h = x D^T`` (``[..., B*k]``), then for each block
``y[..., b*r:(b+1)*r] = h[..., b*k:(b+1)*k] S_b^T`` (+ the bias). Stored weights:
``B*k*in + out*k*N/M`` (see :func:`dense_sparse_params`). ``B=1`` is the plain factorisation
(same parameters, state-dict keys and numerics).

Two states:

* training (STF): parameters ``D`` ``[B*k, in]`` and the dense latent ``S_latent``
  ``[out, k]``. Every forward projects ``S = S_latent * nm_mask(|S_latent|)`` (top-N per
  group, recomputed each call) and passes the gradient straight through:
  ``dL/dS_latent = dL/dS`` at every entry, pruned ones included. :meth:`freeze_mask` fixes
  the current mask (buffer ``mask``); pruned entries then get zero gradient and stay out.
* compressed (2:4 only, after :meth:`compress`): ``D``, ``values`` ``[out, k/2]``
  (trainable, like :class:`~semisparse.nn.SparseLinear`: the mask is fixed), buffer
  ``meta`` ``[out, ceil(k/8)]`` uint8; the forward calls ``sparse24_linear`` (once per row
  block, on that block's ``h`` columns and ``values`` / ``meta`` rows).

``load_state_dict`` accepts either state's dict and switches the module to it (replacing the
parameter objects, so build optimizers after loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.sparse24 import Sparse24, nm_mask
from ..io import load_module_file, save_module_file
from ..ops import sparse24 as _ops

__all__ = ["DenseSparseLinear", "check_blocks", "dense_sparse_params", "k_for_compression", "parse_pattern"]

_FORMAT = "semisparse.DenseSparseLinear"
_FORMAT_VERSION = 2  # the newest version read; 2 adds "blocks" (written only when blocks > 1)


# ------------------------------------------------------------------ helpers
def parse_pattern(pattern) -> tuple[int, int]:
    """``"N:M"`` (the grammar of :func:`semisparse.pruning.parse_pattern`; a
    ``SparsityPattern`` too) or a tuple ``(N, M)`` -> ``(N, M)`` with integers ``0 < N < M``
    (``S`` must drop something; unstructured patterns do not apply)."""
    from ..pruning.patterns import SparsityPattern
    from ..pruning.patterns import parse_pattern as parse_any  # lazily: pruning imports nn

    n = m = None
    if isinstance(pattern, (tuple, list)) and len(pattern) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in pattern
    ):
        n, m = pattern
    elif isinstance(pattern, (str, SparsityPattern)):
        try:
            parsed = parse_any(pattern)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.structured:
            n, m = parsed.n, parsed.m
    if n is None or not (0 < n < m):
        raise ValueError(f"pattern must be a string 'N:M' with integers 0 < N < M (e.g. '2:4'), got {pattern!r}")
    return n, m


def check_blocks(out_features: int, blocks, where: str = "DenseSparseLinear") -> None:
    """``blocks`` must be a positive integer dividing ``out_features`` (the row blocks are
    equal and contiguous)."""
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise ValueError(f"{where}: blocks must be a positive integer (the number of row blocks, each with its own "
                         f"basis), got {blocks!r}")
    if out_features % blocks:
        raise ValueError(f"{where}: blocks={blocks} does not divide out_features={out_features} (the {out_features} "
                         f"output rows are split into {blocks} equal contiguous row blocks)")


def dense_sparse_params(out_features: int, in_features: int, k: int, n: int = 2, m: int = 4, bias: bool = False,
                        blocks: int = 1) -> int:
    """Stored weights of a DenseSparseLinear: ``blocks*k*in`` (``D``: one ``k x in`` basis
    per row block) + ``out*k*n/m`` (the kept entries of ``S``) [+ ``out`` with ``bias``].

    The N:M metadata is not counted here: for 2:4 it is 2 bits per kept value
    (``out*k/2 * 2 / 8`` bytes), to be counted separately as bytes.
    """
    if k % m:
        raise ValueError(f"dense_sparse_params: k={k} is not a multiple of M={m}")
    return blocks * k * in_features + out_features * k * n // m + (out_features if bias else 0)


def _d_size(in_features: int, k: int, blocks: int) -> str:
    return f"{k * in_features}" if blocks == 1 else f"{blocks}x{k * in_features} = {blocks * k * in_features}"


def _budget_msg(out_features: int, in_features: int, k: int, n: int, m: int, compression=None, blocks: int = 1) -> str:
    dense = out_features * in_features
    budget = f"{dense} (the dense layer's weights)" if compression is None else (
        f"{dense / compression:.1f} (the dense {out_features}x{in_features} = {dense} weights at {compression}x compression)"
    )
    lo, hi = (k // m) * m, (k // m + 1) * m
    near = [f"k={c}: {dense_sparse_params(out_features, in_features, c, n, m, blocks=blocks)}" for c in (lo, hi) if c > 0]
    per = "" if blocks == 1 else f" (k per row block, {blocks} blocks)"
    return f"parameter budget {budget}; nearest valid k{per} -> parameters: " + ", ".join(near)


def check_k(out_features: int, in_features: int, k: int, n: int, m: int, compression=None, where: str = "DenseSparseLinear",
            blocks: int = 1) -> None:
    """``k`` (the inner dimension of each row block's basis) must be a positive multiple of
    ``m`` and, with ``compression``, fit ``out*in/compression`` weights with ``blocks`` bases."""
    check_blocks(out_features, blocks, where)
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"{where}: k must be a positive integer, got {k!r}")
    if k % m:
        raise ValueError(
            f"{where}: k={k} is not a multiple of M={m} (S is {n}:{m} sparse along k); "
            + _budget_msg(out_features, in_features, k, n, m, compression, blocks)
        )
    if compression is not None:
        params = dense_sparse_params(out_features, in_features, k, n, m, blocks=blocks)
        budget = out_features * in_features / compression
        if params > budget:
            raise ValueError(
                f"{where}: k={k} needs {params} parameters (D {_d_size(in_features, k, blocks)} + kept S "
                f"{out_features * k * n // m}), more than the budget {budget:.1f} of the dense "
                f"{out_features}x{in_features} layer at {compression}x compression; use k <= "
                f"{k_for_compression(out_features, in_features, compression, n, m, blocks=blocks, _raise=False)}"
            )


def k_for_compression(out_features: int, in_features: int, compression: float, n: int = 2, m: int = 4,
                      blocks: int = 1, _raise: bool = True) -> int:
    """The largest ``k`` divisible by ``m`` with ``dense_sparse_params(out, in, k, n, m,
    blocks=blocks) <= out*in/compression`` (weights only: biases and the N:M metadata are not
    counted; ``k`` is per row block)."""
    if not (isinstance(compression, (int, float)) and compression > 0):
        raise ValueError(f"k_for_compression: compression must be a positive number, got {compression!r}")
    check_blocks(out_features, blocks, "k_for_compression")
    budget = out_features * in_features / compression

    def params(c):
        return dense_sparse_params(out_features, in_features, c, n, m, blocks=blocks)

    k = int(budget / (blocks * in_features + out_features * n / m)) // m * m
    while k > 0 and params(k) > budget:
        k -= m
    while params(k + m) <= budget:
        k += m
    if k <= 0 and _raise:
        per = "" if blocks == 1 else f" per row block ({blocks} blocks)"
        raise ValueError(
            f"k_for_compression: even k={m}{per} needs {params(m)} parameters, "
            f"more than the budget {budget:.1f} of the dense {out_features}x{in_features} layer at {compression}x compression"
        )
    return k


# ------------------------------------------------------------------- module
class DenseSparseLinear(nn.Module):
    """``y = (x D^T) S^T + b`` with ``S`` N:M sparse along ``k`` (see the module docs).

    ``blocks``: the number of equal contiguous row blocks of ``W``, each with its own ``k x in``
    basis (``D`` is ``[blocks*k, in]``, block ``b`` its rows ``b*k:(b+1)*k``); must divide
    ``out_features``."""

    __constants__ = ["in_features", "out_features", "k", "blocks"]

    def __init__(self, in_features: int, out_features: int, k: int, pattern="2:4", bias: bool = True, device=None,
                 dtype=None, blocks: int = 1):
        super().__init__()
        self.n, self.m = parse_pattern(pattern)
        check_k(out_features, in_features, k, self.n, self.m, blocks=blocks)
        self.in_features, self.out_features, self.k, self.blocks = in_features, out_features, k, blocks
        self.pattern = f"{self.n}:{self.m}"
        factory = {"device": device, "dtype": dtype}
        self.D = nn.Parameter(torch.empty(blocks * k, in_features, **factory))
        self.S_latent = nn.Parameter(torch.empty(out_features, k, **factory))
        nn.init.kaiming_uniform_(self.D, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.S_latent, a=5 ** 0.5)
        self.register_parameter("values", None)
        self.register_buffer("meta", None)
        self.register_buffer("mask", None)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)

    # ---------------------------------------------------------------- state
    @property
    def compressed(self) -> bool:
        return self.values is not None

    @property
    def mask_frozen(self) -> bool:
        return self.mask is not None

    def _to_training(self, frozen: bool) -> None:
        ref = self.D
        if self.S_latent is None:
            self.S_latent = nn.Parameter(torch.zeros(self.out_features, self.k, dtype=ref.dtype, device=ref.device))
        self.values = None
        self.meta = None
        if frozen and self.mask is None:
            self.mask = torch.ones(self.out_features, self.k, dtype=torch.bool, device=ref.device)
        elif not frozen:
            self.mask = None

    def _to_compressed(self) -> None:
        self._check_compressible("load_state_dict")
        ref = self.D
        if self.values is None:
            self.values = nn.Parameter(torch.zeros(self.out_features, self.k // 2, dtype=ref.dtype, device=ref.device))
            self.meta = torch.full((self.out_features, _ops.meta_cols(self.k)), 0x44, dtype=torch.uint8, device=ref.device)
        self.S_latent = None
        self.mask = None

    def _check_compressible(self, where: str) -> None:
        if (self.n, self.m) != (2, 4):
            raise ValueError(
                f"DenseSparseLinear.{where}: the compressed state needs pattern 2:4 (the sparse kernel), "
                f"this module is {self.pattern}; use freeze_mask() and the masked dense forward instead"
            )

    def current_mask(self) -> torch.Tensor:
        """The N:M mask of ``S`` (bool ``[out, k]``) used by the next forward."""
        if self.compressed:
            cols = _ops.kept_columns(self.meta, self.k)
            m = torch.zeros(self.out_features, self.k, dtype=torch.bool, device=self.meta.device)
            return m.scatter_(1, cols, True)
        if self.mask is not None:
            return self.mask
        return nm_mask(self.S_latent.detach().abs(), self.n, self.m)

    @torch.no_grad()
    def freeze_mask(self) -> DenseSparseLinear:
        """Fix the current top-N mask: pruned entries get zero gradient from now on."""
        if self.compressed:
            raise RuntimeError("DenseSparseLinear.freeze_mask: the module is compressed (its mask is already fixed)")
        self.mask = nm_mask(self.S_latent.detach().abs(), self.n, self.m)
        return self

    def unfreeze_mask(self) -> DenseSparseLinear:
        """Back to the mask recomputed every forward (STF)."""
        if self.compressed:
            raise RuntimeError("DenseSparseLinear.unfreeze_mask: the module is compressed")
        self.mask = None
        return self

    @torch.no_grad()
    def compress(self) -> DenseSparseLinear:
        """Switch to the compressed state: ``S`` (with the current mask) stored 2:4
        compressed as trainable ``values`` plus ``meta``. Replaces the parameters (build
        optimizers afterwards)."""
        if self.compressed:
            return self
        self._check_compressible("compress")
        mask = self.current_mask()
        s = self.S_latent.detach()
        # as SparseLinear.from_dense: the metadata encodes the mask, not the non-zeros
        meta = Sparse24.from_dense(mask.to(s.dtype), layout="cpu").meta
        cols = _ops.kept_columns(meta, self.k)
        values = torch.where(mask.gather(1, cols), s.gather(1, cols), torch.zeros((), dtype=s.dtype, device=s.device)) + 0.0
        requires_grad = self.S_latent.requires_grad
        self.S_latent = None
        self.mask = None
        self.values = nn.Parameter(values.contiguous(), requires_grad=requires_grad)
        self.meta = meta
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        keys = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        if "values" in keys or "meta" in keys:
            self._to_compressed()
            meta = state_dict.get(prefix + "meta")
            if isinstance(meta, torch.Tensor) and meta.dtype == torch.uint8 and meta.shape == self.meta.shape:
                _ops.check_meta(meta, self.k, where=f"DenseSparseLinear.load_state_dict({prefix}meta)")
        elif "S_latent" in keys:
            self._to_training(frozen="mask" in keys)
            mask = state_dict.get(prefix + "mask")
            if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (self.out_features, self.k):
                counts = mask.reshape(self.out_features, -1, self.m).sum(-1)
                if bool((counts > self.n).any()):
                    raise ValueError(
                        f"DenseSparseLinear.load_state_dict({prefix}mask): not {self.pattern}: some group keeps more than {self.n}"
                    )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -------------------------------------------------------------- compute
    def sparse_factor(self) -> torch.Tensor:
        """``S`` ``[out, k]`` as used by the forward (the STF projection in the training
        state, with its straight-through gradient; decompressed in the compressed state)."""
        if self.compressed:
            return torch.ops.semisparse.sparse24_decompress(self.values, self.meta)
        s = self.S_latent
        if self.mask is not None:
            return s * self.mask
        with torch.no_grad():
            mask = nm_mask(s.abs(), self.n, self.m)
        # value s * mask, gradient passed straight through to every latent entry
        return s + (s * mask - s).detach()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        h = F.linear(input, self.D)  # [..., blocks*k]
        if self.blocks == 1:
            if self.compressed:
                return torch.ops.semisparse.sparse24_linear(h, self.values, self.meta, self.bias)
            return F.linear(h, self.sparse_factor(), self.bias)
        nb, k, r = self.blocks, self.k, self.out_features // self.blocks
        if self.compressed:
            # one 2:4 product per row block: h's columns of block b against S's rows of block b
            outs = []
            for b in range(nb):
                rows = slice(b * r, (b + 1) * r)
                outs.append(torch.ops.semisparse.sparse24_linear(
                    h[..., b * k:(b + 1) * k].contiguous(), self.values[rows], self.meta[rows],
                    None if self.bias is None else self.bias[rows]))
            return torch.cat(outs, dim=-1)
        s = self.sparse_factor().view(nb, r, k)
        y = torch.einsum("...bk,brk->...br", h.unflatten(-1, (nb, k)), s).flatten(-2)
        return y if self.bias is None else y + self.bias

    def to_dense_weight(self) -> torch.Tensor:
        """``W`` ``[out, in]``: ``S @ D``; with row blocks, ``S_b @ D_b`` for each block
        (``blockdiag(S_0, ..., S_{B-1}) @ D``)."""
        if self.blocks == 1:
            return self.sparse_factor() @ self.D
        nb, r = self.blocks, self.out_features // self.blocks
        s = self.sparse_factor().view(nb, r, self.k)
        return torch.bmm(s, self.D.view(nb, self.k, self.in_features)).reshape(self.out_features, self.in_features)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.D.device, dtype=self.D.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_params(self, bias: bool = True) -> int:
        """Stored weights (kept S entries, not metadata) — see :func:`dense_sparse_params`."""
        return dense_sparse_params(self.out_features, self.in_features, self.k, self.n, self.m,
                                   bias=bias and self.bias is not None, blocks=self.blocks)

    def extra_repr(self) -> str:
        state = "compressed" if self.compressed else ("training, mask frozen" if self.mask_frozen else "training (STF)")
        blocks = "" if self.blocks == 1 else f", blocks={self.blocks}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}{blocks}, "
            f"pattern={self.pattern}, bias={self.bias is not None}, state={state}"
        )

    # ------------------------------------------------------------- build
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        k: int | None = None,
        compression: float | None = None,
        pattern="2:4",
        init: str = "svd",
        calib_gram: torch.Tensor | None = None,
        iters: int = 10,
        damp: float = 0.01,
        blocks: int = 1,
    ) -> DenseSparseLinear:
        """Factorise an ``nn.Linear``: ``k`` given, or the largest ``k`` for
        ``compression`` (:func:`k_for_compression`). ``init="svd"``: task-unaware
        (:func:`~semisparse.dsformer.init.init_svd_alternating`); ``init="data"``: with the
        calibration Gram matrix ``calib_gram = X^T X`` ``[in, in]``
        (:func:`~semisparse.dsformer.init.init_data_aware`). The result is in the
        training (STF) state with ``S_latent`` set to the (masked) initial ``S``.

        ``blocks > 1``: each row block ``W_b`` is factorised on its own (``k`` per block; with
        ``init="data"`` every block uses the same ``calib_gram``, the blocks sharing the
        input). ``init_errors`` then holds, per iteration, the relative error of the whole
        ``W`` with every block at that iteration, and ``init_error`` (always set) the relative
        error of the returned factorisation (each block's best iterate)."""
        from ..dsformer.init import init_data_aware_blocks, init_svd_alternating

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"DenseSparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        n, m = parse_pattern(pattern)
        out_f, in_f = linear.weight.shape
        check_blocks(out_f, blocks, "DenseSparseLinear.from_linear")
        if k is None:
            if compression is None:
                raise ValueError("DenseSparseLinear.from_linear: give k or compression")
            k = k_for_compression(out_f, in_f, compression, n, m, blocks=blocks)
        check_k(out_f, in_f, k, n, m, compression, where="DenseSparseLinear.from_linear", blocks=blocks)
        w = linear.weight.detach()
        if init == "data" and calib_gram is None:
            raise ValueError("DenseSparseLinear.from_linear: init='data' needs calib_gram (X^T X, [in, in])")
        if init not in ("svd", "data"):
            raise ValueError(f"DenseSparseLinear.from_linear: init must be 'svd' or 'data', got {init!r}")
        r = out_f // blocks
        if init == "svd":
            results = [init_svd_alternating(w[b * r:(b + 1) * r], k, pattern, iters=iters) for b in range(blocks)]
        else:  # one damped Gram and Cholesky factor for every block (they share the input)
            results, hd = init_data_aware_blocks(w, calib_gram, k, blocks, pattern, iters=iters, damp=damp, is_gram=True)
        mod = cls(in_f, out_f, k, pattern=pattern, bias=linear.bias is not None, device=w.device, dtype=w.dtype,
                  blocks=blocks)
        with torch.no_grad():
            for b, res in enumerate(results):
                mod.D[b * k:(b + 1) * k].copy_(res.D)
                mod.S_latent[b * r:(b + 1) * r].copy_(res.S)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        if blocks == 1:
            mod.init_errors = list(results[0].errors)
            mod.init_error = float(results[0].errors[results[0].best])
        else:
            # the blocks' relative errors, combined into the whole W's: weights ||W_b||^2
            # (X-weighted: tr(W_b H W_b^T) with the damped H the init used)
            wd = w.double()
            if init == "data":
                norms = [float(((wd[b * r:(b + 1) * r] @ hd) * wd[b * r:(b + 1) * r]).sum()) for b in range(blocks)]
            else:
                norms = [float(wd[b * r:(b + 1) * r].square().sum()) for b in range(blocks)]
            total = max(sum(norms), 1e-300)

            def combine(errs):
                return (sum(e * e * nb for e, nb in zip(errs, norms)) / total) ** 0.5

            mod.init_errors = [combine(errs) for errs in zip(*(res.errors for res in results))]
            mod.init_error = combine([res.errors[res.best] for res in results])
        return mod

    # ------------------------------------------------------------- files
    def save(self, path) -> None:
        """One safetensors file (the state dict, either state) plus a JSON header (the
        constructor's arguments, ``blocks`` included; a file without ``blocks`` loads with 1);
        atomic."""
        meta = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "k": self.k,
            "blocks": self.blocks,
            "pattern": self.pattern,
            "bias": self.bias is not None,
            "dtype": str(self.D.dtype).removeprefix("torch."),
            "state": "compressed" if self.compressed else "training",
            "mask_frozen": self.mask_frozen,
        }
        # blocks == 1 files stay version 1, so older releases keep reading them; blocks > 1
        # files are version 2, which those releases refuse with a version message
        save_module_file(self, path, _FORMAT, 2 if self.blocks > 1 else 1, meta)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> DenseSparseLinear:
        tensors, meta = load_module_file(path, _FORMAT, _FORMAT_VERSION, "DenseSparseLinear.load", device)
        mod = cls(meta["in_features"], meta["out_features"], meta["k"], pattern=meta["pattern"], bias=meta["bias"],
                  device=device, dtype=getattr(torch, meta["dtype"]), blocks=meta.get("blocks", 1))
        mod.load_state_dict(tensors, strict=True)
        return mod
