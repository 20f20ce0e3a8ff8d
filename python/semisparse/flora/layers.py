"""FLoRA layers: a frozen base module plus named Tucker adapters.

dW = scale * G x_1 A_1 x_2 A_2 ... x_N A_N over the base weight's N modes (core G of shape
(r_1..r_N), factor A_i of shape (d_i, r_i)):

- ``nn.Linear``: weight ``[out, in]``, N = 2.
- ``nn.Conv1d/2d/3d``: weight ``[out, in/groups, k...]``, N = 3/4/5; every mode, the
  spatial ones too. Grouped and depthwise convs factorise the weight as stored
  (``in_channels // groups``), which is what the official code gets wrong.
- ``nn.Embedding``: weight ``[num_embeddings, dim]``, N = 2. The ``padding_idx`` row of dW
  is held at zero (the pad vector stays the base's, as ``nn.Embedding`` promises), so merged
  and unmerged outputs agree there too. Dropout is not applied (ids cannot be dropped).
  With ``max_norm`` the rows of the effective weight W + dW are renormalised in the
  forward (on a temporary; the frozen base weight is not modified unless merged). The
  adapter path does not produce sparse gradients (``sparse=True`` only affects the base).

Adapter parameters are fp32 for 16-bit (and fp64 for fp64) base weights; dW is cast to
the base weight's dtype before use.

Init ("zero-core"): G = 0 and every factor ``nn.init.kaiming_normal_(A, a=sqrt(3))``, so
dW = 0 at the start; at init only the core gets a gradient (the factors' gradient is a
product with G = 0).

Three ways to run an adapter:

- "fused": ``op(x, W + dW, bias)``, one conv/matmul, dW rebuilt per forward by a chain of
  ``tensordot`` mode products (parameter-sized, ~0.3 ms for a 3x3 64->64 conv). Only
  valid without active dropout.
- "factored" (ungrouped Linear/Conv): ``base(x) + adapter(dropout(x))`` where the adapter
  never forms dW: Linear ``((x A_2) G^T) A_1^T``; ConvNd a 1x1 conv by ``A_in^T``
  (in -> r_in), the core kernel ``G x_3 A_3 ... x_N A_N`` (r_out x r_in x k...) with the
  base's stride, padding (mode), dilation, then a 1x1 conv by ``A_out`` (r_out -> out).
- "delta": ``base(x) + op(dropout(x), dW)``: a second full-size op on the dropped input.

``forward_mode="auto"`` (the default): "fused" unless an active adapter has dropout > 0 and
the module is training; then "factored" where the layer allows it (groups == 1), else
"delta" (grouped/depthwise convs, whose weights are small). Embedding: the rows x selects
are gathered from the factors (``A_1[x] G A_2^T``) unless ``max_norm`` is set (then fused).

Measured (``bench/flora_speed.py``, 2 threads, whole training steps of a 4-conv net and a
4-layer BERT against PEFT LoRA at equal trainable parameters; docs/BENCHMARKS.md): without
dropout the fused path trains at 1.07x LoRA (conv) and 0.99x (BERT) and infers faster
than unmerged LoRA (0.71x, 0.89x); the factored path beat fused at equal work only where
ranks are small against the channels, so it is used only when dropout forces a second
op: with dropout 0.01 FLoRA trains at 1.10x / 1.07x LoRA, where the "delta" path measured
1.74x / 1.48x (a one-off script, not in the repository). Layer level (one-off script,
loaded machine, fp32, best of interleaved repetitions): Conv2d 3x3 64->64 on 8x64x32x32, ranks
(16, 16, 3, 3): fused train 25.9 ms vs delta 37.9 ms, infer 12.0 vs 24.2 ms; Linear
768x768, M = 512, ranks (16, 16): fused train 17.6 vs delta 25.3 ms.

Merging adds scale * dW of the active adapters into the base weight in place (no grad);
unmerging subtracts the same tensor back, which restores the weight up to fp32 round-off
(|W + dW - dW - W| <= ulp(|W| + |dW|), exact when dW = 0); in 16-bit weights the round-off
is a 16-bit ulp. A merged layer's forward is the base module alone (plus any active adapter
that is not merged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUPPORTED_TYPES",
    "FLoRAConv",
    "FLoRAEmbedding",
    "FLoRALayer",
    "FLoRALinear",
    "ModulesToSaveWrapper",
    "mode_product_chain",
    "wrap_module",
]

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def mode_product_chain(core: torch.Tensor, factors) -> torch.Tensor:
    """``G x_1 A_1 ... x_N A_N``: contracting the leading axis each time moves the new
    axis to the end, so after N steps the axes are (d_1..d_N) in order."""
    t = core
    for a in factors:
        t = torch.tensordot(t, a, dims=([0], [1]))
    return t


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or not name.isidentifier():
        raise ValueError(f"adapter name must be a non-empty identifier without '.', got {name!r}")
    if hasattr(_PD, name) or hasattr(_MD, name):
        raise ValueError(f"adapter name {name!r} is reserved (an attribute of nn.ParameterDict/nn.ModuleDict)")


_PD, _MD = nn.ParameterDict(), nn.ModuleDict()


class FLoRALayer(nn.Module):
    """Base of the FLoRA wrappers. ``base_layer`` is frozen; adapters live in
    ``flora_core[name]`` (a Parameter) and ``flora_factors[name]`` (a ParameterList)."""

    def __init__(self, base_layer: nn.Module, module_name: str = ""):
        super().__init__()
        if getattr(base_layer, "weight", None) is None:
            raise ValueError(f"module '{module_name}' ({type(base_layer).__name__}) has no weight")
        self.base_layer = base_layer
        self.flora_core = nn.ParameterDict()
        self.flora_factors = nn.ModuleDict()
        self.flora_dropout = nn.ModuleDict()
        self.flora_scale: dict[str, float] = {}
        self.flora_ranks: dict[str, tuple[int, ...]] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.forward_mode = "auto"
        self.module_name = module_name
        for p in base_layer.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.base_layer.weight.shape)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.flora_core.keys())

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, ranks: tuple[int, ...], scale: float = 1.0,
                     dropout: float = 0.0, init: str = "zero-core") -> None:
        _check_adapter_name(adapter_name)
        if adapter_name in self.flora_core:
            raise ValueError(f"module '{self.module_name}' already has an adapter named '{adapter_name}'")
        dims = self.weight_shape
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != len(dims):
            raise ValueError(f"module '{self.module_name}': {len(ranks)} ranks for a weight with {len(dims)} modes {dims}")
        for i, (r, d) in enumerate(zip(ranks, dims)):
            if not 1 <= r <= d:
                raise ValueError(
                    f"module '{self.module_name}': rank {r} of mode {i} exceeds its dimension {d} "
                    f"(weight shape {dims})" if r > d else f"module '{self.module_name}': rank {r} of mode {i} must be >= 1"
                )
        if init != "zero-core":
            raise ValueError(f"unknown init {init!r}")
        w = self.base_layer.weight
        # 16-bit bases get fp32 adapters (as PEFT's autocast_adapter_dtype); dW is cast to W's dtype
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        kw = dict(device=w.device, dtype=dtype)
        core = nn.Parameter(torch.zeros(ranks, **kw))
        factors = nn.ParameterList()
        for r, d in zip(ranks, dims):
            a = torch.empty(d, r, **kw)
            nn.init.kaiming_normal_(a, a=math.sqrt(3))
            factors.append(nn.Parameter(a))
        self.flora_core[adapter_name] = core
        self.flora_factors[adapter_name] = factors
        self.flora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.flora_scale[adapter_name] = float(scale)
        self.flora_ranks[adapter_name] = ranks

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"module '{self.module_name}': adapter '{adapter_name}' is merged; unmerge it first")
        for d in (self.flora_core, self.flora_factors, self.flora_dropout):
            if adapter_name in d:
                del d[adapter_name]
        self.flora_scale.pop(adapter_name, None)
        self.flora_ranks.pop(adapter_name, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.active_adapters = [n for n in names if n in self.flora_core]
        for n in self.flora_core.keys():
            on = n in self.active_adapters
            self.flora_core[n].requires_grad_(on)
            for p in self.flora_factors[n]:
                p.requires_grad_(on)

    def _dropout_p(self, name: str) -> float:
        m = self.flora_dropout[name]
        return m.p if isinstance(m, nn.Dropout) else 0.0

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scale * dW of one adapter, in the base weight's layout and dtype."""
        dw = mode_product_chain(self.flora_core[adapter_name], self.flora_factors[adapter_name])
        dw = dw * self.flora_scale[adapter_name]
        return self._mask_delta(dw).to(self.base_layer.weight.dtype)

    def _mask_delta(self, dw: torch.Tensor) -> torch.Tensor:
        return dw

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        names = self.active_adapters if adapter_names is None else [a for a in adapter_names if a in self.flora_core]
        w = self.base_layer.weight
        for n in names:
            if n in self.merged_adapters:
                continue
            dw = self.delta_weight(n)
            if safe_merge:
                new = w + dw
                if not torch.isfinite(new).all():
                    raise ValueError(f"module '{self.module_name}': merging adapter '{n}' gives non-finite weights")
                w.copy_(new)
            else:
                w.add_(dw)
            self.merged_adapters.append(n)

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base_layer.weight
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            w.sub_(self.delta_weight(n))

    # ------------------------------------------------------------------ forward
    def _op(self, x, weight, bias):  # pragma: no cover - subclasses
        raise NotImplementedError

    def _adapter_input(self, name, x):
        return self.flora_dropout[name](x)

    def forward(self, x, *args, **kwargs):
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"{type(self).__name__} takes only the input tensor")
        dropping = self.training and any(self._dropout_p(n) > 0 for n in names)
        mode = self.forward_mode
        if mode == "fused" and dropping:
            raise ValueError(
                f"module '{self.module_name}': forward_mode='fused' cannot apply dropout "
                "(use 'auto' or 'delta', or dropout=0, or eval mode)"
            )
        if mode == "auto":
            mode = self._auto_mode(names, dropping)
        if mode == "factored" and not self._can_factor():
            raise ValueError(f"module '{self.module_name}': forward_mode='factored' needs an ungrouped "
                             "Linear or Conv (groups=1); use 'auto', 'fused' or 'delta'")
        if mode == "fused":
            w = self.base_layer.weight
            for n in names:
                w = w + self.delta_weight(n)
            return self._op(x, w, self.bias)
        out = self.base_layer(x)
        for n in names:
            xa = self._adapter_input(n, x)
            if mode == "factored":
                out = out + self._factored(n, xa).to(out.dtype)
            else:
                out = out + self._op(xa, self.delta_weight(n), None)
        return out

    def _auto_mode(self, names, dropping: bool) -> str:
        """Without active dropout: "fused" (one conv/matmul; measured fastest for training
        and inference alike). With dropout (training): "factored" where the layer allows it
        (dW and its full-size second op are never formed), else "delta"."""
        if not dropping:
            return "fused"
        return "factored" if self._can_factor() else "delta"

    def _can_factor(self) -> bool:
        return False

    def _factored(self, name, x):  # pragma: no cover - subclasses that can factor
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: ranks={self.flora_ranks[n]}, scale={self.flora_scale[n]}" for n in self.flora_core.keys())


class FLoRALinear(FLoRALayer):
    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _can_factor(self) -> bool:
        return True

    def _factored(self, name, x):
        """``x dW^T = ((x A_2) G^T) A_1^T * scale`` without forming dW."""
        a1, a2 = self.flora_factors[name]
        g = self.flora_core[name]
        x = x.to(g.dtype)
        return (x @ a2 @ g.t() @ a1.t()) * self.flora_scale[name]


class FLoRAConv(FLoRALayer):
    """Conv1d/2d/3d: the base module's own ``_conv_forward`` applies stride, padding (incl.
    'same'/'valid' and the reflect/replicate/circular modes), dilation and groups."""

    def _op(self, x, weight, bias):
        return self.base_layer._conv_forward(x, weight, bias)

    def _can_factor(self) -> bool:
        return self.base_layer.groups == 1

    def _factored(self, name, x):
        """``conv(x, dW)`` as three small convs without forming dW: a 1x1 conv by A_in^T
        (in -> r_in), the core kernel ``G x_3 A_3 ... x_N A_N`` (r_out x r_in x k...) with the
        base's stride, padding (mode), dilation, then a 1x1 conv by A_out (r_out -> out).
        Channel mixing commutes with the spatial padding of every padding mode."""
        b = self.base_layer
        g = self.flora_core[name]
        fs = list(self.flora_factors[name])
        a_out, a_in, spatial = fs[0], fs[1], fs[2:]
        nd = len(spatial)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        one = (1,) * nd
        k = g
        for a in spatial:  # contract the spatial modes: [r_out, r_in, k_1..k_n]
            k = torch.tensordot(k, a, dims=([2], [1]))
        x = x.to(g.dtype)
        h = conv(x, a_in.t().reshape(a_in.shape[1], a_in.shape[0], *one))
        h = b._conv_forward(h, k, None)
        return conv(h, a_out.reshape(*a_out.shape, *one)) * self.flora_scale[name]


class FLoRAEmbedding(FLoRALayer):
    def _mask_delta(self, dw):
        pad = self.base_layer.padding_idx
        if pad is None:
            return dw
        return torch.cat([dw[:pad], torch.zeros_like(dw[pad : pad + 1]), dw[pad + 1 :]], dim=0)

    def _adapter_input(self, name, x):
        return x  # ids: no dropout

    def _dropout_p(self, name):
        return 0.0

    def _op(self, x, weight, bias):
        b = self.base_layer
        return F.embedding(x, weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, False)

    def forward(self, x, *args, **kwargs):
        # delta mode would renormalise W and dW separately under max_norm: fused there.
        # Otherwise the rows of dW that x selects are gathered from the factors
        # (A_1[x] G A_2^T): dW [num_embeddings, dim] is never formed.
        if self.disable_adapters or args or kwargs:
            return self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not names:
            return self.base_layer(x)
        b = self.base_layer
        if b.max_norm is not None or self.forward_mode == "fused":
            w = b.weight
            for n in names:
                w = w + self.delta_weight(n)
            return self._op(x, w, None)
        out = b(x)
        for n in names:
            a1, a2 = self.flora_factors[n]
            g = self.flora_core[n]
            d = (F.embedding(x, a1) @ g @ a2.t()) * self.flora_scale[n]
            if b.padding_idx is not None:
                d = d.masked_fill((x == b.padding_idx).unsqueeze(-1), 0)
            out = out + d.to(out.dtype)
        return out


def wrap_module(module: nn.Module, module_name: str) -> FLoRALayer:
    if isinstance(module, nn.Linear):
        return FLoRALinear(module, module_name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return FLoRAConv(module, module_name)
    if isinstance(module, nn.Embedding):
        return FLoRAEmbedding(module, module_name)
    raise ValueError(
        f"module '{module_name}' has type {type(module).__module__}.{type(module).__qualname__}, which FLoRA "
        f"cannot adapt; supported types: {', '.join('nn.' + t.__name__ for t in SUPPORTED_TYPES)}"
    )


class ModulesToSaveWrapper(nn.Module):
    """PEFT's idea: keep the original module and train a copy per adapter; the active
    adapter's copy runs (the original when adapters are disabled or the active adapter has
    no copy). The copy is saved in full with the adapter."""

    def __init__(self, module: nn.Module, module_name: str = ""):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.module_name = module_name
        for p in module.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._current(), name)

    def _current(self) -> nn.Module:
        mts = self._modules["modules_to_save"]
        if self.disable_adapters or self.active_adapter is None or self.active_adapter not in mts:
            return self._modules["original_module"]
        return mts[self.active_adapter]

    def add(self, adapter_name: str) -> None:
        import copy

        _check_adapter_name(adapter_name)
        m = copy.deepcopy(self.original_module)
        for p in m.parameters():
            p.requires_grad_(False)
        self.modules_to_save[adapter_name] = m

    def set_adapter(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        have = [n for n in names if n in self.modules_to_save]
        if len(have) > 1:
            raise ValueError(
                f"module '{self.module_name}' is in modules_to_save of several active adapters {have}; "
                "only one copy can run at a time"
            )
        self.active_adapter = have[0] if have else None
        for n, m in self.modules_to_save.items():
            for p in m.parameters():
                p.requires_grad_(n == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        return self._current()(*args, **kwargs)
