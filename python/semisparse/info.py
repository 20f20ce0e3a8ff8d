"""What this install can do: native libraries, CPU SIMD path, CUDA kernels."""

from __future__ import annotations

import platform

import torch

from . import _native

__all__ = ["info", "format_info"]

# op -> devices with a native kernel (the rest run the pure-torch reference)
NATIVE_KERNELS = {
    "sparse24_compress": ("cpu", "cuda"),
    "sparse24_decompress": ("cpu", "cuda"),
    "sparse24_linear": ("cpu",),
}


def info() -> dict:
    st = _native.status()
    cuda_ok = torch.cuda.is_available()
    d = {
        "semisparse": __import__("semisparse").__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_library": {"loaded": st["cpu"].loaded, "path": st["cpu"].path, "reason": st["cpu"].reason},
        "cpu_simd": _native.cpu_isa(),
        "cpu_simd_best": _native.cpu_isa_best(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_library": {"loaded": st["cuda"].loaded, "path": st["cuda"].path, "reason": st["cuda"].reason},
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "cuda_available": cuda_ok,
        "cuda_reason": None,
        "kernels": {},
    }
    if not cuda_ok:
        d["cuda_reason"] = (
            "torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        )
    for op, devs in NATIVE_KERNELS.items():
        row = {}
        row["cpu"] = "native" if st["cpu"].loaded and "cpu" in devs else "reference (pure torch)"
        if st["cuda"].loaded and "cuda" in devs:
            row["cuda"] = "native"
        else:
            row["cuda"] = "reference (pure torch)"
        d["kernels"][op] = row
    return d


def format_info(d: dict | None = None) -> str:
    d = d or info()
    lines = [
        f"semisparse {d['semisparse']}  torch {d['torch']}  python {d['python']}  {d['machine']}",
        "",
        "CPU library : " + ("loaded " + d["cpu_library"]["path"] if d["cpu_library"]["loaded"]
                           else "NOT loaded: " + str(d["cpu_library"]["reason"])),
        f"CPU SIMD    : {d['cpu_simd']} (best on this machine: {d['cpu_simd_best']}; "
        f"override with SEMISPARSE_CPU_ISA=scalar|avx2_fma|avx512_bf16|neon)",
        f"CPU threads : {d['cpu_threads']} (torch.set_num_threads)",
        "CUDA library: " + ("loaded " + d["cuda_library"]["path"] if d["cuda_library"]["loaded"]
                           else "not loaded: " + str(d["cuda_library"]["reason"])),
        "CUDA device : " + (d["cuda_device"] if d["cuda_available"] else f"none ({d['cuda_reason']})"),
        "",
        f"{'op':<22} {'cpu':<24} cuda",
    ]
    for op, row in d["kernels"].items():
        lines.append(f"{op:<22} {row['cpu']:<24} {row['cuda']}")
    if d["cuda_library"]["loaded"]:
        lines.append("note: sparse24_linear on CUDA runs the pure-torch reference until the CUTLASS kernels land")
    return "\n".join(lines)
