// Block-sparse (BSR) linear on the CPU: the problem description shared by the op front end
// (bsr_linear_cpu.cpp) and the kernels (generic, AVX2+FMA, AVX-512 TUs). The ops and the
// format are defined in python/semisparse/ops/bsr.py.
#pragma once

#include <cstdint>

#include "common/isa_dispatch.h"

namespace semisparse::bsr {

enum class Op : int {
  Forward = 0,    // out[M, N] = a[M, K] (x) @ W^T + bias, W = (b = values, crow, col)
  GradInput = 1,  // out[M, K] = a[M, N] (grad_y) @ W
  GradValues = 2  // out[nnz, bh, bw] = a[M, N] (grad_y) block^T @ b[M, K] (x) block
};

// All pointers are contiguous and of one element type T (float or double): the front end
// converts bf16/fp16 to fp32 and back.
struct Problem {
  Op op;
  const void* a;
  const void* b;
  const void* bias;      // [N] or null (Forward)
  void* out;
  const int64_t* crow;   // [N/bh + 1]
  const int64_t* col;    // [nnz] block column of each block
  const int64_t* rows;   // [nnz] block row of each block (GradInput, GradValues)
  const int64_t* ccol;   // [K/bw + 1] CSC pointers (GradInput)
  const int64_t* cblk;   // [nnz] block ids, by block column (GradInput)
  int64_t M, N, K, nnz, bh, bw;
  bool f64;
};

// Runs p on the path active_cpu_isa() selects (f64 -> generic).
void run(const Problem& p);

// run_generic_f32, run_generic_f64 and (x86) run_avx2, run_avx512
SEMISPARSE_DECLARE_ISA_KERNELS(run, Problem);

}  // namespace semisparse::bsr
