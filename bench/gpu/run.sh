#!/usr/bin/env bash
# The GPU checks in one call (the device machine: H200, Python 3.12, torch 2.11+cu130, no
# network). Uses the native libraries built on the CPU machine and carried in build/gpu:
#
#   mkdir -p build/gpu && cp build/dev/libsemisparse_cpu.so build/cuda/libsemisparse_cuda.so build/gpu/
#   run: bash bench/gpu/run.sh   with carry ["build/gpu"]
#
# Without build/gpu it builds them here (all cores, sm_90a only). Then: what loaded, the
# CUDA tests (fresh random inputs, checked against the CPU ops), the benchmarks, one table
# last. Logs go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/semisparse-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$SECONDS

if [ ! -f build/gpu/libsemisparse_cuda.so ]; then
  echo "== no carried build/gpu: building the libraries here (sm_90a)"
  cmake -S . -B build/gpu-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DSEMISPARSE_CUDA_ARCHS=90a \
    -DPython3_EXECUTABLE="$(command -v $PY)" > "$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  ninja -C build/gpu-build -j "$(nproc)" > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  mkdir -p build/gpu && cp build/gpu-build/libsemisparse_*.so build/gpu/
fi
export SEMISPARSE_LIB_DIR=$PWD/build/gpu PYTHONPATH=$PWD/python
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import semisparse, torch; print('torch', torch.__version__); [print(k, v) for k, v in semisparse.native_status().items()]" \
  | tee "$OUT/native.txt"

echo "== CUDA tests"
$PY -m pytest -q -p no:cacheprovider tests/test_sparse24_cuda.py tests/test_sparse24_gemm_cuda.py tests/test_gumbel_cuda.py \
  tests/test_bsr_cuda.py tests/test_block_attention_cuda.py > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -5 "$OUT/tests.log"

echo "== benchmarks"
$PY bench/gpu/sparse24_bench.py --reps 20 > "$OUT/sparse24.txt" 2>&1 || true
$PY bench/gpu/gumbel_bench.py --size 8192 --reps 20 > "$OUT/gumbel.txt" 2>&1 || true
$PY bench/gpu/blocksparse_bench.py --reps 20 > "$OUT/blocksparse.txt" 2>&1 || true

echo
echo "== summary ($((SECONDS - t0)) s)"
echo "tests: rc $tests_rc, $(grep -E 'passed|failed' "$OUT/tests.log" | tail -1)"
cat "$OUT/sparse24.txt"
cat "$OUT/gumbel.txt"
cat "$OUT/blocksparse.txt"
exit $tests_rc
