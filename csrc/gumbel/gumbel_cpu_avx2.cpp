// AVX2 + FMA (+ F16C) Gumbel N:M kernel: 8 groups per vector. This TU alone is compiled with
// -mavx2 -mfma -mf16c and is entered only when cpuid reports those features.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the intrinsics headers
#include <immintrin.h>

#include "gumbel/gumbel_cpu.h"

#define GUMBEL_KERNEL_NS k_avx2
#include "gumbel/gumbel_kernel.h"

namespace semisparse::gumbel {
namespace {

struct VAvx2 {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  static F set1(float a) { return _mm256_set1_ps(a); }
  static I set1i(uint32_t a) { return _mm256_set1_epi32(int(a)); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static void store(float* p, F a) { _mm256_store_ps(p, a); }
  static I loadi(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static F gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static F blend(F mk, F a, F b) { return _mm256_blendv_ps(a, b, mk); }
  static I blendi(F mk, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), mk));
  }
  static I f2bits(F a) { return _mm256_castps_si256(a); }
  static F bits2f(I a) { return _mm256_castsi256_ps(a); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static I subi(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I andi(I a, I b) { return _mm256_and_si256(a, b); }
  static I ori(I a, I b) { return _mm256_or_si256(a, b); }
  static I xori(I a, I b) { return _mm256_xor_si256(a, b); }
  static I srli8(I a) { return _mm256_srli_epi32(a, 8); }
  static I srli23(I a) { return _mm256_srli_epi32(a, 23); }
  static I slli23(I a) { return _mm256_slli_epi32(a, 23); }
  static I srli(I a, int s) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(s)); }
  static F i2f(I a) { return _mm256_cvtepi32_ps(a); }
  static I round2i(F a) { return _mm256_cvtps_epi32(a); }
  static void mulhilo(I a, I mconst, I& hi, I& lo) {
    const __m256i ev = _mm256_mul_epu32(a, mconst);
    const __m256i od = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), mconst);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(ev, 32), od, 0xAA);
    lo = _mm256_blend_epi32(ev, _mm256_slli_epi64(od, 32), 0xAA);
  }
  static void f16_run_to_f32(const uint16_t* s, float* d, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
    for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
  }
  static void f32_run_to_f16(const float* s, uint16_t* d, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
  }
};

}  // namespace

void run_avx2(const Problem& p) { k_avx2::run_f32<k_avx2::X2<k_avx2::X2<VAvx2>>>(p); }  // 4 vectors (32 groups) per step (see X2)

}  // namespace semisparse::gumbel
