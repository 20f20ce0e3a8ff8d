// AVX-512 BF16 kernel for bfloat16 at decode sizes (small M) of y = x @ W^T, W 2:4 in
// the "cpu" layout. This translation unit alone is compiled with -mavx512f -mavx512bw
// -mavx512bf16; it is entered only when cpuid reports all three (common/cpu_features.cpp).
// Other dtypes and larger M run the AVX2 kernels.
//
// A 2:4 group keeps exactly two weights, and vdpbf16ps multiplies pairs of bf16 and adds
// both products into one fp32 lane: one lane per group. Per block of 64 columns (16
// groups, 32 kept weights) the 64 metadata bits become one 16-bit-lane permutation
// (vpermt2w) that gathers each group's two x entries from two 32-wide loads of bf16 x,
// next to the group's two weights. Per x row: 2 loads, 1 permute, 1 vdpbf16ps per 32
// kept weights; x and W are read as bf16 with no conversion. The products of two bf16
// are exact in fp32; sums are rounded to nearest even (vdpbf16ps flushes denormals).
#include <immintrin.h>

#include <algorithm>

#include "common/parallel.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {
namespace {

inline int code_of(const uint8_t* m, int64_t g) { return (m[g >> 1] >> (4 * (g & 1))) & 15; }

// 16-bit lane j (kept value j of a 64-column block, group j/2): the position of its
// x entry among the block's 64 columns, 4 * (j / 2) + ((bits >> 2j) & 3).
inline __m512i gather_index(uint64_t bits) {
  // lane j holds metadata word j / 8 (8 kept values, 16 bits each)
  const __m512i word_of_lane = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                                1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i shifts = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0,
                                          14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi16(60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32,
                                        28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  __m512i w = _mm512_permutexvar_epi16(word_of_lane, _mm512_set1_epi64(static_cast<long long>(bits)));
  w = _mm512_and_si512(_mm512_srlv_epi16(w, shifts), _mm512_set1_epi16(3));
  return _mm512_add_epi16(w, base);
}

// Output row n for x rows [m0, m0 + MM).
template <int MM>
inline void gemv_row(const LinearProblem& p, int64_t n, int64_t m0) {
  const int64_t K = p.K, H = K / 2, blocks = K / 64, groups = K / 4;
  const uint16_t* vrow = static_cast<const uint16_t*>(p.values) + n * H;
  const uint8_t* mrow = p.meta + n * p.meta_cols;
  const uint16_t* x0 = static_cast<const uint16_t*>(p.x) + m0 * K;
  __m512 acc[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    _mm_prefetch(reinterpret_cast<const char*>(vrow + 32 * b + 512), _MM_HINT_T0);
    uint64_t bits;
    std::memcpy(&bits, mrow + 8 * b, 8);
    const __m512i idx = gather_index(bits);
    const __m512bh v = (__m512bh)_mm512_loadu_si512(vrow + 32 * b);
    for (int i = 0; i < MM; ++i) {
      const uint16_t* xr = x0 + i * K + 64 * b;
      const __m512i g = _mm512_permutex2var_epi16(_mm512_loadu_si512(xr), idx, _mm512_loadu_si512(xr + 32));
      acc[i] = _mm512_dpbf16_ps(acc[i], v, (__m512bh)g);
    }
  }
  const float bias = p.bias ? load_as_f32(p.bias, n, p.dtype) : 0.0f;
  for (int i = 0; i < MM; ++i) {
    float s = _mm512_reduce_add_ps(acc[i]);
    for (int64_t g = 16 * blocks; g < groups; ++g) {  // K % 64 tail
      const int c = code_of(mrow, g);
      const uint16_t* xr = x0 + i * K + 4 * g;
      s += bf16_to_f32(vrow[2 * g]) * bf16_to_f32(xr[c & 3]);
      s += bf16_to_f32(vrow[2 * g + 1]) * bf16_to_f32(xr[c >> 2]);
    }
    store_from_f32(p.y, (m0 + i) * p.N + n, p.dtype, s + bias);
  }
}

void gemv_rows(const LinearProblem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m0 = 0; m0 < p.M; m0 += 8) {
      switch (std::min<int64_t>(8, p.M - m0)) {
        case 1: gemv_row<1>(p, n, m0); break;
        case 2: gemv_row<2>(p, n, m0); break;
        case 3: gemv_row<3>(p, n, m0); break;
        case 4: gemv_row<4>(p, n, m0); break;
        case 5: gemv_row<5>(p, n, m0); break;
        case 6: gemv_row<6>(p, n, m0); break;
        case 7: gemv_row<7>(p, n, m0); break;
        default: gemv_row<8>(p, n, m0); break;
      }
    }
  }
}

}  // namespace

int64_t bf16_gemv_max_m = 24;

bool tune_avx512bf16(const char* key, int64_t value) {
  if (std::strcmp(key, "bf16_gemv_max_m") == 0) {
    bf16_gemv_max_m = value;
    return true;
  }
  return false;
}

bool linear_avx512bf16(const LinearProblem& p) {
  if (p.dtype != DType::BF16 || p.M > bf16_gemv_max_m) return false;
  // Rows split evenly over the threads; small problems stay on one thread.
  const int64_t per_row = std::max<int64_t>(1, p.K / 2 * p.M);
  const int64_t grain = std::max<int64_t>((int64_t(1) << 15) / per_row + 1,
                                          p.N / (8 * std::max(1, num_threads())));
  parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) { gemv_rows(p, n0, n1); });
  return true;
}

}  // namespace semisparse::sparse24
