// AVX-512 Gumbel N:M kernel: 16 groups per vector. This TU alone is compiled with the
// AVX-512 (F/BW/BF16) flags and is entered only when active_cpu_isa() is Avx512Bf16.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positives in the intrinsics headers
#include <immintrin.h>

#include "gumbel/gumbel_cpu.h"

#define GUMBEL_KERNEL_NS k_avx512
#include "gumbel/gumbel_kernel.h"

namespace semisparse::gumbel {
namespace {

struct VAvx512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static F set1(float a) { return _mm512_set1_ps(a); }
  static I set1i(uint32_t a) { return _mm512_set1_epi32(int(a)); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static void store(float* p, F a) { _mm512_store_ps(p, a); }
  static I loadi(const uint32_t* p) { return _mm512_load_si512(p); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static F blend(M mk, F a, F b) { return _mm512_mask_blend_ps(mk, a, b); }
  static I blendi(M mk, I a, I b) { return _mm512_mask_blend_epi32(mk, a, b); }
  static I f2bits(F a) { return _mm512_castps_si512(a); }
  static F bits2f(I a) { return _mm512_castsi512_ps(a); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static I subi(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I andi(I a, I b) { return _mm512_and_si512(a, b); }
  static I ori(I a, I b) { return _mm512_or_si512(a, b); }
  static I xori(I a, I b) { return _mm512_xor_si512(a, b); }
  static I srli8(I a) { return _mm512_srli_epi32(a, 8); }
  static I srli23(I a) { return _mm512_srli_epi32(a, 23); }
  static I slli23(I a) { return _mm512_slli_epi32(a, 23); }
  static I srli(I a, int s) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(s)); }
  static F i2f(I a) { return _mm512_cvtepi32_ps(a); }
  static I round2i(F a) { return _mm512_cvtps_epi32(a); }
  static void mulhilo(I a, I mconst, I& hi, I& lo) {
    const __m512i ev = _mm512_mul_epu32(a, mconst);
    const __m512i od = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), mconst);
    // hi[2i] = ev[2i+1], hi[2i+1] = od[2i+1]; lo[2i] = ev[2i], lo[2i+1] = od[2i]
    hi = _mm512_mask_shuffle_epi32(od, 0x5555, ev, _MM_PERM_CDAB);
    lo = _mm512_mask_shuffle_epi32(ev, 0xAAAA, od, _MM_PERM_CDAB);
  }
  static void f16_run_to_f32(const uint16_t* s, float* d, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
    for (; i < n; ++i) d[i] = _cvtsh_ss(s[i]);
  }
  static void f32_run_to_f16(const float* s, uint16_t* d, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
  }
};

}  // namespace

void run_avx512(const Problem& p) { k_avx512::run_f32<k_avx512::X2<k_avx512::X2<VAvx512>>>(p); }  // 4 vectors (64 groups) per step (see X2)

}  // namespace semisparse::gumbel
