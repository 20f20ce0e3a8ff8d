"""Files a user keeps: safetensors plus JSON metadata, written atomically (temp file in
the same folder, fsync, rename). Nothing here unpickles anything."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save

__all__ = ["atomic_write_bytes", "load_module_file", "load_tensors", "make_temp_dir", "save_module_file", "save_tensors"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a user's file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read
    it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, name: str) -> Path:
    """A hidden temporary folder in ``parent`` (to be renamed onto ``parent/name`` once
    complete), with the usual folder mode (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def save_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    """Write ``tensors`` as one safetensors file; ``metadata`` (JSON-serialisable) is stored
    under the header key ``"semisparse"``."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"semisparse": json.dumps(metadata or {}, sort_keys=True)}
    atomic_write_bytes(path, _st_save(flat, metadata=meta))


def load_tensors(path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    out = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file: {e}") from e
    try:
        meta = json.loads(header.get("semisparse", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the 'semisparse' header entry is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'semisparse' header entry must be a JSON object, got {type(meta).__name__}")
    return out, meta


def save_module_file(module: torch.nn.Module, path, fmt: str, version: int, meta: dict) -> None:
    """One module in one safetensors file: its state dict plus a JSON header with ``format``
    and ``version`` first, then ``meta`` (what its constructor needs); written atomically."""
    save_tensors(dict(module.state_dict()), path, {"format": fmt, "version": version, **meta})


def load_module_file(path, fmt: str, version: int, who: str,
                     device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, header)`` of a file written by :func:`save_module_file`, after checking its
    format name and that its version is one this code reads (``who`` names the caller in
    the errors)."""
    tensors, meta = load_tensors(path, device)
    if meta.get("format") != fmt:
        raise ValueError(f"{who}: {path} is not a {fmt} file (header format={meta.get('format')!r})")
    if meta.get("version", 0) > version:
        raise ValueError(f"{who}: {path} has format version {meta['version']}, this semisparse reads <= {version}")
    return tensors, meta
