"""``prune``: one-shot magnitude, Wanda and SparseGPT pruning of a model, in place."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sparsify import name_matches, name_patterns
from .calibration import (
    BlockInputs,
    calibration_mode,
    calibration_samples,
    call_model,
    capture_block_inputs,
    find_blocks,
    input_device,
    is_conv1d,
    is_prunable,
    module_device,
    run_block,
)
from .magnitude import magnitude_mask
from .patterns import SparsityPattern, parse_pattern
from .sparsegpt import HessianStats, sparsegpt_prune
from .wanda import WandaStats, wanda_mask

__all__ = ["prune", "METHODS"]

METHODS = ("magnitude", "wanda", "sparsegpt")

# method -> {option: default}
_OPTIONS: dict[str, dict[str, object]] = {
    "magnitude": {},
    "wanda": {"act_device": None},
    "sparsegpt": {"update": True, "damp": 0.01, "blocksize": 128, "act_device": None},
}


@dataclass
class _Layer:
    """A selected layer; ``weight()`` is its weight as ``[out, in]`` (a transposed view for
    Conv1D, whose parameter is ``[in, out]``)."""

    name: str
    module: nn.Module
    conv1d: bool
    block: int | None  # index in the block list, None outside it

    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w.t() if self.conv1d else w

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    def own_layout(self, keep: torch.Tensor) -> torch.Tensor:
        return keep.t().contiguous() if self.conv1d else keep


def _check_options(method: str, options: dict, pattern: SparsityPattern) -> dict:
    valid = _OPTIONS[method]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        names = ", ".join(sorted(valid)) if valid else "none"
        raise ValueError(f"prune: unknown option(s) {unknown} for method {method!r}; valid options: {names}")
    opts = {**valid, **options}
    if method == "sparsegpt":
        if not isinstance(opts["update"], bool):
            raise ValueError(f"prune: update must be True or False, got {opts['update']!r}")
        d = opts["damp"]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise ValueError(f"prune: damp must be a number >= 0 (a fraction of the mean Hessian diagonal), got {d!r}")
        b = opts["blocksize"]
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"prune: blocksize must be a positive integer, got {b!r}")
        if pattern.structured and b % pattern.m:
            raise ValueError(f"prune: blocksize must be a multiple of M={pattern.m} for pattern {pattern}, got {b}")
    if opts.get("act_device") is not None:
        try:
            opts["act_device"] = torch.device(opts["act_device"])
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"prune: act_device must be a torch device or its name, got {opts['act_device']!r}") from e
    return opts


def _select(
    model: nn.Module,
    blocks_name: str | None,
    targets: list[str] | None,
    exclude: list[str],
    pattern: SparsityPattern,
) -> tuple[list[_Layer], dict[str, str]]:
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)

    prefix = f"{blocks_name}." if blocks_name else None
    candidates = [(n, m) for n, m in model.named_modules() if is_prunable(m)]
    if targets is None:
        chosen = [(n, m) for n, m in candidates if prefix is None or n.startswith(prefix)]
    else:
        chosen = [(n, m) for n, m in candidates if any(name_matches(n, p) for p in targets)]
        if not chosen:
            sample = ", ".join(n for n, _ in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
            raise ValueError(f"prune: targets {targets} match no Linear/Conv1D layer of the model (layers: {sample})")
    chosen = [(n, m) for n, m in chosen if not any(name_matches(n, p) for p in exclude)]

    layers: list[_Layer] = []
    skipped: dict[str, str] = {}
    for name, mod in chosen:
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            skipped[name] = "its weight is not a 2-D floating-point tensor"
            continue
        conv = is_conv1d(mod)
        in_features = w.shape[0] if conv else w.shape[1]
        if pattern.structured and in_features % pattern.m:
            skipped[name] = f"in_features={in_features} is not divisible by M={pattern.m}"
            continue
        shared = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if shared:
            skipped[name] = f"its weight is shared with {', '.join(shared)}"
            continue
        block = int(name[len(prefix) :].split(".")[0]) if prefix and name.startswith(prefix) else None
        layers.append(_Layer(name, mod, conv, block))
    return layers, skipped


def _report_skipped(skipped: dict[str, str], strict: bool, what: str) -> None:
    if not skipped:
        return
    lines = "; ".join(f"{n}: {why}" for n, why in skipped.items())
    msg = f"prune: {len(skipped)} selected layer(s) {what}: {lines}"
    if strict:
        raise ValueError(msg + " (strict=True)")
    warnings.warn(msg + " (left dense)", UserWarning, stacklevel=3)


def prune(
    model: nn.Module,
    method: str,
    pattern: str | SparsityPattern = "2:4",
    calib=None,
    targets: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    strict: bool = False,
    **options,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place, one shot; return ``{layer name: bool keep-mask}``.

    Each mask has the shape of the layer's own ``weight`` (``[out, in]`` for
    ``nn.Linear``, ``[in, out]`` for transformers' ``Conv1D``) and lives on its device; the
    pruned weights are set to zero in the model.

    Methods:

    - ``"magnitude"``: keep the largest ``|W|``. Needs no data (``calib`` is ignored).
    - ``"wanda"``: score ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over all
      calibration tokens), no weight update.
    - ``"sparsegpt"``: second-order mask selection with weight reconstruction
      (:mod:`semisparse.pruning.sparsegpt`). Options: ``update=True`` (``False``: the
      mask-only variant MaskLLM uses as a prior: the weights are only masked),
      ``damp=0.01`` (fraction of the mean Hessian diagonal added to it),
      ``blocksize=128`` (columns per lazy-update block; a multiple of M for N:M).

    ``wanda`` and ``sparsegpt`` also take ``act_device`` (default: the device of the model's
    input embeddings): where the calibration activations are kept between blocks, e.g.
    ``"cpu"`` to save accelerator memory (they are moved to the block's device one sample
    at a time).

    ``pattern``: ``"N:M"`` (N kept in every group of M consecutive inputs of a row; any
    ``0 < N <= M``) or ``"unstructured:<ratio>"`` (the fraction pruned: per layer for
    magnitude, per output row for wanda, per column block for sparsegpt). See
    :func:`~semisparse.pruning.patterns.parse_pattern`.

    ``calib`` (wanda, sparsegpt): a tensor ``[n, seqlen]`` of token ids, or an iterable of
    such tensors or of dicts of model inputs (``input_ids``, ``attention_mask``, ...). The
    model runs on one sequence at a time; padding (``attention_mask == 0``) is left out of
    the statistics.

    ``targets`` / ``exclude``: layer-name patterns with the rule of
    :func:`semisparse.sparsify.name_matches` (exact name, ``"." + suffix``, or glob). By
    default every ``nn.Linear`` / ``Conv1D`` inside the model's repeated blocks is pruned
    (every one in the model when it has no block list); embeddings and the LM head are
    not, as in the papers. ``exclude`` removes layers from the selection.

    A selected layer that cannot be pruned (``in_features`` not divisible by M, a weight
    shared with another module such as a tied LM head, or, for the calibrated methods, a
    layer the calibration forward never reached) is left dense and named in one warning;
    ``strict=True`` raises ``ValueError`` instead (before anything is modified for the
    first two reasons).

    Calibrated methods run sequentially, as in the papers: the model's block list is found
    (:func:`~semisparse.pruning.calibration.find_blocks`); one forward per sample records
    the inputs of every block; then for each block, hooks on its selected layers gather
    the statistics (Wanda: the squared input-column norms; SparseGPT:
    ``H = (2/n) X^T X`` in float32) while the block runs on every sample, its layers are
    pruned, and the block runs again to produce the next block's inputs, so each block
    sees the outputs of the already pruned ones. Selected layers outside the block list
    (e.g. a targeted ``lm_head``) are calibrated last with full forwards of the pruned
    model. The model runs in eval mode with ``use_cache=False`` and without autograd;
    training flags, ``use_cache`` and hooks are restored afterwards, also on error.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"prune: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    pat = parse_pattern(pattern)
    opts = _check_options(method, options, pat)
    targets_l = name_patterns(targets, "targets", "prune")
    exclude_l = name_patterns(exclude, "exclude", "prune") or []

    blocks_name, blocks = find_blocks(model)
    layers, skipped = _select(model, blocks_name, targets_l, exclude_l, pat)
    samples = calibration_samples(calib) if method != "magnitude" else None
    _report_skipped(skipped, strict, "cannot be pruned")

    masks: dict[str, torch.Tensor] = {}
    if method == "magnitude":
        with torch.no_grad():
            for lay in layers:
                w = lay.weight()
                keep = magnitude_mask(w, pat)
                w.masked_fill_(~keep, 0.0)
                masks[lay.name] = lay.own_layout(keep)
        return masks

    pruned = _Sequential(model, blocks, layers, samples, method, pat, opts).run()
    unreached = {lay.name: "the calibration forward never reached it" for lay in layers if lay.name not in pruned}
    _report_skipped(unreached, strict, "were not pruned")
    return {lay.name: pruned[lay.name] for lay in layers if lay.name in pruned}


class _Sequential:
    """The calibrated, block-by-block pruning of :func:`prune`."""

    def __init__(self, model, blocks, layers, samples, method, pattern, opts):
        self.model, self.blocks, self.samples = model, blocks, samples
        self.method, self.pattern, self.opts = method, pattern, opts
        self.inner: dict[int, list[_Layer]] = {}
        self.outer: list[_Layer] = []
        for lay in layers:
            if lay.block is None:
                self.outer.append(lay)
            else:
                self.inner.setdefault(lay.block, []).append(lay)
        self.masks: dict[str, torch.Tensor] = {}
        self.token_mask: torch.Tensor | None = None

    # ---------------------------------------------------------- statistics
    def _new_stats(self, lay: _Layer):
        w = lay.weight()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        cls = WandaStats if self.method == "wanda" else HessianStats
        return cls(lay.in_features, w.device, dtype)

    def _hook(self, stats):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            tm = self.token_mask
            if tm is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(tm.shape):
                x = x[tm.to(x.device)]
            stats.add(x.detach().reshape(-1, x.shape[-1]))

        return hook

    def _gather(self, layers: list[_Layer], run_all) -> dict[str, object]:
        stats = {lay.name: self._new_stats(lay) for lay in layers}
        handles = [
            lay.module.register_forward_pre_hook(self._hook(stats[lay.name]), with_kwargs=True) for lay in layers
        ]
        try:
            run_all()
        finally:
            for h in handles:
                h.remove()
            self.token_mask = None
        return stats

    def _prune_layers(self, layers: list[_Layer], stats: dict[str, object]) -> None:
        for lay in layers:
            st = stats.pop(lay.name)
            if st.tokens == 0:
                continue  # reported as unreached by prune()
            w = lay.weight()
            if self.method == "wanda":
                keep = wanda_mask(w, st.column_norms(), self.pattern)
                w.masked_fill_(~keep, 0.0)
            else:
                new, keep = sparsegpt_prune(
                    w,
                    st.hessian(),
                    self.pattern,
                    update=self.opts["update"],
                    damp=self.opts["damp"],
                    blocksize=self.opts["blocksize"],
                    name=lay.name,
                )
                w.copy_(new)
            del st
            self.masks[lay.name] = lay.own_layout(keep)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, torch.Tensor]:
        with calibration_mode(self.model):
            device = input_device(self.model)
            if self.inner:
                self._run_blocks(device)
            if self.outer:
                self._run_outer(device)
        return self.masks

    def _run_blocks(self, device) -> None:
        store = self.opts["act_device"] or device
        inputs = capture_block_inputs(self.model, self.blocks, self.samples, device, store)
        missing = sorted(set(self.inner) - set(inputs.order))
        if missing:
            raise RuntimeError(f"prune: blocks {missing} hold selected layers but the model's forward never called them")
        order = inputs.order
        # the outputs of the last block are needed only when layers after the blocks follow
        last = len(order) - 1 if self.outer else max(order.index(k) for k in self.inner)
        with tqdm(order[: last + 1], desc=f"prune {self.method} {self.pattern}", unit="block", disable=None) as bar:
            for pos, k in enumerate(bar):
                self._block(k, inputs, device, store, produce_outputs=pos < last)

    def _block(self, k: int, inputs: BlockInputs, device, store, produce_outputs: bool) -> None:
        """Gather statistics of block ``k``'s selected layers, prune them, then (unless it
        is the last block needed) replace ``inputs.hidden`` by the pruned block's outputs."""
        block = self.blocks[k]
        bdev = module_device(block, device)
        calls, hidden = inputs.calls[k], inputs.hidden
        layers = self.inner.get(k, [])
        if layers:

            def run_all():
                for i, sample in enumerate(self.samples):
                    self.token_mask = sample.token_mask
                    run_block(block, hidden[i], calls[i], bdev)

            self._prune_layers(layers, self._gather(layers, run_all))
        if produce_outputs:
            for i in range(len(self.samples)):
                hidden[i] = run_block(block, hidden[i], calls[i], bdev).detach().to(store)

    def _run_outer(self, device) -> None:
        def run_all():
            for sample in self.samples:
                self.token_mask = sample.token_mask
                call_model(self.model, sample, device)

        self._prune_layers(self.outer, self._gather(self.outer, run_all))

