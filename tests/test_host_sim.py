"""Host-side checks of the CUDA kernels' index math and arithmetic, run on any machine
with a C++ compiler (no GPU): each program in tests/host_sim/ is compiled and run.

* sim_small_m.cpp: includes sparse24_small_m.cu's host+device section and replays the
  small-M kernel for every block / warp / lane: every value and metadata unit read
  exactly once, from the address meta_layout.h names; the warp mma emulated from the
  fragment layouts; y compared exactly with x @ W^T.
* sim_pack.cpp: the GPU pack / unpack kernels' placement (inverse maps), prune rule and
  encoding against an independent reference, every layout and dtype.
* sim_block_attention.cpp: the block-sparse attention kernels' work lists, cp.async /
  ldmatrix / mma fragment maps, masks, online softmax and backward, per CTA / warp / lane,
  against a float64 reference (quick mode here).
* sim_bsr_linear.cpp: the BSR linear tensor-core kernels (forward, grad_input, grad_values),
  their work lists / split rows / transposed index, per CTA / thread, exactly.
* sim_sm80_meta.cpp: sm80_meta_word against CUTLASS's own host reorder_meta and
  uncompress (needs nvcc and the CUTLASS headers).
* sim_sm90_meta.cpp: sm90_meta_byte against CuTe's layout of the sm90 sparse config the
  GEMM is built with (needs nvcc and the CUTLASS headers).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIM = ROOT / "tests" / "host_sim"


def _cutlass_include() -> Path | None:
    for c in (os.environ.get("CUTLASS_DIR"),):
        if c and (Path(c) / "include" / "cutlass" / "cutlass.h").exists():
            return Path(c)
    try:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        src = Path(list(spec.submodule_search_locations)[0]) / "source"
        if (src / "include" / "cutlass" / "cutlass.h").exists():
            return src
    for build in ("build/cuda", "build/dev", "build"):
        src = ROOT / build / "_cutlass" / "cutlass_library" / "source"
        if (src / "include" / "cutlass" / "cutlass.h").exists():
            return src
    return None


def _cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parents[1]))  # (a wrapper script may sit elsewhere)
    for c in cands:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c) / "include"
    return None


def _run(cmd: list[str], exe: Path, args: list[str] = ()) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"compile failed:\n{r.stderr[-3000:]}"
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{exe.name} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize(
    "name,marker,args",
    [
        ("sim_small_m", "SIMULATION PASSED", []),
        ("sim_pack", "PACK SIMULATION PASSED", []),
        ("sim_block_attention", "SIMULATION PASSED", ["quick"]),  # (the full run: ~35 s more)
        ("sim_bsr_linear", "SIMULATION PASSED", []),
    ],
)
def test_host_simulation(name, marker, args, tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a C++ compiler and the CUDA headers (cuda_runtime.h)")
    exe = tmp_path / name
    out = _run([cxx, "-std=c++20", "-O2", "-x", "c++", f"-I{ROOT / 'csrc'}", f"-I{inc}", str(SIM / f"{name}.cpp"),
                "-o", str(exe)], exe, args)
    assert marker in out and "(0 failures)" in out, out[-3000:]


@pytest.mark.parametrize("name", ["sim_sm80_meta", "sim_sm90_meta"])
def test_cutlass_layout_check(name, tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    cut = _cutlass_include()
    if nvcc is None or cut is None:
        pytest.skip("needs nvcc and the CUTLASS headers (pip install --no-deps nvidia-cutlass==4.2.0.0)")
    src = SIM / f"{name}.cpp"
    if not src.exists():
        pytest.skip(f"{src.name} not present")
    exe = tmp_path / name
    out = _run([nvcc, "-std=c++20", "-x", "cu", "-arch=sm_80", f"-I{ROOT / 'csrc'}", f"-I{cut / 'include'}",
                f"-I{cut / 'tools' / 'util' / 'include'}", str(src), "-o", str(exe)], exe)
    assert "ALL OK" in out, out[-3000:]
