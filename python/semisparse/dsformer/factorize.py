"""Whole-model DSFormer factorisation: every selected ``nn.Linear`` -> a
:class:`~semisparse.nn.dense_sparse_linear.DenseSparseLinear` (``W ~ S D``, ``S`` N:M sparse),
and the low-rank baseline ``W ~ U V`` (:class:`LowRankLinear`) at the same parameter budget.

::

    report = factorize(model, compression=2.0)            # training (STF) state
    print(report.table())
    train_stf(model, batches, TrainConfig(steps=1000))    # semisparse.dsformer.stf

Baselines at a comparable budget: :func:`lowrank` (truncated SVD), and plain 2:4 pruning,
which is already ``semisparse.prune(model, "magnitude" | ..., pattern="2:4")`` (2x on the
weights, plus metadata).

Selection: ``targets`` (name patterns, see :func:`semisparse.sparsify.name_matches`; default
every ``nn.Linear``) minus ``exclude``; with ``targets=None`` the output head is left dense
(``model.get_output_embeddings()`` when the model has it, else Linear layers whose last name
component is ``lm_head``, ``classifier``, ``head`` or ``score``). Layers too small for the
compression (no ``k`` / rank fits the budget) are skipped and listed in ``report.skipped``.

Per-row-block bases (``factorize(..., blocks=B)``): each layer's ``out`` rows are split into
``B`` equal contiguous blocks, each with its own ``k x in`` basis (see
:class:`~semisparse.nn.dense_sparse_linear.DenseSparseLinear`); a layer whose ``out_features``
``B`` does not divide is skipped (listed in ``report.skipped``). ``blocks="heads"``: one basis
per attention head for the attention projections, recognised by the last component of their
name: ``q_proj`` / ``query`` and ``o_proj`` get ``config.num_attention_heads`` blocks,
``k_proj`` / ``key`` and ``v_proj`` / ``value`` get ``config.num_key_value_heads`` (when the
config has it, else ``num_attention_heads``); every other layer gets 1. For ``o_proj`` the
head structure is on the input side, so its row blocks are equal row groups, not heads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.dense_sparse_linear import (
    DenseSparseLinear,
    dense_sparse_params,
    k_for_compression,
    parse_pattern,
)
from ..sparsify import name_matches, name_patterns

__all__ = ["FactorizeReport", "LayerFactorization", "LowRankLinear", "collect_grams", "factorize", "lowrank", "lowrank_rank"]

_HEAD_NAMES = ("lm_head", "classifier", "head", "score")


# ------------------------------------------------------------------ report
@dataclass
class LayerFactorization:
    shape: tuple[int, int]  # (out, in)
    k: int  # inner dimension (DenseSparse k, or the low-rank r)
    params_before: int  # weights + bias of the dense layer
    params_after: int  # stored weights + bias of the replacement
    init_error: float  # relative error of the initial factorisation (X-weighted for init="data")
    blocks: int = 1  # row blocks, each with its own k x in basis (DenseSparse only)


@dataclass
class FactorizeReport:
    method: str  # "dense_sparse" | "lowrank"
    pattern: str | None
    init: str
    layers: dict[str, LayerFactorization] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters (weights + biases) of the replaced layers before."""
        return sum(v.params_before for v in self.layers.values())

    @property
    def params_after(self) -> int:
        return sum(v.params_after for v in self.layers.values())

    @property
    def compression(self) -> float:
        """Achieved compression of the replaced layers' weights (biases not counted)."""
        before = sum(v.shape[0] * v.shape[1] for v in self.layers.values())
        after = sum(self._weights_after(v) for v in self.layers.values())
        return before / after if after else float("nan")

    def _weights_after(self, v: LayerFactorization) -> int:
        bias = v.params_before - v.shape[0] * v.shape[1]
        return v.params_after - bias

    def table(self) -> str:
        head = f"{'layer':40s} {'shape':>12s} {'k':>6s} {'before':>10s} {'after':>10s} {'ratio':>6s} {'init err':>9s}"
        lines = [f"{self.method} ({self.pattern or 'dense'}, init={self.init})", head, "-" * len(head)]
        for name, v in self.layers.items():
            ratio = v.params_before / v.params_after if v.params_after else float("nan")
            kk = str(v.k) if v.blocks == 1 else f"{v.blocks}x{v.k}"
            lines.append(f"{name:40s} {v.shape[0]:>5d}x{v.shape[1]:<6d} {kk:>6s} {v.params_before:>10d} "
                         f"{v.params_after:>10d} {ratio:>6.2f} {v.init_error:>9.4f}")
        lines.append(f"{'total (replaced layers)':40s} {'':>12s} {'':>6s} {self.params_before:>10d} "
                     f"{self.params_after:>10d} {self.compression:>6.2f}")
        lines.append(f"model parameters: {self.model_params_before} -> {self.model_params_after}")
        if any(v.blocks != 1 for v in self.layers.values()):
            lines.append("k column BxK: B row blocks, each with its own basis of k=K")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------- low rank
def lowrank_rank(out_features: int, in_features: int, compression: float) -> int:
    """The largest ``r`` with ``r * (out + in) <= out * in / compression`` (may be 0)."""
    return int(out_features * in_features / compression // (out_features + in_features))


class LowRankLinear(nn.Module):
    """``y = (x V^T) U^T + b`` with ``U`` ``[out, r]``, ``V`` ``[r, in]``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not (isinstance(rank, int) and rank > 0):
            raise ValueError(f"LowRankLinear: rank must be a positive integer, got {rank!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V = nn.Parameter(torch.empty(rank, in_features, **factory))
        nn.init.kaiming_uniform_(self.U, a=5 ** 0.5)
        nn.init.kaiming_uniform_(self.V, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(input, self.V), self.U, self.bias)

    def to_dense_weight(self) -> torch.Tensor:
        return self.U @ self.V

    def num_params(self, bias: bool = True) -> int:
        return self.rank * (self.in_features + self.out_features) + (
            self.out_features if bias and self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, compression: float | None = None) -> LowRankLinear:
        """Truncated SVD of the weight: ``U = U_r sqrt(s_r)``, ``V = sqrt(s_r) V_r^T``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        out_f, in_f = linear.weight.shape
        if rank is None:
            if compression is None:
                raise ValueError("LowRankLinear.from_linear: give rank or compression")
            rank = lowrank_rank(out_f, in_f, compression)
        w = linear.weight.detach()
        mod = cls(in_f, out_f, rank, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        U, s, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        with torch.no_grad():
            mod.U.zero_()
            mod.V.zero_()
            mod.U[:, :r] = (U[:, :r] * root).to(w.dtype)
            mod.V[:r] = (root[:, None] * Vh[:r]).to(w.dtype)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        mod.init_error = float((w.double() - U[:, :r] @ torch.diag(s[:r]) @ Vh[:r]).norm() / w.double().norm().clamp_min(1e-300))
        return mod


# ------------------------------------------------------------ selection
def _head_modules(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
        if isinstance(head, nn.Module):
            return {id(head)}
    return {id(m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in _HEAD_NAMES}


def _select(model: nn.Module, targets, exclude, where: str) -> list[str]:
    targets = name_patterns(targets, "targets", where)
    exclude = name_patterns(exclude, "exclude", where) or []
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    heads = _head_modules(model) if targets is None else set()
    chosen = []
    for name, mod in linears:
        if targets is not None and not any(name_matches(name, p) for p in targets):
            continue
        if id(mod) in heads or any(name_matches(name, p) for p in exclude):
            continue
        chosen.append(name)
    if not chosen:
        names = ", ".join(n for n, _ in linears) or "(none)"
        raise ValueError(f"{where}: no nn.Linear layer selected (targets={targets!r}, exclude={exclude!r}); "
                         f"the model's Linear layers: {names}")
    return chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _call(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@torch.no_grad()
def collect_grams(model: nn.Module, names: list[str], calib: Iterable) -> dict[str, torch.Tensor]:
    """``{name: X^T X}`` (float64 ``[in, in]``) of the inputs of the named Linear layers over
    the calibration batches (tensors, tuples of positional inputs or dicts of kwargs)."""
    grams: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name):
        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            grams[name] = g if name not in grams else grams[name] + g
        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        n = 0
        for batch in calib:
            _call(model, _to_device(batch, device))
            n += 1
        if n == 0:
            raise ValueError("factorize: calib is empty")
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [n for n in names if n not in grams]
    if missing:
        raise ValueError(f"factorize: the calibration batches never reached {missing}")
    return grams


# ------------------------------------------------------------ factorize
def _check_budget(k, compression, where):
    if (k is None) == (compression is None):
        raise ValueError(f"{where}: give exactly one of k and compression (got k={k!r}, compression={compression!r})")
    if compression is not None and not (isinstance(compression, (int, float)) and not isinstance(compression, bool)
                                        and compression > 1):
        raise ValueError(f"{where}: compression must be a number > 1, got {compression!r}")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k > 0):
        raise ValueError(f"{where}: k must be a positive integer, got {k!r}")


_UNSET = object()
# attention projections for blocks="heads": last name component -> the config attribute
# holding their number of heads (k / v fall back to num_attention_heads)
_HEAD_PROJ = {"q_proj": "num_attention_heads", "query": "num_attention_heads", "o_proj": "num_attention_heads",
              "k_proj": "num_key_value_heads", "key": "num_key_value_heads",
              "v_proj": "num_key_value_heads", "value": "num_key_value_heads"}


def _blocks_for(model: nn.Module, blocks, where: str):
    """``name -> blocks`` for ``blocks`` an int (every layer) or ``"heads"``."""
    if blocks == "heads":
        cfg = getattr(model, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if not (isinstance(heads, int) and heads > 0):
            raise ValueError(f"{where}: blocks='heads' needs a model config with num_attention_heads "
                             f"({type(model).__name__} has none); give an integer instead")
        kv = getattr(cfg, "num_key_value_heads", None)
        counts = {"num_attention_heads": heads,
                  "num_key_value_heads": kv if isinstance(kv, int) and kv > 0 else heads}
        return lambda name: counts[_HEAD_PROJ[name.split(".")[-1]]] if name.split(".")[-1] in _HEAD_PROJ else 1
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise ValueError(f"{where}: blocks must be a positive integer or 'heads', got {blocks!r}")
    return lambda name: blocks


def factorize(model: nn.Module, compression: float | None = _UNSET, k: int | None = None, pattern="2:4",
              targets=None, exclude=None, init: str = "svd", calib: Iterable | None = None,
              iters: int = 10, blocks: int | str = 1) -> FactorizeReport:
    """Replace every selected ``nn.Linear`` of ``model`` (in place) by
    ``DenseSparseLinear.from_linear(...)`` in the training (STF) state.

    Args:
        compression: per-layer weight compression (> 1, default 2.0 when ``k`` is not given):
            each layer gets the largest ``k`` (multiple of M) with
            ``k*in + out*k*N/M <= out*in/compression``. Or ``k=...`` for one fixed ``k``
            (giving both, or explicitly neither, is a ``ValueError``).
        pattern: N:M pattern of ``S`` along ``k`` (``"2:4"`` can be compressed afterwards).
        targets, exclude: name patterns (see the module docs).
        init: ``"svd"`` (task-unaware) or ``"data"`` (needs ``calib``: each layer's input Gram
            ``X^T X`` is collected with forward hooks first, on the dense model).
        calib: iterable of model inputs (tensors, tuples of positional inputs, dicts of kwargs).
        iters: alternating iterations of the initialisation.
        blocks: row blocks per layer, each with its own ``k x in`` basis (``k`` and the budget
            are per layer, counting every basis); an int for every selected layer, or
            ``"heads"`` (see the module docs). A layer whose ``out_features`` the number does
            not divide is skipped (``report.skipped``).

    Returns a :class:`FactorizeReport` (per layer: shape, k, parameters before/after, relative
    init error — Frobenius for ``"svd"``, X-weighted for ``"data"``).
    """
    where = "factorize"
    if compression is _UNSET:
        compression = 2.0 if k is None else None
    _check_budget(k, compression, where)
    n, m = parse_pattern(pattern)
    if init not in ("svd", "data"):
        raise ValueError(f"{where}: init must be 'svd' or 'data', got {init!r}")
    if init == "data" and calib is None:
        raise ValueError(f"{where}: init='data' needs calib (an iterable of model inputs)")
    layer_blocks = _blocks_for(model, blocks, where)
    names = _select(model, targets, exclude, where)
    report = FactorizeReport("dense_sparse", f"{n}:{m}", init, model_params_before=_n_params(model))

    chosen = []
    for name in names:
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        bl = layer_blocks(name)
        if out_f % bl:
            report.skipped[name] = f"blocks={bl} does not divide out_features={out_f}"
            continue
        per = "" if bl == 1 else f" with {bl} row blocks"
        if compression is not None:
            kk = k_for_compression(out_f, in_f, compression, n, m, blocks=bl, _raise=False)
            if kk <= 0:
                report.skipped[name] = (f"too small for {compression}x{per}: even k={m} needs "
                                        f"{dense_sparse_params(out_f, in_f, m, n, m, blocks=bl)} weights > "
                                        f"{out_f * in_f / compression:.1f}")
                continue
        else:
            kk = k
            if kk % m:
                raise ValueError(f"{where}: k={k} is not a multiple of M={m}")
            params = dense_sparse_params(out_f, in_f, kk, n, m, blocks=bl)
            if params >= out_f * in_f:
                report.skipped[name] = f"k={k}{per} would not compress it: {params} weights >= dense {out_f * in_f}"
                continue
        chosen.append((name, kk, bl))
    if not chosen:
        raise ValueError(f"{where}: no selected layer can be factorised (each is too small for the budget "
                         f"or its row blocks): {report.skipped}")

    grams = collect_grams(model, [c[0] for c in chosen], calib) if init == "data" else {}
    for name, kk, bl in chosen:
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        g = grams.get(name)
        new = DenseSparseLinear.from_linear(lin, k=kk, pattern=pattern, init=init,
                                            calib_gram=None if g is None else g.to(lin.weight.device), iters=iters,
                                            blocks=bl)
        has_bias = lin.bias is not None
        report.layers[name] = LayerFactorization(
            shape=(out_f, in_f), k=kk,
            params_before=out_f * in_f + (out_f if has_bias else 0),
            params_after=new.num_params(),
            init_error=float(new.init_error),
            blocks=bl,
        )
        _set_module(model, name, new)
    report.model_params_after = _n_params(model)
    return report


def lowrank(model: nn.Module, compression: float = 2.0, targets=None, exclude=None) -> FactorizeReport:
    """Baseline: every selected ``nn.Linear`` -> :class:`LowRankLinear` of the largest rank
    ``r`` with ``r*(out+in) <= out*in/compression``, initialised by truncated SVD (in place).
    Selection and report as :func:`factorize` (``k`` is the rank; init error Frobenius)."""
    where = "lowrank"
    _check_budget(None, compression, where)
    names = _select(model, targets, exclude, where)
    report = FactorizeReport("lowrank", None, "svd", model_params_before=_n_params(model))
    for name in names:
        lin = model.get_submodule(name)
        out_f, in_f = lin.weight.shape
        r = lowrank_rank(out_f, in_f, compression)
        if r <= 0:
            report.skipped[name] = (f"too small for {compression}x: rank 1 needs {out_f + in_f} weights > "
                                    f"{out_f * in_f / compression:.1f}")
            continue
        new = LowRankLinear.from_linear(lin, rank=r)
        has_bias = lin.bias is not None
        report.layers[name] = LayerFactorization(
            shape=(out_f, in_f), k=r, params_before=out_f * in_f + (out_f if has_bias else 0),
            params_after=new.num_params(), init_error=new.init_error)
        _set_module(model, name, new)
    if not report.layers:
        raise ValueError(f"{where}: every selected layer is too small: {report.skipped}")
    report.model_params_after = _n_params(model)
    return report
