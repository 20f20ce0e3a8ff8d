"""Save and load pruned Hugging Face ``transformers`` models as folders.

``save_pretrained(model, out_dir, compress=False)`` writes a normal Hugging Face folder
(``config.json``, ``model.safetensors``, tokenizer files) that ``transformers`` loads as
is, plus ``semisparse.json`` (method, pattern, metadata) and, when masks are given,
``masks.safetensors`` (see :mod:`semisparse.masks`).

``save_pretrained(model, out_dir, compress=True)`` stores every 2:4 layer compressed:
the ``nn.Linear`` (and ``transformers`` ``Conv1D``) layers that have a 2:4 mask, and the
layers that already are :class:`~semisparse.nn.SparseLinear`, are written as SparseLinear
tensors (``values``, ``meta``, ``bias``) in ``model.sparse24.safetensors``, all other
tensors as they are. ``semisparse.json`` lists the compressed modules (with in/out
features and the original module type), the layers left dense with the reason, and the
tied (shared) tensors. The weights file has its own name on purpose: ``transformers``
alone cannot read it (it would silently initialise the missing Linear weights at
random), so ``AutoModel.from_pretrained`` on such a folder fails instead of returning a
wrong model; :func:`load_pretrained` reads it.

Factorised layers (:mod:`semisparse.dsformer`): a model whose ``nn.Linear`` layers were
replaced by :class:`~semisparse.nn.DenseSparseLinear` (``W ~ S D``, in any of its states:
compressed 2:4, training/STF, training with the mask frozen) or by
:class:`~semisparse.dsformer.LowRankLinear` (``W ~ U V``) is always saved in semisparse's
own weights file (``transformers`` cannot rebuild these modules), whatever ``compress``
says; the module tensors are stored as the module's own state dict (``D``, ``values``,
``meta`` [, ``bias``] when compressed; ``D``, ``S_latent`` [, ``mask``] [, ``bias``] in
training; ``U``, ``V`` [, ``bias``] for low rank), and ``semisparse.json`` (version 2) lists
each one under ``factorized_modules`` (``blocks``: the DenseSparseLinear's row blocks, each with
its own basis; an entry without it, as written before row blocks existed, reads as 1)::

     "factorized_modules": {
        "model.layers.0.mlp.up_proj": {"class": "DenseSparseLinear", "in_features": 32, "out_features": 64,
                                       "bias": false, "k": 16, "blocks": 1, "pattern": "2:4",
                                       "state": "compressed" | "training", "mask_frozen": false,
                                       "source": "Linear"},
        "model.layers.0.mlp.down_proj": {"class": "LowRankLinear", "in_features": 64, "out_features": 32,
                                         "bias": false, "rank": 10, "source": "Linear"}}

A folder without factorised layers is still written as version 1, so older semisparse
releases keep reading it; a version-2 folder is refused by them with a clear message.

``semisparse.json`` (version 1)::

    {"format": "semisparse.pretrained", "version": 1, "semisparse_version": "0.1.0",
     "compressed": true, "architecture": "LlamaForCausalLM",
     "method": "wanda", "pattern": "2:4", "metadata": {...},
     "masks": "masks.safetensors" | null,
     "weights": "model.sparse24.safetensors" | "model.safetensors",
     "sparse_modules": {"model.layers.0.mlp.up_proj":
                           {"in_features": 32, "out_features": 64, "bias": false, "source": "Linear"}},
     "dense_modules": {"lm_head": "weight is shared with model.embed_tokens.weight"},
     "tied": {"lm_head.weight": "model.embed_tokens.weight"}}

Everything is written into a temporary folder next to ``out_dir`` and renamed into place
at the end, so ``out_dir`` is either complete or untouched.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .io import atomic_write_bytes, load_tensors, make_temp_dir, save_tensors
from .masks import _as_bool, _merge_metadata, save_masks
from .nn import SparseLinear
from .nn.dense_sparse_linear import DenseSparseLinear
from .nn.dense_sparse_linear import parse_pattern as _parse_nm

__all__ = [
    "save_pretrained",
    "load_pretrained",
    "read_info",
    "SEMISPARSE_JSON",
    "COMPRESSED_WEIGHTS",
    "MASKS_FILE",
]

SEMISPARSE_JSON = "semisparse.json"
COMPRESSED_WEIGHTS = "model.sparse24.safetensors"
MASKS_FILE = "masks.safetensors"
_FORMAT = "semisparse.pretrained"
_WEIGHTS_FORMAT = "semisparse.sparse24_model"
_VERSION = 2  # the newest version read; 2 adds "factorized_modules"
_VERSION_PLAIN = 1  # written when the model has no factorised layers
_DS_STATES = ("compressed", "training")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
# set on a SparseLinear that replaced a transformers Conv1D (weight stored [in, out])
_SOURCE_ATTR = "_semisparse_source"


# ------------------------------------------------------------------ helpers
def _version() -> str:
    from . import __version__

    return __version__


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers without Conv1D
        return None
    return Conv1D


def _lowrank_type():
    from .dsformer.factorize import LowRankLinear  # lazily: dsformer pulls in the training loop

    return LowRankLinear


def _factorized_spec(mod: nn.Module) -> dict | None:
    """The ``factorized_modules`` entry of a DenseSparseLinear / LowRankLinear, else None."""
    if not isinstance(mod, (DenseSparseLinear, _lowrank_type())):
        return None
    base = {"in_features": int(mod.in_features), "out_features": int(mod.out_features)}
    if isinstance(mod, DenseSparseLinear):
        return {"class": "DenseSparseLinear", **base, "bias": mod.bias is not None, "k": mod.k,
                "blocks": int(mod.blocks), "pattern": mod.pattern, "state": "compressed" if mod.compressed else "training",
                "mask_frozen": bool(mod.mask_frozen), "source": "Linear"}
    if isinstance(mod, _lowrank_type()):
        return {"class": "LowRankLinear", **base, "bias": mod.bias is not None, "rank": mod.rank, "source": "Linear"}
    return None


def _factorized_modules(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, mod in model.named_modules():
        spec = _factorized_spec(mod)
        if spec is not None:
            out[name] = spec
    return dict(sorted(out.items()))


def _check_hf_model(model, where: str) -> None:
    if not (isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "save_pretrained")):
        raise TypeError(
            f"{where}: expected a transformers PreTrainedModel (with .config and .save_pretrained), "
            f"got {type(model).__name__}"
        )


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every state-dict name of it (parameters and buffers, shared ones included)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(prefix + pname)
        for bname, b in mod.named_buffers(recurse=False):
            if b is not None and bname not in mod._non_persistent_buffers_set:
                owners.setdefault(id(b), []).append(prefix + bname)
    return {k: list(dict.fromkeys(v)) for k, v in owners.items()}


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _check_out_dir(out_dir: Path, overwrite: bool, where: str) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise FileExistsError(f"{where}: {out_dir} exists and is not a folder; not replacing it")
        if not overwrite:
            raise FileExistsError(f"{where}: {out_dir} already exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def _atomic_dir(out_dir: Path, overwrite: bool, where: str):
    """Yield a fresh temporary folder next to ``out_dir``; on success fsync it and rename
    it to ``out_dir`` (replacing an existing folder only when ``overwrite``); on any
    failure remove it and leave ``out_dir`` as it was."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(parent, out_dir.name)
    try:
        yield tmp
        _fsync_tree(tmp)
        _check_out_dir(out_dir, overwrite, where)  # again: it may have appeared meanwhile
        if out_dir.exists() or out_dir.is_symlink():
            old = parent / f".{out_dir.name}.{uuid.uuid4().hex}.old"
            os.rename(out_dir, old)
            try:
                os.rename(tmp, out_dir)
            except BaseException:
                os.rename(old, out_dir)
                raise
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------ saving
def _check_masks(model: nn.Module, masks, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TypeError(f"{where}: masks must be a dict {{module name: bool tensor}}, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where}: masks name {name!r}, which is not a module of the model") from None
        m = _as_bool(mask, name, where)
        if isinstance(mod, SparseLinear):
            shape = (mod.out_features, mod.in_features)
        else:
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor):
                raise ValueError(f"{where}: module {name!r} ({type(mod).__name__}) has no weight tensor")
            shape = tuple(w.shape)
        if tuple(m.shape) != shape:
            raise ValueError(
                f"{where}: mask {name!r} has shape {tuple(m.shape)}, the module's weight {shape} "
                f"({type(mod).__name__}); masks have the shape of the weight"
            )
        out[name] = m
    return out


def _linear_view(w: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding ``w`` ([out, in]) and ``bias`` without copying them."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


def _compressed_state_dict(model: nn.Module, masks: dict[str, torch.Tensor] | None, where: str,
                           compress: bool = True):
    """(state dict with SparseLinear tensors, sparse_modules, dense_modules, tied).

    Factorised modules (DenseSparseLinear, LowRankLinear) keep their own tensors. With
    ``compress=False`` (a model with factorised layers saved uncompressed) every
    SparseLinear is written as the dense weight of the layer it replaced and ``masks`` are
    not used to compress anything."""
    conv1d = _conv1d_type()
    owners = _owners(model)
    if not compress:
        sd = _dense_state_dict(model)
        sd = model.state_dict() if sd is None else sd
        masks = None
    else:
        sd = model.state_dict()
    sparse: dict[str, dict] = {}
    dense: dict[str, str] = {}

    for name, mod in model.named_modules():
        if compress and isinstance(mod, SparseLinear):
            sparse[name] = {
                "in_features": mod.in_features, "out_features": mod.out_features,
                "bias": mod.bias is not None, "source": getattr(mod, _SOURCE_ATTR, "Linear"),
            }

    for name, mask in (masks or {}).items():
        mod = model.get_submodule(name)
        if isinstance(mod, SparseLinear):
            continue  # already compressed: stored as it is
        if type(mod) is nn.Linear:
            w, mask_lin, source = mod.weight, mask, "Linear"
        elif conv1d is not None and isinstance(mod, conv1d):
            w, mask_lin, source = mod.weight.t(), mask.t(), "Conv1D"  # Conv1D keeps weight [in, out]
        else:
            dense[name] = f"module is a {type(mod).__name__}, not nn.Linear or Conv1D"
            continue
        out_f, in_f = w.shape
        if in_f % 4:
            dense[name] = f"in_features={in_f} is not a multiple of 4"
            continue
        if w.dtype not in _KERNEL_DTYPES:
            dense[name] = f"dtype {w.dtype} has no 2:4 kernel (float32, bfloat16, float16)"
            continue
        shared = [o for o in owners.get(id(mod.weight), []) if o != f"{name}.weight"]
        if shared:
            dense[name] = f"weight is shared with {', '.join(shared)}"
            continue
        mask_lin = mask_lin.to(w.device)
        counts = mask_lin.reshape(out_f, in_f // 4, 4).sum(-1)
        if bool((counts > 2).any()):
            dense[name] = "mask is not 2:4 (a group of 4 inputs keeps more than 2)"
            continue
        outside = int(((w != 0) & ~mask_lin).sum())
        if outside:
            raise ValueError(
                f"{where}: module {name!r} has {outside} non-zero weight(s) where its mask is False; compress=True "
                "stores only the kept weights, so apply the masks first (semisparse.masks.apply_masks(model, masks))"
            )
        sl = SparseLinear.from_dense(_linear_view(w, mod.bias), mask_lin)
        del sd[f"{name}.weight"]
        sd[f"{name}.values"] = sl.values.detach()
        sd[f"{name}.meta"] = sl.meta
        sparse[name] = {"in_features": in_f, "out_features": out_f, "bias": mod.bias is not None, "source": source}

    # tensors shared by several names (tied embeddings) are stored once
    tied: dict[str, str] = {}
    for names in owners.values():
        present = [n for n in names if n in sd]
        for dup in present[1:]:
            tied[dup] = present[0]
            del sd[dup]
    return sd, dict(sorted(sparse.items())), dense, tied


def _dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict with every SparseLinear's ``values``/``meta`` replaced by the dense
    ``weight`` of the module it replaced (transposed back for a Conv1D); None when the
    model has no SparseLinear."""
    sparse = [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if not sparse:
        return None
    sd = model.state_dict()
    for name, mod in sparse:
        del sd[f"{name}.values"], sd[f"{name}.meta"]
        w = mod.weight.detach()
        if getattr(mod, _SOURCE_ATTR, "Linear") == "Conv1D":
            w = w.t().contiguous()
        sd[f"{name}.weight"] = w
    return sd


def save_pretrained(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer=None,
    compress: bool = False,
    masks: Mapping[str, torch.Tensor] | None = None,
    metadata: Mapping | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a (pruned) ``transformers`` model to the folder ``out_dir``; returns its path.

    * ``compress=False``: a normal Hugging Face folder (``model.save_pretrained``,
      safetensors) that ``transformers`` loads as is. SparseLinear layers are written as
      the dense weight of the layer they replaced.
    * ``compress=True``: the 2:4 layers are stored compressed (see the module docstring):
      every layer that is already a SparseLinear, and every ``nn.Linear`` / ``Conv1D``
      with a mask in ``masks`` that is 2:4 along the input dimension. A masked layer that
      cannot be compressed (mask not 2:4, ``in_features % 4``, no kernel for its dtype,
      weight shared with another module such as a tied LM head) stays dense, with the
      reason in ``semisparse.json`` and a warning. A masked layer with non-zero weights
      where its mask is False is an error (apply the masks first). With neither masks,
      SparseLinear nor factorised layers there is nothing to compress: an error.
    * Factorised layers (DenseSparseLinear in any state, LowRankLinear; see
      :mod:`semisparse.dsformer`) are always stored as they are in semisparse's weights
      file (``semisparse.json`` version 2, ``factorized_modules``), with either value of
      ``compress``; :func:`load_pretrained` rebuilds them exactly. With ``compress=False``
      the other layers are stored as in a plain folder (SparseLinear as dense weights).

    ``masks`` (``{module name: bool tensor of the weight's shape}``) are also written to
    ``masks.safetensors``. ``metadata`` (JSON-serialisable; its ``"method"`` and
    ``"pattern"`` are copied to the top of ``semisparse.json``) describes the run.
    ``tokenizer`` (anything with ``save_pretrained``) is saved into the folder too.

    Written atomically: into a temporary folder next to ``out_dir``, renamed at the end.
    An existing ``out_dir`` is an error unless ``overwrite=True``; nothing is left behind
    when saving fails. The model itself is not modified.
    """
    where = "save_pretrained"
    _check_hf_model(model, where)
    out_dir = Path(out_dir).expanduser()
    _check_out_dir(out_dir, overwrite, where)
    metadata = _merge_metadata(metadata, None, None, where)
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"{where}: tokenizer must have save_pretrained (a transformers tokenizer), got {type(tokenizer).__name__}"
        )
    masks = _check_masks(model, masks, where) if masks is not None else None
    if masks is not None and not masks:
        raise ValueError(f"{where}: masks is empty (pass None when there are no masks)")

    factorized = _factorized_modules(model)
    info = {
        "format": _FORMAT,
        "version": _VERSION if factorized else _VERSION_PLAIN,
        "semisparse_version": _version(),
        "compressed": bool(compress),
        "architecture": type(model).__name__,
        "method": metadata.get("method"),
        "pattern": metadata.get("pattern"),
        "metadata": metadata,
        "masks": MASKS_FILE if masks else None,
    }
    state = None
    own_file = bool(compress or factorized)  # semisparse's weights file (transformers cannot rebuild these)
    if own_file:
        sd, sparse, dense, tied = _compressed_state_dict(model, masks, where, compress=bool(compress))
        if not compress or (factorized and not sparse and not masks):
            pass  # factorised layers only (or uncompressed): nothing to compress, nothing to warn about
        elif not sparse:
            if not masks:
                raise ValueError(
                    f"{where}: compress=True but the model has no SparseLinear layers and no masks were given: "
                    "nothing to compress (pass the masks of the pruned layers, or compress=False)"
                )
            warnings.warn(f"{where}: no masked layer could be stored 2:4; all stay dense: {dense}", stacklevel=2)
        elif dense:
            warnings.warn(
                f"{where}: {len(dense)} masked layer(s) stay dense: "
                + "; ".join(f"{n}: {r}" for n, r in list(dense.items())[:5]) + (" ..." if len(dense) > 5 else ""),
                stacklevel=2,
            )
        info.update(weights=COMPRESSED_WEIGHTS, sparse_modules=sparse, dense_modules=dense, tied=tied)
        if factorized:
            info["factorized_modules"] = factorized
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            config.dtype = str(dtype).removeprefix("torch.")
    else:
        state = _dense_state_dict(model)
        info.update(weights=_HF_WEIGHTS[0])

    with _atomic_dir(out_dir, overwrite, where) as tmp:
        if own_file:
            header = {"format": _WEIGHTS_FORMAT, "version": info["version"], "sparse_modules": sorted(sparse)}
            if factorized:
                header["factorized_modules"] = sorted(factorized)
            save_tensors(sd, tmp / COMPRESSED_WEIGHTS, header)
            config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            can_generate = getattr(model, "can_generate", lambda: False)
            if gen is not None and can_generate():
                gen.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
            if not any((tmp / f).is_file() for f in _HF_WEIGHTS):
                raise RuntimeError(
                    f"{where}: model.save_pretrained wrote no safetensors weights into {tmp} (files: "
                    f"{sorted(p.name for p in tmp.iterdir())})"
                )
        if masks:
            save_masks(masks, tmp / MASKS_FILE, metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_bytes(tmp / SEMISPARSE_JSON, (json.dumps(info, indent=2, sort_keys=False) + "\n").encode())
    return out_dir


# ------------------------------------------------------------------ loading
def read_info(path: str | os.PathLike) -> dict | None:
    """The parsed ``semisparse.json`` of a model folder, or None when it has none."""
    f = Path(path) / SEMISPARSE_JSON
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(info, dict) or info.get("format") != _FORMAT:
        fmt = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{f}: not a semisparse model description (format={fmt!r}, expected {_FORMAT!r})")
    if not isinstance(info.get("version"), int) or info["version"] > _VERSION:
        raise ValueError(f"{f}: version {info.get('version')!r}; this semisparse reads <= {_VERSION}")
    return info


def _model_class(config):
    """The class named by ``config.architectures`` when transformers has it; else
    AutoModelForCausalLM for a ``*ForCausalLM`` name, else AutoModel."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if any(a.endswith("ForCausalLM") for a in archs):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _build_from_config(cls, config, dtype):
    """An uninitialised model of ``cls`` (every tensor is overwritten by the load)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            no_init_weights = contextlib.nullcontext
    with no_init_weights():
        if hasattr(cls, "_from_config"):
            return cls._from_config(config, dtype=dtype)
        return cls.from_config(config, dtype=dtype)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(tensor, nn.Parameter):
        setattr(mod, attr, tensor)
    else:
        mod._buffers[attr] = tensor


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name!r} is not a tensor of the model")
    return t


def _load_compressed(path: Path, info: dict) -> nn.Module:
    from transformers import AutoConfig

    where = f"load_pretrained({path})"
    weights = path / info.get("weights", COMPRESSED_WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{where}: {SEMISPARSE_JSON} says the weights are compressed, but {weights.name} is missing from {path}"
        )
    sparse = info.get("sparse_modules")
    tied = info.get("tied", {})
    factorized = info.get("factorized_modules", {})
    if not isinstance(sparse, dict) or not isinstance(tied, dict) or not isinstance(factorized, dict):
        raise ValueError(
            f"{where}: {SEMISPARSE_JSON}: 'sparse_modules', 'tied' and 'factorized_modules' must be JSON objects"
        )
    both = sorted(set(sparse) & set(factorized))
    if both:
        raise ValueError(f"{where}: {SEMISPARSE_JSON} lists {both} both as sparse and as factorised modules")
    tensors, header = load_tensors(weights)
    if header.get("format") != _WEIGHTS_FORMAT:
        raise ValueError(
            f"{where}: {weights.name} is not a semisparse compressed model file (format={header.get('format')!r})"
        )

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    stored = {t.dtype for t in tensors.values() if t.is_floating_point()}
    build_dtype = getattr(config, "dtype", None)
    if isinstance(build_dtype, str):
        build_dtype = getattr(torch, build_dtype, None)
    if build_dtype is None and len(stored) == 1:
        build_dtype = next(iter(stored))
    model = _build_from_config(_model_class(config), config, build_dtype)

    conv1d = _conv1d_type()
    for name, spec in sparse.items():
        if not (isinstance(spec, dict) and all(isinstance(spec.get(k), int) for k in ("in_features", "out_features"))):
            raise ValueError(f"{where}: {SEMISPARSE_JSON}: bad entry for {name!r}: {spec!r}")
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{where}: {SEMISPARSE_JSON} lists {name!r}, which the model built from config.json lacks"
            ) from None
        if type(old) is nn.Linear:
            shape = (old.out_features, old.in_features)
        elif isinstance(old, SparseLinear):
            shape = (old.out_features, old.in_features)
        elif conv1d is not None and isinstance(old, conv1d):
            shape = (old.weight.shape[1], old.weight.shape[0])
        else:
            raise ValueError(
                f"{where}: module {name!r} is a {type(old).__name__}; only Linear/Conv1D can be SparseLinear"
            )
        if shape != (spec["out_features"], spec["in_features"]):
            raise ValueError(
                f"{where}: module {name!r} is {shape[0]}x{shape[1]} (out x in) in the config's model, "
                f"{spec['out_features']}x{spec['in_features']} in {SEMISPARSE_JSON}"
            )
        new = SparseLinear(spec["in_features"], spec["out_features"], bias=bool(spec["bias"]), device="meta")
        if spec.get("source", "Linear") != "Linear":
            setattr(new, _SOURCE_ATTR, spec["source"])
        _set_tensor_module(model, name, new)

    for name, spec in factorized.items():
        _set_tensor_module(model, name, _factorized_module(model, name, spec, where))
    _check_factorized_tensors(model, factorized, tensors, weights.name, where)

    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where}: {weights.name} does not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            " (the model is rebuilt from config.json alone: modules that depend on constructor arguments outside "
            "the config, such as BertModel(add_pooling_layer=False), cannot be rebuilt)"
        )
    # assign=True: the model takes the stored tensors (and their dtypes) as they are
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{where}: {weights.name} does not fit the model built from config.json: {e}") from e
    for dup, src in tied.items():
        _set_tensor(model, dup, _get_tensor(model, src))
    return model


def _factorized_module(model: nn.Module, name: str, spec, where: str) -> nn.Module:
    """An empty (meta) DenseSparseLinear / LowRankLinear for the ``factorized_modules``
    entry ``spec`` of module ``name``, in the recorded state, after checking that the
    entry is well formed and fits the ``nn.Linear`` of the model built from config.json."""
    what = f"{where}: {SEMISPARSE_JSON}: factorized_modules[{name!r}]"

    def need(key, kind, expected, default=None):
        v = spec.get(key, default)
        if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
            raise ValueError(f"{what}: {key!r} must be {expected}, got {v!r}")
        return v

    if not isinstance(spec, dict):
        raise ValueError(f"{what} must be a JSON object, got {spec!r}")
    cls = spec.get("class")
    if cls not in ("DenseSparseLinear", "LowRankLinear"):
        raise ValueError(f"{what}: 'class' must be 'DenseSparseLinear' or 'LowRankLinear', got {cls!r}")
    in_f = need("in_features", int, "a positive integer")
    out_f = need("out_features", int, "a positive integer")
    bias = need("bias", bool, "true or false")
    if in_f < 1 or out_f < 1:
        raise ValueError(f"{what}: in_features and out_features must be positive, got {in_f} and {out_f}")
    if spec.get("source", "Linear") != "Linear":
        raise ValueError(f"{what}: 'source' must be 'Linear' (only nn.Linear layers are factorised), "
                         f"got {spec.get('source')!r}")
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{where}: {SEMISPARSE_JSON} lists {name!r}, which the model built from config.json lacks") from None
    if type(old) is not nn.Linear:
        raise ValueError(f"{where}: module {name!r} is a {type(old).__name__} in the config's model; "
                         f"only nn.Linear layers can be {cls}")
    if (old.out_features, old.in_features) != (out_f, in_f):
        raise ValueError(
            f"{where}: module {name!r} is {old.out_features}x{old.in_features} (out x in) in the config's model, "
            f"{out_f}x{in_f} in {SEMISPARSE_JSON}"
        )
    if cls == "LowRankLinear":
        rank = need("rank", int, "a positive integer")
        try:
            return _lowrank_type()(in_f, out_f, rank, bias=bias, device="meta")
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    k = need("k", int, "a positive integer")
    blocks = need("blocks", int, "a positive integer", default=1)
    pattern = need("pattern", str, "an 'N:M' string")
    state = spec.get("state")
    if state not in _DS_STATES:
        raise ValueError(f"{what}: 'state' must be one of {', '.join(repr(x) for x in _DS_STATES)}, got {state!r}")
    frozen = need("mask_frozen", bool, "true or false", default=False)
    try:
        n, m = _parse_nm(pattern)
        if state == "compressed" and (n, m) != (2, 4):
            raise ValueError(f"state 'compressed' needs pattern 2:4 (the sparse kernel), got {pattern!r}")
        if state == "compressed" and frozen:
            raise ValueError("mask_frozen is true but the state is 'compressed' (whose mask is always fixed)")
        mod = DenseSparseLinear(in_f, out_f, k, pattern=pattern, bias=bias, device="meta", blocks=blocks)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if state == "compressed":
        mod._to_compressed()
    else:
        mod._to_training(frozen=frozen)
    return mod


def _check_factorized_tensors(model, factorized: dict, tensors: dict, file: str, where: str) -> None:
    """Each factorised module's tensors in the weights file are exactly those of its recorded
    state (a clear error naming the state and the expected tensors otherwise)."""
    for name, spec in factorized.items():
        mod = model.get_submodule(name)
        prefix = f"{name}."
        expected = sorted(mod.state_dict().keys())
        have = sorted(k[len(prefix):] for k in tensors if k.startswith(prefix))
        if have != expected:
            state = spec["class"] if spec["class"] == "LowRankLinear" else (
                f"DenseSparseLinear state {spec['state']!r}" + (", mask frozen" if spec.get("mask_frozen") else ""))
            raise ValueError(
                f"{where}: {SEMISPARSE_JSON} says {name!r} is a {state}, stored as {expected}, "
                f"but {file} holds {have or 'nothing'} for it"
            )


def _set_tensor_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a model folder written by :func:`save_pretrained`, or any local Hugging Face
    model folder (safetensors weights), onto ``device`` in eval mode.

    * A folder without ``semisparse.json``, or saved with ``compress=False``: loaded by
      ``transformers`` (``from_pretrained``, local files only, safetensors only: a folder
      holding only ``pytorch_model.bin`` is refused, pickles are never loaded).
    * A compressed folder, or one with factorised layers: the model is rebuilt from
      ``config.json`` (the class named by its ``architectures``, else AutoModelForCausalLM
      / AutoModel), the modules listed in ``semisparse.json`` become SparseLinear,
      DenseSparseLinear (in the recorded state) or LowRankLinear, and every tensor of
      ``model.sparse24.safetensors`` is loaded strictly (nothing missing but the recorded
      tied tensors, nothing unexpected); tied tensors are tied again.

    ``dtype=None`` keeps the saved dtype; otherwise the model is cast to ``dtype``
    (SparseLinear metadata stays uint8). Raises :class:`FileNotFoundError` naming the
    folder and the expected files when the folder, ``config.json`` or the weights are
    missing.
    """
    path = Path(path).expanduser()
    where = f"load_pretrained({path})"
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such folder")
    if not path.is_dir():
        raise NotADirectoryError(f"{where}: not a folder (expected a model folder with config.json and weights)")
    info = read_info(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{where}: the folder has no config.json; expected a Hugging Face model folder "
            f"(config.json + {' or '.join(_HF_WEIGHTS)}, or semisparse's {COMPRESSED_WEIGHTS} + {SEMISPARSE_JSON})"
        )
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(f"{where}: loading a model folder needs transformers (pip install transformers)") from None

    if info is not None and (info.get("compressed") or info.get("factorized_modules")):
        model = _load_compressed(path, info)
    else:
        if not any((path / f).is_file() for f in _HF_WEIGHTS):
            bins = sorted(p.name for p in path.glob("*.bin"))
            extra = (
                f"; it holds {', '.join(bins)}, which semisparse does not load (pickle files are never loaded): "
                "convert it to safetensors first" if bins else ""
            )
            raise FileNotFoundError(f"{where}: no model weights: expected {' or '.join(_HF_WEIGHTS)} in {path}{extra}")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        cls = _model_class(config)
        model = cls.from_pretrained(path, dtype=dtype if dtype is not None else "auto",
                                    use_safetensors=True, local_files_only=True)
    model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
