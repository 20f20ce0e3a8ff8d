"""Locate and load the native libraries (``libsemisparse_cpu``, ``libsemisparse_cuda``).

They are not Python extension modules: ``torch.ops.load_library`` loads them and
their static initialisers register CPU/CUDA kernels under the op names that
:mod:`semisparse.ops` defines. One build serves every Python version and torch 2.11+.
Where a library is missing or fails to load, the ops fall back to their pure-torch
references and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["LibStatus", "status", "load", "cpu_isa", "cpu_isa_best", "set_cpu_isa"]


@dataclass
class LibStatus:
    name: str
    loaded: bool = False
    path: str | None = None
    reason: str | None = None  # why it is not loaded


_STATUS: dict[str, LibStatus] = {}
_CPU_HANDLE: ctypes.CDLL | None = None


def _search_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get("SEMISPARSE_LIB_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path(__file__).resolve().parent / "lib")
    return dirs


def _find(stem: str) -> Path | None:
    for d in _search_dirs():
        p = d / f"lib{stem}.so"
        if p.is_file():
            return p
    return None


def load() -> dict[str, LibStatus]:
    """Load the native libraries once; return their status."""
    global _CPU_HANDLE
    if _STATUS:
        return _STATUS
    cpu = LibStatus("semisparse_cpu")
    path = _find("semisparse_cpu")
    if path is None:
        cpu.reason = "libsemisparse_cpu.so not found in " + ", ".join(map(str, _search_dirs()))
    else:
        try:
            torch.ops.load_library(str(path))
            _CPU_HANDLE = ctypes.CDLL(str(path))
            cpu.loaded, cpu.path = True, str(path)
        except Exception as e:  # pragma: no cover - depends on the install
            cpu.reason = f"failed to load {path}: {e}"
    _STATUS["cpu"] = cpu

    cuda = LibStatus("semisparse_cuda")
    path = _find("semisparse_cuda")
    if torch.version.cuda is None:
        cuda.reason = "this torch is a CPU-only build (torch.version.cuda is None)"
        if path is not None:
            cuda.path = str(path)
    elif path is None:
        cuda.reason = "libsemisparse_cuda.so is not installed (the package was built without nvcc)"
    else:
        try:
            torch.ops.load_library(str(path))
            cuda.loaded, cuda.path = True, str(path)
        except Exception as e:  # pragma: no cover - needs a CUDA torch
            cuda.reason = f"failed to load {path}: {e}"
    _STATUS["cuda"] = cuda
    return _STATUS


def status() -> dict[str, LibStatus]:
    return load()


def _isa_call(fn: str) -> str:
    load()
    if _CPU_HANDLE is None:
        return "none (pure-torch reference)"
    f = getattr(_CPU_HANDLE, fn)
    f.restype = ctypes.c_char_p
    return f().decode()


def cpu_isa() -> str:
    """The SIMD path the CPU kernels use now: ``avx512_bf16`` (the AVX2+FMA kernels plus an
    AVX-512 BF16 kernels for bfloat16), ``avx2_fma``, ``neon`` or ``scalar``."""
    return _isa_call("semisparse_cpu_isa")


def cpu_isa_best() -> str:
    """The best SIMD path this CPU and build support."""
    return _isa_call("semisparse_cpu_isa_best")


_ISA_NAMES = ("auto", "scalar", "avx2_fma", "avx512_bf16", "neon")


def set_cpu_isa(name: str) -> None:
    """Force the CPU SIMD path (``"scalar"``, ``"avx2_fma"``, ``"avx512_bf16"``, ``"neon"`` or
    ``"auto"``); a path this CPU cannot run raises ValueError."""
    if name not in _ISA_NAMES:
        raise ValueError(f"set_cpu_isa: expected one of {', '.join(map(repr, _ISA_NAMES))}, got {name!r}")
    load()
    if _CPU_HANDLE is None:
        raise RuntimeError("set_cpu_isa: the native CPU library is not loaded")
    f = _CPU_HANDLE.semisparse_set_cpu_isa
    f.argtypes = [ctypes.c_char_p]
    f.restype = ctypes.c_int
    rc = f(name.encode())
    if rc == -1:
        raise ValueError(f"set_cpu_isa: expected one of {', '.join(map(repr, _ISA_NAMES))}, got {name!r}")
    if rc == -2:
        raise ValueError(f"set_cpu_isa: this CPU or build cannot run {name!r} (best: {cpu_isa_best()!r})")
