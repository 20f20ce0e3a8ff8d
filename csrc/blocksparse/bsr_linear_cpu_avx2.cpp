// AVX2 + FMA BSR linear kernels (fp32, 8 lanes). This TU alone is compiled with
// -mavx2 -mfma -mf16c and is entered only when cpuid reports those features.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the intrinsics headers
#include <immintrin.h>

#include "blocksparse/bsr_linear_cpu.h"

#define BSR_KERNEL_NS k_avx2
#include "blocksparse/bsr_linear_kernel.h"

namespace semisparse::bsr {
namespace {

struct VAvx2 {
  using T = float;
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float a) { return _mm256_set1_ps(a); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace

void run_avx2(const Problem& p) { k_avx2::run<VAvx2>(p); }

}  // namespace semisparse::bsr
