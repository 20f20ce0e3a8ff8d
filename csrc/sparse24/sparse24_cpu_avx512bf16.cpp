// AVX-512 BF16 kernels for bfloat16 y = x @ W^T, W 2:4 in the "cpu" layout. This
// translation unit alone is compiled with -mavx512f -mavx512bw -mavx512bf16; it is
// entered only when cpuid reports all three (common/cpu_features.cpp). Other dtypes run
// the AVX2 kernels. Both paths rest on one fact: a 2:4 group keeps exactly two weights,
// and vdpbf16ps multiplies pairs of bf16 and adds both products into one fp32 lane.
//
// M <= 16 (decode): one lane per group. Per block of 64 columns (16 groups, 32 kept
// weights) the 64 metadata bits become one 16-bit-lane permutation (vpermt2w) that
// gathers each group's two x entries from two 32-wide loads of bf16 x, next to the
// group's two weights. Per x row: 2 loads, 1 permute, 1 vdpbf16ps per 32 kept weights;
// x and W are read as bf16 with no conversion.
//
// M > 16: one lane per row of W (see gemm below).
//
// The products of two bf16 are exact in fp32; sums are rounded to nearest even
// (vdpbf16ps flushes denormals).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>

#include "common/parallel.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {
namespace {

struct FreeDeleter {
  void operator()(void* q) const { std::free(q); }
};

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

// ------------------------------------------------------------------ GEMM path
// Lanes are rows of W here, not rows of x. A group keeps one of 6 pairs (a, b) of its 4
// columns; for every row m of x and group g a table holds the 6 pairs
// (x[m][4g + a], x[m][4g + b]) as bf16 pairs (32 bytes with 2 unused). For 16 rows of W
// at group g, a zmm holds their kept weight pairs and one holds their pair indices: one
// vpermd turns the broadcast table row of (m, g) into each row's x pair, and one
// vdpbf16ps adds both products for the 16 rows. The micro-kernel covers 64 rows of W x 4
// rows of x (16 accumulators); the table row of (m, g) is loaded once for the 4 row
// blocks, and the decoded weights of a 32-group chunk (16 KiB, transposed with 16 x 16
// register transposes) stay in L1 while all rows of x pass. The fp32 result accumulates
// in y's layout (rows of x major), so each accumulator store is 16 consecutive outputs.
// (The same scheme for fp32, a vpermps per kept position and an FMA per kept weight,
// measured slower than the AVX2 GEMM.)
constexpr int kPairs = 6;
// code (idx0 | idx1 << 2) -> pair index; codes with idx0 >= idx1 never come out of
// compress and are not a valid layout (they read pair 0).
constexpr int8_t kPairOfCode[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0};
constexpr int kPairA[kPairs] = {0, 0, 0, 1, 1, 2};
constexpr int kPairB[kPairs] = {1, 2, 3, 2, 3, 3};
constexpr int64_t kGc = 32;   // groups per chunk
constexpr int64_t kSB = 64;   // rows of W per task (4 blocks of 16 lanes)
constexpr int kMQ = 4;        // rows of x per micro-tile

// r[i] <- column i of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15]
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
  }
}

// Pair indices of the 16 groups [g, g + 16) of a row (g even): its 8 metadata bytes,
// each byte's two codes in two lanes, mapped through kPairOfCode.
inline __m512i pair_index16(const uint8_t* mrow, int64_t g) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mrow + g / 2));
  const __m128i dup = _mm_shuffle_epi8(bytes, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7));
  __m512i c = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(dup),
                                _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4));
  c = _mm512_and_si512(c, _mm512_set1_epi32(15));
  const __m512i lut = _mm512_setr_epi32(kPairOfCode[0], kPairOfCode[1], kPairOfCode[2], kPairOfCode[3],
                                        kPairOfCode[4], kPairOfCode[5], kPairOfCode[6], kPairOfCode[7],
                                        kPairOfCode[8], kPairOfCode[9], kPairOfCode[10], kPairOfCode[11],
                                        kPairOfCode[12], kPairOfCode[13], kPairOfCode[14], kPairOfCode[15]);
  return _mm512_permutexvar_epi32(c, lut);
}

template <int MQ>
inline void rl_kernel(const uint32_t* const* trow, const __m512i* vt, const __m512i* it, int64_t gn,
                      float* const* crow, bool first) {
  __m512 acc[4][MQ];
  for (int b = 0; b < 4; ++b)
    for (int i = 0; i < MQ; ++i) acc[b][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(crow[i] + 16 * b);
  for (int64_t g = 0; g < gn; ++g) {
    __m512i x6[MQ];
    for (int i = 0; i < MQ; ++i)
      x6[i] = _mm512_broadcast_i64x4(_mm256_load_si256(reinterpret_cast<const __m256i*>(trow[i] + 8 * g)));
    for (int b = 0; b < 4; ++b) {
      const __m512i v = _mm512_load_si512(vt + b * kGc + g);
      const __m512i ix = _mm512_load_si512(it + b * kGc + g);
      for (int i = 0; i < MQ; ++i)
        acc[b][i] = _mm512_dpbf16_ps(acc[b][i], (__m512bh)v, (__m512bh)_mm512_permutexvar_epi32(ix, x6[i]));
    }
  }
  for (int b = 0; b < 4; ++b)
    for (int i = 0; i < MQ; ++i) _mm512_storeu_ps(crow[i] + 16 * b, acc[b][i]);
}

void gemm(const LinearProblem& p) {
  const int64_t M = p.M, N = p.N, K = p.K, G = K / 4;
  const int64_t Npad = (N + kSB - 1) / kSB * kSB;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  auto alloc = [](size_t bytes) {
    void* q = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!q) throw std::bad_alloc();
    return q;
  };
  // pair table [M][G][8] (+ one zero row for the padding rows of the last micro-tile)
  std::unique_ptr<uint32_t[], FreeDeleter> table(static_cast<uint32_t*>(alloc(static_cast<size_t>(M * G + G) * 32)));
  std::unique_ptr<float[], FreeDeleter> cbuf(static_cast<float*>(alloc(static_cast<size_t>(M * Npad) * 4)));
  std::unique_ptr<float[], FreeDeleter> cpad(static_cast<float*>(alloc(static_cast<size_t>(Npad) * 4)));
  uint32_t* zero_row = table.get() + M * G * 8;
  std::memset(zero_row, 0, static_cast<size_t>(G) * 32);
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t g = 0; g < G; ++g) {
        uint16_t q[4];
        std::memcpy(q, x + m * K + 4 * g, 8);
        uint32_t* t = table.get() + (m * G + g) * 8;
        for (int pr = 0; pr < kPairs; ++pr)
          t[pr] = static_cast<uint32_t>(q[kPairA[pr]]) | static_cast<uint32_t>(q[kPairB[pr]]) << 16;
        t[6] = t[7] = 0;
      }
  });

  const uint32_t* vals = static_cast<const uint32_t*>(p.values);  // one kept pair per group
  const int64_t nsb = Npad / kSB;
  for (int64_t gc = 0; gc < G; gc += kGc) {
    const int64_t gn = std::min(kGc, G - gc);
    parallel_for(0, nsb, 1, [&](int64_t s0, int64_t s1) {
      alignas(64) __m512i vt[4 * kGc], it[4 * kGc];
      for (int64_t sb = s0; sb < s1; ++sb) {
        const int64_t n0 = sb * kSB;
        // The 64 rows are read 128 bytes at a time, far apart: fetch the next block's
        // slice of every row now, so it arrives while this block is computed.
        if (sb + 1 < s1)
          for (int64_t r = 0; r < kSB && n0 + kSB + r < N; ++r) {
            const char* nv = reinterpret_cast<const char*>(vals + (n0 + kSB + r) * (K / 4) + gc);
            for (int64_t o = 0; o < gn * 4; o += 64) _mm_prefetch(nv + o, _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(p.meta + (n0 + kSB + r) * p.meta_cols + gc / 2), _MM_HINT_T1);
          }
        // decode rows [n0, n0 + 64) x groups [gc, gc + gn): lane r % 16 of block r / 16
        uint32_t* vv = reinterpret_cast<uint32_t*>(vt);
        int32_t* ii = reinterpret_cast<int32_t*>(it);
        if (gn == kGc && n0 + kSB <= N) {
          // whole tile: 16 x 16 transposes of rows' values and pair indices
          for (int b = 0; b < 4; ++b)
            for (int h = 0; h < kGc / 16; ++h) {
              __m512i q[16];
              for (int r = 0; r < 16; ++r)
                q[r] = _mm512_loadu_si512(vals + (n0 + 16 * b + r) * (K / 4) + gc + 16 * h);
              transpose16(q);
              for (int g = 0; g < 16; ++g) _mm512_store_si512(vt + b * kGc + 16 * h + g, q[g]);
              for (int r = 0; r < 16; ++r)
                q[r] = pair_index16(p.meta + (n0 + 16 * b + r) * p.meta_cols, gc + 16 * h);
              transpose16(q);
              for (int g = 0; g < 16; ++g) _mm512_store_si512(it + b * kGc + 16 * h + g, q[g]);
            }
        } else
        for (int64_t r = 0; r < kSB; ++r) {
          const int64_t n = n0 + r, b = r / 16, lane = r % 16;
          if (n < N) {
            const uint32_t* vr = vals + n * (K / 4) + gc;
            const uint8_t* mrow = p.meta + n * p.meta_cols;
            for (int64_t g = 0; g < gn; ++g) {
              const int64_t gg = gc + g;
              vv[(b * kGc + g) * 16 + lane] = vr[g];
              ii[(b * kGc + g) * 16 + lane] = kPairOfCode[(mrow[gg >> 1] >> (4 * (gg & 1))) & 15];
            }
          } else {
            for (int64_t g = 0; g < gn; ++g) vv[(b * kGc + g) * 16 + lane] = ii[(b * kGc + g) * 16 + lane] = 0;
          }
        }
        for (int64_t m0 = 0; m0 < M; m0 += kMQ) {
          const uint32_t* trow[kMQ];
          float* crow[kMQ];
          for (int i = 0; i < kMQ; ++i) {
            const bool ok = m0 + i < M;
            trow[i] = ok ? table.get() + ((m0 + i) * G + gc) * 8 : zero_row;
            crow[i] = ok ? cbuf.get() + (m0 + i) * Npad + n0 : cpad.get() + n0;
          }
          rl_kernel<kMQ>(trow, vt, it, gn, crow, gc == 0);
        }
      }
    });
  }
  // y = bf16(C + bias)
  parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* c = cbuf.get() + m * Npad;
      for (int64_t n = 0; n < N; ++n)
        store_from_f32(p.y, m * N + n, p.dtype, c[n] + (p.bias ? load_as_f32(p.bias, n, p.dtype) : 0.0f));
    }
  });
}

}  // namespace

int64_t bf16_gemv_max_m = 16;

bool tune_avx512bf16(const char* key, int64_t value) {
  if (std::strcmp(key, "bf16_gemv_max_m") == 0) {
    bf16_gemv_max_m = value;
    return true;
  }
  return false;
}

bool linear_avx512bf16(const LinearProblem& p) {
  if (p.dtype != DType::BF16) return false;
  if (p.M > bf16_gemv_max_m) {
    gemm(p);
    return true;
  }
  // Rows split evenly over the threads; small problems stay on one thread.
  const int64_t per_row = std::max<int64_t>(1, p.K / 2 * p.M);
  const int64_t grain = std::max<int64_t>((int64_t(1) << 15) / per_row + 1,
                                          p.N / (8 * std::max(1, num_threads())));
  parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) { gemv_rows(p, n0, n1); });
  return true;
}

}  // namespace semisparse::sparse24
