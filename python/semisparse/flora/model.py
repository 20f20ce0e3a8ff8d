"""The PEFT-style model API: ``get_flora_model``, ``FLoRAModel``, save/load.

Matching (PEFT's rules): ``target_modules`` as a list matches a module whose full name is an
entry or ends with ``"." + entry``; as a string it is a regex that must match the full name;
``"all-linear"`` takes every ``nn.Linear`` except the output layer: the module returned by
``model.get_output_embeddings()`` when the model has it and it returns a module, otherwise
any Linear whose last name part is ``lm_head``, ``classifier``, ``head`` or ``score``;
modules listed in ``modules_to_save`` are left out of "all-linear" too. ``exclude_modules``
follows the same rules. Modules inside an FLoRA layer or a modules-to-save wrapper are not
candidates.

``modules_to_save``: PEFT's ModulesToSaveWrapper idea. The original module stays (frozen);
each adapter trains its own copy; the active adapter's copy runs, the original when the
adapters are disabled. ``merge_and_unload()``/``unload()`` put the active copy in place.

Save format (``save_adapter``/``save_pretrained``), one folder per adapter:

- ``adapter_config.json``: ``{"format": "semisparse.flora", "format_version": 1,
  "adapter_name", "config": FLoRAConfig.to_dict(), "modules": {name: {"type", "weight_shape",
  "ranks", "scale", "dropout"}}, "modules_to_save": {name: {key: shape}}}``;
- ``adapter_model.safetensors``: ``{name}.flora_core``, ``{name}.flora_factors.{i}`` for each
  adapted module and ``{name}.{state_dict key}`` of each modules-to-save copy; names are the
  base model's module names (no adapter name, no wrapper prefixes).

Both files are written into a temporary folder next to the target (same parent) and renamed
into place: a new folder appears whole; into an existing folder each file is replaced
atomically. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save
from torch import nn

from ..io import atomic_write_bytes, make_temp_dir
from .config import FLoRAConfig, resolve_ranks
from .layers import SUPPORTED_TYPES, FLoRALayer, ModulesToSaveWrapper, wrap_module

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "FLoRAModel",
    "get_flora_model",
    "load_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "semisparse.flora"
FORMAT_VERSION = 1
_HEAD_NAMES = ("lm_head", "classifier", "head", "score")


# ---------------------------------------------------------------------- matching
def _walk(module: nn.Module, prefix: str = ""):
    """(name, module) of every descendant, not looking inside FLoRA / modules-to-save wrappers."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (FLoRALayer, ModulesToSaveWrapper)):
            yield from _walk(child, full)


def _matches(name: str, patterns) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _logical_type(m: nn.Module) -> nn.Module:
    if isinstance(m, FLoRALayer):
        return m.base_layer
    if isinstance(m, ModulesToSaveWrapper):
        return m.original_module
    return m


def _output_layer_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError, TypeError):
            out = None
    if isinstance(out, nn.Module):
        return {n for n, m in _walk(model) if m is out or _logical_type(m) is out}
    return {n for n, m in _walk(model) if isinstance(_logical_type(m), nn.Linear) and n.rsplit(".", 1)[-1] in _HEAD_NAMES}


def _some_names(model: nn.Module, k: int = 8) -> str:
    names = [n for n, _ in _walk(model)]
    leaves = [n for n, m in _walk(model) if not list(m.children()) or isinstance(m, FLoRALayer)]
    pick = (leaves or names)[:k]
    more = len(leaves or names) - len(pick)
    return ", ".join(pick) + (f", ... ({more} more)" if more > 0 else "")


def _find_targets(model: nn.Module, config: FLoRAConfig) -> list[str]:
    if config.target_modules is None:
        raise ValueError("FLoRAConfig.target_modules is required (a list of names, a regex string or 'all-linear')")
    mts = config.modules_to_save
    names = []
    if config.target_modules == "all-linear":
        heads = _output_layer_names(model)
        for n, m in _walk(model):
            if isinstance(_logical_type(m), nn.Linear) and n not in heads and not _matches(n, mts):
                names.append(n)
    else:
        names = [n for n, _ in _walk(model) if _matches(n, config.target_modules)]
    names = [n for n in names if not _matches(n, config.exclude_modules)]
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} (exclude_modules {config.exclude_modules!r}) match no "
            f"module of the model; some of its modules: {_some_names(model)}"
        )
    mods = dict(_walk(model))
    for n in names:
        base = _logical_type(mods[n])
        if isinstance(mods[n], ModulesToSaveWrapper) or _matches(n, mts):
            raise ValueError(f"module '{n}' is both a target and in modules_to_save")
        if not isinstance(base, SUPPORTED_TYPES):
            wrap_module(base, n)  # raises the unsupported-type error
    return names


def _find_modules_to_save(model: nn.Module, config: FLoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in _walk(model) if _matches(n, config.modules_to_save) and not isinstance(m, FLoRALayer)]
    missing = [p for p in config.modules_to_save if not any(n == p or n.endswith("." + p) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model; some of its modules: {_some_names(model)}")
    # keep the outermost only (a copy of a module holds its children)
    names.sort()
    out = []
    for n in names:
        if not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


# ---------------------------------------------------------------------- the model
class FLoRAModel(nn.Module):
    """A base model with FLoRA adapters. ``forward`` passes through; unknown attributes
    fall through to the base model (``model.config`` etc.)."""

    def __init__(self, model: nn.Module, config: FLoRAConfig | None = None, adapter_name: str = "default"):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, FLoRAConfig] = {}
        self._active: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self._modules["base_model"], name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    # ------------------------------------------------------------------ layers
    def _flora_layers(self):
        return [(n, m) for n, m in _walk(self.base_model) if isinstance(m, FLoRALayer)]

    def _mts_wrappers(self):
        return [(n, m) for n, m in _walk(self.base_model) if isinstance(m, ModulesToSaveWrapper)]

    @property
    def active_adapter(self) -> str | None:
        return self._active[0] if len(self._active) == 1 else (list(self._active) if self._active else None)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, adapter_name: str, config: FLoRAConfig, *, _plan: dict | None = None,
                    _mts: list[str] | None = None) -> None:
        """Add adapter ``adapter_name`` (not activated: call ``set_adapter``)."""
        if not isinstance(config, FLoRAConfig):
            raise ValueError(f"config must be a FLoRAConfig, got {type(config).__name__}")
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named '{adapter_name}' exists already")
        from .layers import _check_adapter_name

        _check_adapter_name(adapter_name)
        mods = dict(_walk(self.base_model))
        if _plan is None:
            targets = _find_targets(self.base_model, config)
            plan = {}
            for n in targets:
                dims = tuple(_logical_type(mods[n]).weight.shape)
                plan[n] = (resolve_ranks(config.ranks_for(n), dims, n), config.scale_for(n))
        else:
            plan = _plan
        mts = _find_modules_to_save(self.base_model, config) if _mts is None else _mts
        # validate everything before changing the model
        for n in plan:
            if n not in mods:
                raise ValueError(f"module '{n}' not found in the model; some of its modules: {_some_names(self.base_model)}")
        for n, (ranks, scale) in plan.items():
            m = mods[n]
            layer = m if isinstance(m, FLoRALayer) else wrap_module(m, n)
            layer.update_layer(adapter_name, ranks, scale, config.dropout, config.init)
            layer.forward_mode = config.forward_mode
            layer.set_adapter(layer.active_adapters)  # new adapter frozen until activated
            if layer is not m:
                _set_submodule(self.base_model, n, layer)
        for n in mts:
            m = self.base_model.get_submodule(n)
            w = m if isinstance(m, ModulesToSaveWrapper) else ModulesToSaveWrapper(m, n)
            w.add(adapter_name)
            if w is not m:
                _set_submodule(self.base_model, n, w)
        self.peft_config[adapter_name] = config

    def set_adapter(self, adapter_name) -> None:
        """Activate ``adapter_name`` (or a list of names): only its parameters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ValueError(f"no adapter named '{n}'; adapters: {list(self.peft_config)}")
        for _, layer in self._flora_layers():
            layer.set_adapter(names)
        for _, w in self._mts_wrappers():
            w.set_adapter(names)
        self._active = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named '{adapter_name}'; adapters: {list(self.peft_config)}")
        for n, layer in self._flora_layers():
            if adapter_name in layer.merged_adapters:
                raise ValueError(f"adapter '{adapter_name}' is merged in '{n}'; call unmerge_adapter() first")
        for _, layer in self._flora_layers():
            layer.delete_adapter(adapter_name)
        for _, w in self._mts_wrappers():
            w.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        rest = [a for a in self._active if a != adapter_name]
        if not rest and self.peft_config:
            rest = [next(iter(self.peft_config))]
        if rest:
            self.set_adapter(rest)
        else:
            self._active = []

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, the model computes the base outputs (merged adapters are unmerged on entry
        and merged again on exit; modules_to_save run their originals)."""
        layers = self._flora_layers()
        merged = {n: list(l.merged_adapters) for n, l in layers}
        wrappers = self._mts_wrappers()
        try:
            for _, l in layers:
                l.unmerge()
                l.disable_adapters = True
            for _, w in wrappers:
                w.disable_adapters = True
            yield
        finally:
            for n, l in layers:
                l.disable_adapters = False
                if merged[n]:
                    l.merge(merged[n])
            for _, w in wrappers:
                w.disable_adapters = False

    # ------------------------------------------------------------------ merge / unload
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """Add scale * dW of the active adapters (or ``adapter_names``) into the base weights."""
        if adapter_names is not None:
            adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            for n in adapter_names:
                if n not in self.peft_config:
                    raise ValueError(f"no adapter named '{n}'; adapters: {list(self.peft_config)}")
        self._warn_shared()
        for _, layer in self._flora_layers():
            layer.merge(adapter_names, safe_merge=safe_merge)

    def _warn_shared(self) -> None:
        owners: dict[int, list[str]] = {}
        for n, p in self.base_model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(n)
        for n, layer in self._flora_layers():
            names = owners.get(id(layer.weight), [])
            if len(names) > 1:
                warnings.warn(
                    f"module '{n}': its weight is shared (tied) with {[x for x in names if not x.startswith(n + '.')]}; "
                    "merging changes those modules too",
                    stacklevel=3,
                )

    def unmerge_adapter(self) -> None:
        for _, layer in self._flora_layers():
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        if merge:
            self._warn_shared()
        for n, layer in self._flora_layers():
            if merge:
                layer.merge(adapter_names, safe_merge=safe_merge)  # shared weights warned above
            else:
                layer.unmerge()
            _set_submodule(self.base_model, n, layer.base_layer)
        for n, w in self._mts_wrappers():
            keep = w._current() if not w.disable_adapters else w.original_module
            _set_submodule(self.base_model, n, keep)
        self.peft_config.clear()
        self._active = []
        return self.base_model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) and return the base model with
        plain modules (modules_to_save: the active copy)."""
        return self._unload(True, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """The base model with plain modules and its original weights (merged adapters are
        unmerged first; modules_to_save: the active copy, as PEFT does)."""
        return self._unload(False)

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / max(a, 1):.4f}")

    # ------------------------------------------------------------------ save / load
    def _adapter_state(self, adapter_name: str) -> tuple[dict, dict]:
        tensors, modules, mts = {}, {}, {}
        for n, layer in self._flora_layers():
            if adapter_name not in layer.flora_core:
                continue
            tensors[f"{n}.flora_core"] = layer.flora_core[adapter_name]
            for i, a in enumerate(layer.flora_factors[adapter_name]):
                tensors[f"{n}.flora_factors.{i}"] = a
            modules[n] = {
                "type": type(layer.base_layer).__name__,
                "weight_shape": list(layer.weight_shape),
                "ranks": list(layer.flora_ranks[adapter_name]),
                "scale": layer.flora_scale[adapter_name],
            }
        for n, w in self._mts_wrappers():
            if adapter_name not in w.modules_to_save:
                continue
            sd = w.modules_to_save[adapter_name].state_dict()
            mts[n] = {k: list(v.shape) for k, v in sd.items()}
            for k, v in sd.items():
                tensors[f"{n}.{k}"] = v
        return tensors, {"modules": modules, "modules_to_save": mts}

    def save_adapter(self, save_directory, adapter_name: str | None = None) -> None:
        """Write one adapter (default: the active one) to ``save_directory``."""
        if adapter_name is None:
            if len(self._active) != 1:
                raise ValueError(f"name the adapter to save (active: {self._active})")
            adapter_name = self._active[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named '{adapter_name}'; adapters: {list(self.peft_config)}")
        tensors, meta = self._adapter_state(adapter_name)
        header = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adapter_name": adapter_name,
            "config": self.peft_config[adapter_name].to_dict(),
            **meta,
        }
        flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        weights = _st_save(flat, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        config_bytes = (json.dumps(header, indent=2, sort_keys=True) + "\n").encode()
        _write_folder(Path(save_directory), {CONFIG_NAME: config_bytes, WEIGHTS_NAME: weights})

    def save_pretrained(self, save_directory, adapter_names=None) -> None:
        """PEFT's layout: adapter "default" in ``save_directory``, any other in
        ``save_directory/<name>``."""
        names = list(self.peft_config) if adapter_names is None else list(adapter_names)
        for name in names:
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            self.save_adapter(out, name)

    def load_adapter(self, directory, adapter_name: str = "default", is_trainable: bool = False) -> None:
        """Add the adapter saved in ``directory`` under ``adapter_name`` and activate it."""
        header, tensors = _read_folder(Path(directory))
        config = FLoRAConfig.from_dict(header["config"])
        mods = dict(_walk(self.base_model))
        plan = {}
        for n, info in header["modules"].items():
            if n not in mods:
                raise ValueError(f"{directory}: saved module '{n}' is not in the model; some of its modules: {_some_names(self.base_model)}")
            base = _logical_type(mods[n])
            if not isinstance(base, SUPPORTED_TYPES):
                wrap_module(base, n)
            if type(base).__name__ != info["type"]:
                raise ValueError(f"{directory}: module '{n}' was a {info['type']} when saved, the model's is a {type(base).__name__}")
            shape = list(base.weight.shape)
            if shape != list(info["weight_shape"]):
                raise ValueError(
                    f"{directory}: module '{n}' has weight shape {tuple(shape)} in the model but "
                    f"{tuple(info['weight_shape'])} in the saved adapter"
                )
            plan[n] = (tuple(info["ranks"]), float(info["scale"]))
        # modules_to_save: use the saved names exactly
        mts_names = list(header.get("modules_to_save", {}))
        for n in mts_names:
            if n not in mods:
                raise ValueError(f"{directory}: saved modules_to_save entry '{n}' is not in the model")
        expected = set()
        for n, (ranks, _) in plan.items():
            expected.add(f"{n}.flora_core")
            expected.update(f"{n}.flora_factors.{i}" for i in range(len(ranks)))
        for n, keys in header.get("modules_to_save", {}).items():
            expected.update(f"{n}.{k}" for k in keys)
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing:
            raise ValueError(f"{directory}/{WEIGHTS_NAME} lacks {len(missing)} tensors: {missing[:5]}")
        if extra:
            raise ValueError(f"{directory}/{WEIGHTS_NAME} has {len(extra)} unexpected tensors: {extra[:5]}")
        cfg = FLoRAConfig.from_dict({**config.to_dict(), "modules_to_save": mts_names or None})
        self.add_adapter(adapter_name, cfg, _plan=plan, _mts=mts_names)
        try:
            _load_tensors_into(self, adapter_name, plan, header.get("modules_to_save", {}), tensors, directory)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        self.set_adapter(adapter_name)
        if not is_trainable:
            for _, layer in self._flora_layers():
                for p in list(layer.flora_core.values()) + [q for f in layer.flora_factors.values() for q in f]:
                    p.requires_grad_(False)
            for _, w in self._mts_wrappers():
                for p in w.modules_to_save.parameters():
                    p.requires_grad_(False)
            self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False) -> FLoRAModel:
        fm = cls(model)
        fm.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return fm


def _load_tensors_into(fm: FLoRAModel, adapter_name, plan, mts_meta, tensors, directory) -> None:
    mods = dict(_walk(fm.base_model))
    with torch.no_grad():
        for n in plan:
            layer = mods[n]
            params = {f"{n}.flora_core": layer.flora_core[adapter_name]}
            params.update({f"{n}.flora_factors.{i}": a for i, a in enumerate(layer.flora_factors[adapter_name])})
            for k, p in params.items():
                t = tensors[k]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{directory}: tensor '{k}' has shape {tuple(t.shape)}, the adapter expects {tuple(p.shape)}")
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        for n in mts_meta:
            copy = mods[n].modules_to_save[adapter_name]
            sd = copy.state_dict()
            new = {}
            for k, v in sd.items():
                t = tensors[f"{n}.{k}"]
                if tuple(t.shape) != tuple(v.shape):
                    raise ValueError(
                        f"{directory}: modules_to_save '{n}' entry '{k}' has shape {tuple(t.shape)} in the file "
                        f"but {tuple(v.shape)} in the model"
                    )
                new[k] = t.to(device=v.device, dtype=v.dtype)
            copy.load_state_dict(new, strict=True)


def _write_folder(target: Path, files: dict[str, bytes]) -> None:
    target = target.absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, target.name)
    try:
        for name, data in files.items():
            atomic_write_bytes(tmp / name, data)
        if not target.exists():
            try:
                os.rename(tmp, target)
                return
            except OSError:
                target.mkdir(parents=True, exist_ok=True)
        if not target.is_dir():
            raise ValueError(f"{target} exists and is not a folder")
        for name in files:
            os.replace(tmp / name, target / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_folder(directory: Path) -> tuple[dict, dict]:
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p}")
    try:
        header = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a semisparse FLoRA adapter config (format != {FORMAT!r})")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {header.get('format_version')!r} is not supported (this is {FORMAT_VERSION})")
    for k in ("config", "modules"):
        if not isinstance(header.get(k), dict):
            raise ValueError(f"{cfg_path}: missing or bad '{k}' entry")
    tensors = {}
    try:
        with safe_open(str(w_path), framework="pt", device="cpu") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except SafetensorError as e:
        raise ValueError(f"{w_path} is not a safetensors file: {e}") from e
    return header, tensors


# ---------------------------------------------------------------------- entry points
def get_flora_model(model: nn.Module, config: FLoRAConfig, adapter_name: str = "default") -> FLoRAModel:
    """Wrap ``model``: every base parameter frozen, adapter ``adapter_name`` added and active."""
    if isinstance(model, FLoRAModel):
        raise ValueError("the model is already a FLoRAModel; use add_adapter")
    return FLoRAModel(model, config, adapter_name)


def load_adapter(model: nn.Module, directory, adapter_name: str = "default", is_trainable: bool = False) -> FLoRAModel:
    """Load a saved adapter onto ``model`` (a plain model or a FLoRAModel, which gains it)."""
    if isinstance(model, FLoRAModel):
        model.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        return model
    return FLoRAModel.from_pretrained(model, directory, adapter_name, is_trainable=is_trainable)
