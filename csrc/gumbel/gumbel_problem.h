// The Gumbel N:M problem description shared by the op front ends (CPU and CUDA) and every
// kernel (generic, AVX2+FMA, AVX-512, CUDA). Plain C++ (nvcc compiles it too). The math and
// the noise are defined in python/semisparse/ops/gumbel.py.
#pragma once

#include <cstdint>

#include "sparse24/sparse24_cpu.h"  // DType, bf16/fp16 <-> fp32 helpers

#if defined(__CUDACC__)
#define SEMISPARSE_GUMBEL_HD __host__ __device__ __forceinline__
#else
#define SEMISPARSE_GUMBEL_HD inline
#endif

namespace semisparse::gumbel {

using sparse24::DType;

enum class Op : int {
  Mask = 0,                 // out = mask [G, m] (logits dtype)
  MaskedWeight = 1,         // out = weight * mask (weight dtype)
  MaskBackward = 2,         // out = d logits [G, C] from grad_mask [G, m]
  MaskedWeightBackward = 3  // out = d logits [G, C] from grad_out (weight's shape) and weight
};

constexpr int kMaxPatterns = 70;  // C(8, 4)

struct Problem {
  Op op;
  const void* logits;  // [G, C] contiguous
  const void* weight;  // [G * m] contiguous, or null
  const void* grad;    // [G * m] contiguous, or null
  void* out;
  DType lt, wt, gt, ot;  // dtypes of logits, weight, grad, out (wt/gt unused when null)
  int64_t G;
  int n, m, C;
  uint64_t seed, offset;
  double tau, kappa;
  bool hard;
  // candidate c keeps element j of its group iff bit j of pattern[c] is set
  // (itertools.combinations(range(m), n) order)
  uint8_t pattern[kMaxPatterns];
};

// Fills p.pattern and p.C from p.n, p.m (1 <= n < m <= 8): lexicographic n-subsets.
inline void fill_patterns(Problem& p) {
  int idx[8];
  for (int i = 0; i < p.n; ++i) idx[i] = i;
  int c = 0;
  while (true) {
    uint8_t bits = 0;
    for (int i = 0; i < p.n; ++i) bits |= uint8_t(1u << idx[i]);
    p.pattern[c++] = bits;
    int i = p.n - 1;
    while (i >= 0 && idx[i] == p.m - p.n + i) --i;
    if (i < 0) break;
    ++idx[i];
    for (int j = i + 1; j < p.n; ++j) idx[j] = idx[j - 1] + 1;
  }
  p.C = c;
}

// True when any tensor of p is float64 (then the kernels compute in float64).
inline bool any_f64(const Problem& p) {
  return p.lt == DType::F64 || p.ot == DType::F64 || (p.weight && p.wt == DType::F64) ||
         (p.grad && p.gt == DType::F64);
}

// Philox4x32-10 (Salmon et al., SC'11), one block: ctr[4] in, out[4] out. The noise of
// every kernel (CPU scalar and SIMD, CUDA) comes from this function or a vector copy of it.
SEMISPARSE_GUMBEL_HD void philox4x32_10(const uint32_t ctr[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

}  // namespace semisparse::gumbel
