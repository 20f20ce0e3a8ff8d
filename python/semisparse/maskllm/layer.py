"""The differentiable-mask layer: a Linear whose N:M mask is sampled from learnable logits.

MaskLLM (Fang et al., NeurIPS 2024). Every group of ``m`` consecutive input weights of a
row picks one of the ``C(m, n)`` candidate patterns; the layer holds logits ``[numel/m, C]``
and, while training, computes with ``W * mask`` where::

    mask = softmax((kappa * logits + gumbel) / tau) @ patterns

(the fused op :func:`semisparse.ops.gumbel_nm_masked_weight`). In ``eval()`` the mask is the
argmax pattern of each group (the final mask), deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gumbel import gumbel_nm_masked_weight, num_patterns, pattern_table

__all__ = ["SamplingState", "MaskLLMLinear", "prior_logits", "logits_for_mask", "mask_from_logits", "pattern_index"]

_GOLDEN = 0x9E3779B97F4A7C15
_M63 = (1 << 63) - 1


@dataclass
class SamplingState:
    """State shared by all mask layers of a model (the trainer sets it every micro-step).

    ``tau``/``kappa``: temperature and logit scale of the Gumbel softmax; ``offset``: the
    noise counter (the trainer uses the global micro-batch number, so a resumed run draws
    the same noise); ``enabled=False`` computes with the dense weights (the teacher of
    distillation); ``reg_terms`` collects ``||W * soft_mask||^2`` per layer while
    ``collect_reg`` is set (the sparse-weight regulariser)."""

    tau: float = 4.0
    kappa: float = 100.0
    offset: int = 0
    enabled: bool = True
    collect_reg: bool = False
    reg_terms: list = field(default_factory=list)
    # requires_grad of the model's parameters before add_masks froze them (restored by remove_masks)
    requires_grad_before: dict = field(default_factory=dict)


def layer_seed(seed: int, index: int) -> int:
    """The noise key of the ``index``-th mask layer of a model trained with ``seed``."""
    return (int(seed) * 1_000_003 + (index + 1) * _GOLDEN) & _M63


def pattern_index(mask: torch.Tensor, n: int, m: int, where: str = "mask") -> torch.Tensor:
    """bool mask ``[..., K]`` (every group of ``m`` keeps exactly ``n``) -> candidate index
    per group, int64 ``[numel/m]`` (in :func:`pattern_table` order)."""
    if mask.shape[-1] % m:
        raise ValueError(f"{where}: the last dim {mask.shape[-1]} is not a multiple of m={m}")
    g = mask.reshape(-1, m).to(torch.int64)
    kept = g.sum(-1)
    if bool((kept != n).any()):
        i = int((kept != n).nonzero()[0])
        raise ValueError(
            f"{where}: not an {n}:{m} mask: group {i} (flat, groups of {m} along the last dim) keeps "
            f"{int(kept[i])} of {m}, expected {n}"
        )
    bits = (g << torch.arange(m, device=g.device)).sum(-1)
    table = pattern_table(n, m, dtype=torch.int64, device=g.device)
    table_bits = (table << torch.arange(m, device=g.device)).sum(-1)  # [C]
    lookup = torch.full((1 << m,), -1, dtype=torch.int64, device=g.device)
    lookup[table_bits] = torch.arange(table.shape[0], device=g.device)
    return lookup[bits]


def mask_from_logits(logits: torch.Tensor, n: int, m: int, shape) -> torch.Tensor:
    """The final (argmax) mask, bool, in the weight's ``shape``."""
    table = pattern_table(n, m, dtype=torch.bool, device=logits.device)
    return table[logits.argmax(dim=-1)].reshape(shape)


def prior_logits(logits: torch.Tensor, prior: torch.Tensor, n: int, m: int, alpha: float) -> torch.Tensor:
    """MaskLLM's prior: ``logits + s(overlap) * logits.std() * alpha`` where ``overlap`` is the
    number of kept positions a candidate shares with the prior mask's group. The paper
    (2:4) uses ``s = overlap - 1``; for general n:m we use ``s = overlap - (n - 1)``: the
    prior's own pattern gets +1, candidates one position away 0, and so on down."""
    table = pattern_table(n, m, dtype=torch.float32, device=logits.device)  # [C, m]
    p = prior.reshape(-1, m).to(torch.float32, copy=False).to(logits.device)
    overlap = p @ table.t()  # [G, C]
    s = overlap - (n - 1)
    std = logits.detach().float().std()
    return (logits.float() + s * std * alpha).to(logits.dtype)


def logits_for_mask(mask: torch.Tensor, n: int, m: int, *, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Logits whose argmax is ``mask`` exactly: ``scale`` on the mask's pattern, 0 elsewhere."""
    idx = pattern_index(mask, n, m)
    out = torch.zeros(idx.numel(), num_patterns(n, m), dtype=dtype, device=mask.device)
    out.scatter_(1, idx[:, None], scale)
    return out


class MaskLLMLinear(nn.Module):
    """``nn.Linear`` with a learnable ``n:m`` mask.

    - ``weight`` (frozen unless ``train_weight=True``) and ``bias``: the dense layer's;
    - ``logits`` ``[out * in / m, C(m, n)]``: the learnable mask distribution (init
      ``N(0, init_std)``, optionally shifted towards a ``prior`` mask with strength ``alpha``);
    - training: ``y = x (W * mask)^T + b`` with ``mask`` sampled by the fused Gumbel op;
      eval: ``mask`` = the argmax pattern of each group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        n: int = 2,
        m: int = 4,
        state: SamplingState | None = None,
        seed: int = 0,
        logits_dtype: torch.dtype = torch.float32,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m <= 8):
            raise ValueError(f"MaskLLMLinear: n:m = {n}:{m} is not supported; expected 1 <= n < m <= 8")
        if in_features % m:
            raise ValueError(f"MaskLLMLinear: in_features={in_features} is not a multiple of m={m}")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        )
        groups = out_features * in_features // m
        self.logits = nn.Parameter(torch.zeros(groups, num_patterns(n, m), device=device, dtype=logits_dtype))
        self.state = state if state is not None else SamplingState()
        self.seed = int(seed)
        if device != "meta":
            self.reset_parameters()

    def reset_parameters(self, init_std: float = 0.01) -> None:
        """Weight and bias as ``nn.Linear`` initialises them; logits ``N(0, init_std)``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            if self.bias is not None:
                bound = 1 / self.in_features**0.5 if self.in_features > 0 else 0
                nn.init.uniform_(self.bias, -bound, bound)
            self.logits.normal_(0.0, init_std)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        n: int = 2,
        m: int = 4,
        state: SamplingState | None = None,
        seed: int = 0,
        init_std: float = 0.01,
        prior: torch.Tensor | None = None,
        alpha: float = 3.0,
        train_weight: bool = False,
        logits_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> "MaskLLMLinear":
        """Wrap ``linear`` (its weight and bias are shared, not copied). ``prior``: a bool
        ``n:m`` mask of the weight's shape (a one-shot method's, or a learned one)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MaskLLMLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, n=n, m=m, state=state, seed=seed,
            logits_dtype=logits_dtype, device="meta",
        )
        layer.weight = nn.Parameter(w.data, requires_grad=train_weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=train_weight)
        logits = torch.randn(layer.logits.shape, generator=generator, dtype=torch.float32) * init_std
        if prior is not None:
            prior = torch.as_tensor(prior)
            if tuple(prior.shape) != tuple(w.shape):
                raise ValueError(
                    f"MaskLLMLinear: the prior mask has shape {tuple(prior.shape)}, expected the weight's {tuple(w.shape)}"
                )
            pattern_index(prior.bool(), n, m, where="prior mask")  # validates n:m
            logits = prior_logits(logits, prior.bool(), n, m, alpha)
        layer.logits = nn.Parameter(logits.to(device=w.device, dtype=logits_dtype))
        return layer

    # ----------------------------------------------------------------- forward
    def masked_weight(self) -> torch.Tensor:
        """The weight the layer computes with now (sampled in training, argmax in eval)."""
        st = self.state
        if not st.enabled:
            return self.weight
        if self.training:
            wm = gumbel_nm_masked_weight(self.weight, self.logits, self.seed, st.offset, st.tau, st.kappa, self.n, self.m)
            if st.collect_reg:
                if self.weight.requires_grad:  # the regulariser uses W.detach()
                    r = gumbel_nm_masked_weight(
                        self.weight.detach(), self.logits, self.seed, st.offset, st.tau, st.kappa, self.n, self.m
                    )
                else:
                    r = wm
                st.reg_terms.append(r.float().pow(2).sum())
            return wm
        return self.weight * mask_from_logits(self.logits, self.n, self.m, self.weight.shape).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    # ------------------------------------------------------------------- masks
    def mask(self) -> torch.Tensor:
        """The final mask: bool ``[out, in]``, the argmax pattern of every group (a plain
        tensor also when FSDP2 shards the logits)."""
        logits = self.logits.detach()
        if hasattr(logits, "full_tensor"):  # DTensor (FSDP2)
            logits = logits.full_tensor()
        return mask_from_logits(logits, self.n, self.m, tuple(self.weight.shape))

    def set_mask(self, mask: torch.Tensor, scale: float = 1.0) -> None:
        """Set the logits so that the final mask is ``mask`` (e.g. to apply a stored task mask)."""
        if tuple(mask.shape) != tuple(self.weight.shape):
            raise ValueError(f"set_mask: mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.logits.copy_(logits_for_mask(mask.bool().to(self.logits.device), self.n, self.m, scale=scale))

    def to_linear(self, apply_mask: bool = True) -> nn.Linear:
        """An ``nn.Linear`` with ``W * mask`` (or the untouched dense ``W``)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        w = self.weight.detach() * self.mask().to(self.weight.dtype) if apply_mask else self.weight.detach()
        lin.weight = nn.Parameter(w, requires_grad=True)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach(), requires_grad=True)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.n}:{self.m}, logits={tuple(self.logits.shape)} {self.logits.dtype}"
        )
