// Fused Gumbel N:M mask sampler (MaskLLM) on the CPU: the problem description shared by
// the op front end (gumbel_cpu.cpp) and the kernels (generic, AVX2+FMA, AVX-512 TUs).
// The math and the noise are defined in python/semisparse/ops/gumbel.py.
#pragma once

#include <cstdint>

#include "common/isa_dispatch.h"
#include "sparse24/sparse24_cpu.h"  // DType, bf16/fp16 <-> fp32 helpers

namespace semisparse::gumbel {

using sparse24::DType;

enum class Op : int {
  Mask = 0,                 // out = mask [G, m] (logits dtype)
  MaskedWeight = 1,         // out = weight * mask (weight dtype)
  MaskBackward = 2,         // out = d logits [G, C] from grad_mask [G, m]
  MaskedWeightBackward = 3  // out = d logits [G, C] from grad_out (weight's shape) and weight
};

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
  uint8_t pattern[70];
};

// Fills p.pattern (and p.C) from p.n, p.m.
void fill_patterns(Problem& p);

// Runs p on the path active_cpu_isa() selects (fp64 anywhere -> generic fp64 kernel).
void run(const Problem& p);

// run_generic_f32, run_generic_f64 and (x86) run_avx2, run_avx512
SEMISPARSE_DECLARE_ISA_KERNELS(run, Problem);

// Philox4x32-10 (Salmon et al., SC'11), one block: ctr[4] in, out[4] out.
inline void philox4x32_10(const uint32_t ctr[4], uint32_t k0, uint32_t k1, uint32_t out[4]) {
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
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

}  // namespace semisparse::gumbel
