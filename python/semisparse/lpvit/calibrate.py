"""Label-free calibration for LPViT: the prunable layers, their FLOPs, and the gradient of
``mean(model(x)^2)`` averaged over calibration inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..sparsify import name_matches, name_patterns

__all__ = ["PrunableLayer", "find_layers", "calibration_gradients", "layer_flops"]


@dataclass
class PrunableLayer:
    """A Linear (``[out, in]``) or Conv2d (viewed as ``[out, in/groups * kh * kw]``)."""

    name: str
    module: nn.Module

    @property
    def kind(self) -> str:
        return "conv2d" if isinstance(self.module, nn.Conv2d) else "linear"

    def matrix(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """The weight (or a tensor of its shape) as the 2-D matrix that is pruned in blocks."""
        t = self.module.weight if t is None else t
        return t.reshape(t.shape[0], -1)

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return int(w.shape[0]), int(w[0].numel())


def find_layers(model: nn.Module, targets=None, exclude=None) -> list[PrunableLayer]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` (or those matching ``targets``), minus ``exclude``.
    Raises ``ValueError`` listing what the model holds when nothing is prunable."""
    targets, exclude = name_patterns(targets, "targets", "lpvit"), name_patterns(exclude, "exclude", "lpvit") or []
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if targets is not None and not any(name_matches(name, p) for p in targets):
            continue
        if any(name_matches(name, p) for p in exclude):
            continue
        found.append(PrunableLayer(name, mod))
    if not found:
        kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
        raise ValueError(
            f"lpvit: nothing to prune: no nn.Linear or nn.Conv2d layer "
            f"{'matches the targets ' + str(targets) + ' ' if targets else ''}in the model "
            f"(modules with parameters: {', '.join(kinds) or 'none'})"
        )
    return found


def _inputs(batch):
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _output_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"lpvit: cannot find an output tensor in the model's output ({type(out).__name__})")


def calibration_gradients(model: nn.Module, layers: list[PrunableLayer], calib: Iterable) -> tuple[dict, dict]:
    """``({layer: averaged gradient of mean(output^2) w.r.t. its weight}, {layer: dense FLOPs per
    calibration batch, averaged})``. The model's parameters are left as they were (their
    ``.grad`` and ``requires_grad`` restored)."""
    grads = {lay.name: torch.zeros_like(lay.module.weight, dtype=torch.float32) for lay in layers}
    flops = {lay.name: 0.0 for lay in layers}
    saved_rg = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_grad = {n: p.grad for n, p in model.named_parameters()}
    by_module = {id(lay.module): lay for lay in layers}

    def hook(mod, args, out):
        lay = by_module[id(mod)]
        flops[lay.name] += layer_flops(mod, args[0], out)

    handles = [lay.module.register_forward_hook(hook) for lay in layers]
    was_training = model.training
    model.eval()
    n = 0
    reached = set()  # layers whose weight got a gradient: they reach the calibration output
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for lay in layers:
            lay.module.weight.requires_grad_(True)
        for batch in calib:
            args, kwargs = _inputs(batch)
            out = _output_tensor(model(*args, **kwargs))
            out.float().pow(2).mean().backward()
            for lay in layers:
                if lay.module.weight.grad is not None:
                    grads[lay.name] += lay.module.weight.grad.float()
                    reached.add(lay.name)
                lay.module.weight.grad = None
            n += 1
    finally:
        for h in handles:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(saved_rg[name])
            p.grad = saved_grad[name]
        model.train(was_training)
    if n == 0:
        raise ValueError("lpvit: the calibration data is empty")
    unreached = [lay.name for lay in layers if lay.name not in reached]
    if unreached:  # e.g. a Hugging Face base model's pooler: the output used is last_hidden_state
        raise ValueError(
            f"lpvit: {len(unreached)} layer(s) do not reach the model output that calibration uses "
            f"(logits, else last_hidden_state, else the first output), so they have no gradient to score "
            f"their blocks: {', '.join(unreached[:6])}{' ...' if len(unreached) > 6 else ''}; "
            f"exclude them (exclude=[...])"
        )
    return {k: v / n for k, v in grads.items()}, {k: v / n for k, v in flops.items()}


def layer_flops(mod: nn.Module, x: torch.Tensor, out: torch.Tensor) -> float:
    """Multiply-adds x 2 of one call of a Linear or Conv2d."""
    if isinstance(mod, nn.Linear):
        rows = x.numel() // mod.in_features
        return 2.0 * rows * mod.in_features * mod.out_features
    # Conv2d: every output element costs in/groups * kh * kw multiply-adds
    k = mod.weight[0].numel()
    return 2.0 * out.numel() * k
