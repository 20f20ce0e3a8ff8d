"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored 2:4-compressed."""

from __future__ import annotations

import torch
from torch import nn

from ..formats.sparse24 import Sparse24, nm_mask, preferred_layout
from ..io import load_module_file, save_module_file
from ..ops import sparse24 as _ops

__all__ = ["SparseLinear"]

_FORMAT = "semisparse.SparseLinear"
_FORMAT_VERSION = 1


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` 2:4 sparse.

    Parameters: ``values`` ``[out, in/2]`` (trainable: the kept weights; the mask is
    fixed), buffer ``meta`` ``[out, ceil(in/8)]`` uint8 in the "cpu" layout (what the
    state dict and files hold, on every device), and ``bias`` like ``nn.Linear``.
    The forward signature, ``in_features``, ``out_features`` and ``bias`` match
    ``nn.Linear``; ``weight`` returns the dense (decompressed) weight.

    On a CUDA device with float16 / bfloat16 weights the module also keeps the metadata in
    the GPU's layout (:func:`~semisparse.formats.sparse24.preferred_layout`; the
    non-persistent buffer ``meta_gpu``, rebuilt whenever the module moves or loads a state
    dict; after editing ``meta`` in place, call ``_sync_layout()``) and runs the CUDA 2:4
    kernels through ``semisparse::sparse24_mm``; the
    backward uses the dense transposed product for the input gradient and an SDDMM for
    the kept weights. ``layout`` says which layout the forward uses.
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"SparseLinear: in_features must be a multiple of 4, got {in_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.values = nn.Parameter(torch.zeros(out_features, in_features // 2, **factory))
        # code 0b0100 in every group: kept positions 0 and 1
        self.register_buffer(
            "meta", torch.full((out_features, _ops.meta_cols(in_features)), 0x44, dtype=torch.uint8, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.layout = "cpu"
        # empty (not None) on the "cpu" layout, so TorchScript sees one type
        self.register_buffer("meta_gpu", torch.empty(0, dtype=torch.uint8, device=device), persistent=False)
        self._sync_layout()

    def _sync_layout(self) -> None:
        """Rebuild ``meta_gpu`` / ``layout`` for the current device and dtype."""
        v = self.values
        layout = preferred_layout(v.device, v.dtype, self.out_features, self.in_features)
        with torch.no_grad():
            self.meta_gpu = (
                torch.empty(0, dtype=torch.uint8, device=self.meta.device) if layout == "cpu"
                else _ops.meta_from_cpu(self.meta.contiguous(), layout, self.out_features, self.in_features)
            )
        self.layout = layout

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._sync_layout()
        return out

    # ---------------------------------------------------------------- build
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None) -> "SparseLinear":
        """Build from an ``nn.Linear``. ``mask`` (bool ``[out, in]``, 2:4) selects the kept
        weights; ``None`` keeps the 2 largest magnitudes of each group of 4."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: expected nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if w.shape[1] % 4:
            raise ValueError(
                f"SparseLinear.from_dense: in_features must be a multiple of 4, got weight shape {tuple(w.shape)}"
            )
        if mask is None:
            mask = nm_mask(w.abs(), 2, 4)
        else:
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(
                    f"SparseLinear.from_dense: mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}"
                )
            mask = mask.to(device=w.device, dtype=torch.bool)
            counts = mask.reshape(w.shape[0], -1, 4).sum(-1)
            if bool((counts > 2).any()):
                r, g = (int(i) for i in (counts > 2).nonzero()[0])
                raise ValueError(
                    f"SparseLinear.from_dense: mask is not 2:4: row {r}, columns {4 * g}..{4 * g + 3} keep "
                    f"{int(counts[r, g])} entries (at most 2)"
                )
        # The metadata encodes the mask, not the non-zeros of w * mask: a kept weight that
        # happens to be 0 must stay a trainable position and a pruned one must not become
        # one. (Groups where the mask keeps fewer than 2 get the format's filler position.)
        meta = Sparse24.from_dense(mask.to(w.dtype), layout="cpu").meta
        cols = _ops.kept_columns(meta, w.shape[1])
        values = torch.where(mask.gather(1, cols), w.gather(1, cols), torch.zeros((), dtype=w.dtype, device=w.device))
        values = values + 0.0  # -0.0 -> +0.0, as the compressed format stores zeros
        mod = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            mod.values.copy_(values)
            mod.meta.copy_(meta)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        mod.values.requires_grad_(linear.weight.requires_grad)
        mod._sync_layout()
        return mod

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a loaded state dict must hold a valid 2:4 pattern (nothing else checks it later)
        meta = state_dict.get(prefix + "meta")
        if isinstance(meta, torch.Tensor) and meta.dtype == torch.uint8 and meta.shape == self.meta.shape:
            _ops.check_meta(meta, self.in_features, where=f"SparseLinear.load_state_dict({prefix}meta)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_layout()

    # -------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.layout != "cpu":
            return torch.ops.semisparse.sparse24_mm(input, self.values, self.meta_gpu, self.layout, self.bias, "none")
        return torch.ops.semisparse.sparse24_linear(input, self.values, self.meta, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight ``[out, in]`` (decompressed on every access)."""
        return torch.ops.semisparse.sparse24_decompress(self.values, self.meta)

    def sparse(self) -> Sparse24:
        return Sparse24(self.values.detach(), self.meta, (self.out_features, self.in_features), "cpu")

    def mask(self) -> torch.Tensor:
        """The fixed 2:4 pattern as a bool ``[out, in]`` tensor."""
        cols = _ops.kept_columns(self.meta, self.in_features)
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.meta.device)
        return m.scatter_(1, cols, True)

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.values.device, dtype=self.values.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, sparsity=2:4"

    # ------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write this module to one safetensors file (its state dict plus a JSON header)."""
        meta = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": str(self.values.dtype).removeprefix("torch."),
        }
        save_module_file(self, path, _FORMAT, _FORMAT_VERSION, meta)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "SparseLinear":
        tensors, meta = load_module_file(path, _FORMAT, _FORMAT_VERSION, "SparseLinear.load", device)
        mod = cls(meta["in_features"], meta["out_features"], bias=meta["bias"], device=device,
                  dtype=getattr(torch, meta["dtype"]))
        mod.load_state_dict(tensors, strict=True)
        return mod
