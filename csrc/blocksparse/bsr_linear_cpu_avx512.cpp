// AVX-512 BSR linear kernels (fp32, 16 lanes). This TU alone is compiled with the AVX-512
// flags and is entered only when cpuid reports them (the avx512_bf16 path).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the intrinsics headers
#pragma GCC diagnostic ignored "-Wuninitialized"  // _mm512_reduce_add_ps (GCC 12 headers)
#include <immintrin.h>

#include "blocksparse/bsr_linear_cpu.h"

#define BSR_KERNEL_NS k_avx512
#include "blocksparse/bsr_linear_kernel.h"

namespace semisparse::bsr {
namespace {

struct VAvx512 {
  using T = float;
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float a) { return _mm512_set1_ps(a); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
};

}  // namespace

void run_avx512(const Problem& p) { k_avx512::run<VAvx512>(p); }

}  // namespace semisparse::bsr
