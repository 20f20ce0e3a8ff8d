// AVX2 + FMA (+ F16C) kernels for y = x @ W^T with W 2:4-sparse in the "cpu" layout.
// This translation unit alone is compiled with -mavx2 -mfma -mf16c; it is entered only
// when cpuid reports those features (common/cpu_features.cpp).
//
// Two paths, both accumulating in fp32:
//  * M <= kGemvMaxM (decode sizes, memory bound): each output row streams its values and
//    metadata once; every block of 8 kept values (16 columns) turns its 16 metadata bits
//    into a permutation that gathers the matching 8 entries of x from two 8-wide loads.
//  * larger M (compute bound): x is packed once into fp32 panels of 24 rows (8 or 16 for
//    the last), transposed (panel[k][0..W)), so one kept weight w at column k contributes
//    w * panel[k][:] to W accumulator lanes: a broadcast and one FMA per 8 MACs, with no
//    multiply by a pruned zero. Weights are decoded per (row block, K chunk) into fp32
//    values and column indices and reused across all panels; the K chunk keeps a panel's
//    slice (KC x W floats) in L1.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <new>
#include <vector>

#include "common/parallel.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {
namespace {

// Largest M for the GEMV path: settable through tune_avx2 for A/B runs of the
// microbenchmark (not meant to change while a kernel runs); 8 measured best on the 2-core
// Zen 4 of docs/BENCHMARKS.md.
int64_t kGemvMaxM = 8;

constexpr int64_t kKC = 192;  // K chunk (columns); multiple of 16. 192 x 24 fp32 = 18 KiB of L1
constexpr int64_t kNB = 64;   // output rows per task in the GEMM path
constexpr int64_t kSmallMpad = 32;  // up to this many (padded) rows of x: blocks of kNBSmall
constexpr int64_t kNBSmall = 16;

struct FreeDeleter {
  void operator()(void* q) const { std::free(q); }
};
template <class T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;
// 64-byte aligned, uninitialised scratch
template <class T>
Buffer<T> scratch(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  void* q = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
  if (q == nullptr) throw std::bad_alloc();
  return Buffer<T>(static_cast<T*>(q));
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 8 values of type t at p -> fp32
inline __m256 load8(const void* p, DType t) {
  switch (t) {
    case DType::F32: return _mm256_loadu_ps(static_cast<const float*>(p));
    case DType::BF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))), 16));
    default: return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
  }
}

// Lane j of the result = position of kept value j of a 16-column block inside the
// 8-wide half it lives in: 4 * ((j / 2) & 1) + ((bits >> 2j) & 3).
inline __m256i perm_from_meta(uint32_t bits16) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  __m256i b = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits16)), shifts);
  return _mm256_add_epi32(_mm256_and_si256(b, _mm256_set1_epi32(3)), base);
}

inline uint32_t meta16(const uint8_t* m, int64_t block) {
  uint16_t v;
  std::memcpy(&v, m + 2 * block, 2);
  return v;
}

inline int code_of(const uint8_t* m, int64_t g) { return (m[g >> 1] >> (4 * (g & 1))) & 15; }

// x (any dtype) rows [0, M) -> fp32 contiguous
Buffer<float> to_f32(const LinearProblem& p) {
  const int64_t n = p.M * p.K;
  Buffer<float> buf = scratch<float>(n);
  parallel_for(0, (n + 7) / 8, 2048, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t o = 8 * i;
      if (o + 8 <= n) {
        _mm256_storeu_ps(buf.get() + o,
                         load8(static_cast<const char*>(p.x) + o * dtype_size(p.dtype), p.dtype));
      } else {
        for (int64_t k = o; k < n; ++k) buf[k] = load_as_f32(p.x, k, p.dtype);
      }
    }
  });
  return buf;
}

// ------------------------------------------------------------------ GEMV path
// Output row n for x rows [m0, m0 + MM).
template <int MM>
inline void gemv_row(const LinearProblem& p, const float* xf, int64_t n, int64_t m0) {
  const int64_t K = p.K, H = K / 2, blocks = K / 16, groups = K / 4;
  const int es = dtype_size(p.dtype);
  const char* vrow = static_cast<const char*>(p.values) + n * H * es;
  const uint8_t* mrow = p.meta + n * p.meta_cols;
  const float* x0 = xf + m0 * K;
  __m256 acc[MM];
  for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    _mm_prefetch(vrow + (8 * b + 256) * es, _MM_HINT_T0);
    const __m256i perm = perm_from_meta(meta16(mrow, b));
    const __m256 v = load8(vrow + 8 * b * es, p.dtype);
    for (int i = 0; i < MM; ++i) {
      const float* xr = x0 + i * K + 16 * b;
      const __m256 ga = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), perm);
      const __m256 gb = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), perm);
      acc[i] = _mm256_fmadd_ps(v, _mm256_blend_ps(ga, gb, 0xF0), acc[i]);
    }
  }
  const float bias = p.bias ? load_as_f32(p.bias, n, p.dtype) : 0.0f;
  for (int i = 0; i < MM; ++i) {
    float s = hsum(acc[i]);
    for (int64_t g = 4 * blocks; g < groups; ++g) {  // K % 16 tail
      const int c = code_of(mrow, g);
      s += load_as_f32(p.values, n * H + 2 * g, p.dtype) * x0[i * K + 4 * g + (c & 3)];
      s += load_as_f32(p.values, n * H + 2 * g + 1, p.dtype) * x0[i * K + 4 * g + (c >> 2)];
    }
    store_from_f32(p.y, (m0 + i) * p.N + n, p.dtype, s + bias);
  }
}

void gemv_rows(const LinearProblem& p, const float* xf, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    // rows of x in groups of up to 8; the weight row stays in L1 between groups
    for (int64_t m0 = 0; m0 < p.M; m0 += 8) {
      switch (std::min<int64_t>(8, p.M - m0)) {
        case 1: gemv_row<1>(p, xf, n, m0); break;
        case 2: gemv_row<2>(p, xf, n, m0); break;
        case 3: gemv_row<3>(p, xf, n, m0); break;
        case 4: gemv_row<4>(p, xf, n, m0); break;
        case 5: gemv_row<5>(p, xf, n, m0); break;
        case 6: gemv_row<6>(p, xf, n, m0); break;
        case 7: gemv_row<7>(p, xf, n, m0); break;
        default: gemv_row<8>(p, xf, n, m0); break;
      }
    }
  }
}

void gemv(const LinearProblem& p) {
  Buffer<float> xbuf;
  const float* xf = static_cast<const float*>(p.x);
  if (p.dtype != DType::F32) {
    xbuf = to_f32(p);
    xf = xbuf.get();
  }
  // Rows split evenly over the threads: the work is a stream over the weights.
  const int64_t grain = std::max<int64_t>(16, p.N / (8 * std::max(1, num_threads())));
  parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) { gemv_rows(p, xf, n0, n1); });
}

// ------------------------------------------------------------------ GEMM path
struct Panel {
  int64_t m0;     // first row of x in this panel
  int64_t rows;   // valid rows (<= width)
  int width;      // 8 or 16
  float* data;    // [K][width]
};

// acc[r][v] (+)= sum_j val[r][j] * xp[col[r][j]][8v .. 8v+8), for NR rows of W.
// Per kept weight: a column-index load, a broadcast and MV fused multiply-adds whose
// second operand comes straight from the L1-resident panel row.
template <int MV, int NR>
inline void ukernel(const float* xp, const float* val, const int32_t* col, int64_t ld, int64_t J,
                    float* c, int64_t ldc, bool first) {
  constexpr int W = 8 * MV;
  __m256 acc[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) acc[r][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8 * v);
  for (int64_t j = 0; j < J; ++j) {
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(val + r * ld + j);
      const float* xr = xp + static_cast<int64_t>(col[r * ld + j]) * W;
      for (int v = 0; v < MV; ++v) acc[r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

template <int MV>
void panel_rows(const float* xp, const float* val, const int32_t* col, int64_t ld, int64_t J,
                int64_t rows, float* c, int64_t ldc, bool first) {
  constexpr int NR = 4;
  int64_t r = 0;
  for (; r + NR <= rows; r += NR)
    ukernel<MV, NR>(xp, val + r * ld, col + r * ld, ld, J, c + r * ldc, ldc, first);
  for (; r < rows; ++r) ukernel<MV, 1>(xp, val + r * ld, col + r * ld, ld, J, c + r * ldc, ldc, first);
}

// Decode columns [c0, c1) of row n (c0 a multiple of 16): fp32 values to vd[0..), their
// column indices minus col_base to cd[0..).

inline void decode_row(const LinearProblem& p, int64_t n, int64_t c0, int64_t c1, int64_t col_base,
                       float* vd, int32_t* cd) {
  const int es = dtype_size(p.dtype);
  const int64_t J = (c1 - c0) / 2;
  const char* vrow = static_cast<const char*>(p.values) + (n * (p.K / 2) + c0 / 2) * es;
  const uint8_t* mrow = p.meta + n * p.meta_cols;
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i three = _mm256_set1_epi32(3);
  int64_t j = 0;
  for (; j + 8 <= J; j += 8) {
    _mm_prefetch(vrow + (j + 128) * es, _MM_HINT_T0);
    _mm256_storeu_ps(vd + j, load8(vrow + j * es, p.dtype));
    const uint32_t bits = meta16(mrow, (c0 + 2 * j) / 16);
    __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shifts);
    c = _mm256_add_epi32(_mm256_and_si256(c, three),
                         _mm256_add_epi32(base, _mm256_set1_epi32(static_cast<int>(c0 + 2 * j - col_base))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cd + j), c);
  }
  for (; j < J; j += 2) {  // K % 16 tail
    const int64_t g = (c0 + 2 * j) / 4;
    const int code = code_of(mrow, g);
    vd[j] = load_as_f32(vrow, j, p.dtype);
    vd[j + 1] = load_as_f32(vrow, j + 1, p.dtype);
    cd[j] = static_cast<int32_t>(4 * g + (code & 3) - col_base);
    cd[j + 1] = static_cast<int32_t>(4 * g + (code >> 2) - col_base);
  }
}

void gemm(const LinearProblem& p) {
  const int64_t M = p.M, N = p.N, K = p.K, H = K / 2;
  const int es = dtype_size(p.dtype);

  // Panels of 24 rows; the last one 8 or 16 wide when that covers what remains.
  std::vector<Panel> panels;
  int64_t total = 0;
  for (int64_t m0 = 0; m0 < M;) {
    const int64_t left = M - m0;
    const int w = left <= 8 ? 8 : left <= 16 ? 16 : 24;
    const int64_t rows = std::min<int64_t>(left, w);
    panels.push_back({m0, rows, w, nullptr});
    total += K * w;
    m0 += rows;
  }
  Buffer<float> xp = scratch<float>(total);
  int64_t off = 0;
  for (auto& pn : panels) {
    pn.data = xp.get() + off;
    off += K * pn.width;
  }
  int64_t Mpad = 0;
  for (auto& pn : panels) Mpad += pn.width;

  // Pack: panel[k][i] = x[m0 + i][k] (zero for padding rows).
  parallel_for(0, static_cast<int64_t>(panels.size()) * ((K + 63) / 64), 1, [&](int64_t a, int64_t b) {
    const int64_t kb_count = (K + 63) / 64;
    for (int64_t t = a; t < b; ++t) {
      const Panel& pn = panels[t / kb_count];
      const int64_t k0 = (t % kb_count) * 64, k1 = std::min(K, k0 + 64);
      for (int64_t k = k0; k < k1; ++k) {
        float* dst = pn.data + k * pn.width;
        for (int i = 0; i < pn.width; ++i)
          dst[i] = i < pn.rows ? load_as_f32(p.x, (pn.m0 + i) * K + k, p.dtype) : 0.0f;
      }
    }
  });

  // Weights are decoded per (block of NB rows, K chunk) and reused across all panels;
  // the next chunk of every row of the block is prefetched while this one is computed.
  // With one or two panels there is little compute to hide memory behind, so the block
  // is smaller: fewer concurrent row streams, and the decoded chunk stays in L1.
  const int64_t NB = Mpad <= kSmallMpad ? kNBSmall : kNB;
  const int64_t ld = kKC / 2;
  const int64_t nblocks = (N + NB - 1) / NB;
  parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Buffer<float> val = scratch<float>(NB * ld);
    Buffer<int32_t> col = scratch<int32_t>(NB * ld);
    Buffer<float> cbuf = scratch<float>(NB * Mpad);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * NB, rows = std::min(NB, N - n0);
      for (int64_t kc = 0; kc < K; kc += kKC) {
        const int64_t kl = std::min(kKC, K - kc), J = kl / 2;
        // The rows of a block are read chunk by chunk, short strided streams that the
        // hardware prefetchers do not follow: fetch the next chunk of every row now.
        if (kc + kKC < K) {
          const int64_t nkl = std::min(kKC, K - kc - kKC);
          for (int64_t r = 0; r < rows; ++r) {
            const char* nv = static_cast<const char*>(p.values) + ((n0 + r) * H + (kc + kKC) / 2) * es;
            for (int64_t b = 0; b < nkl / 2 * es; b += 64) _mm_prefetch(nv + b, _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(p.meta + (n0 + r) * p.meta_cols + (kc + kKC) / 8),
                         _MM_HINT_T1);
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          decode_row(p, n0 + r, kc, kc + kl, kc, val.get() + r * ld, col.get() + r * ld);
        const float* vc = val.get();
        const int32_t* cc = col.get();
        int64_t mo = 0;
        for (const Panel& pn : panels) {
          const float* xpk = pn.data + kc * pn.width;
          float* cb = cbuf.get() + mo;
          if (pn.width == 24)
            panel_rows<3>(xpk, vc, cc, ld, J, rows, cb, Mpad, kc == 0);
          else if (pn.width == 16)
            panel_rows<2>(xpk, vc, cc, ld, J, rows, cb, Mpad, kc == 0);
          else
            panel_rows<1>(xpk, vc, cc, ld, J, rows, cb, Mpad, kc == 0);
          mo += pn.width;
        }
      }
      // Write out: y[m][n0 + r] = cbuf[r][m'] + bias
      int64_t mo = 0;
      for (const Panel& pn : panels) {
        for (int64_t i = 0; i < pn.rows; ++i) {
          const int64_t m = pn.m0 + i;
          for (int64_t r = 0; r < rows; ++r) {
            float s = cbuf[r * Mpad + mo + i];
            if (p.bias) s += load_as_f32(p.bias, n0 + r, p.dtype);
            store_from_f32(p.y, m * N + n0 + r, p.dtype, s);
          }
        }
        mo += pn.width;
      }
    }
  });
}

}  // namespace

bool tune_avx2(const char* key, int64_t value) {
  if (std::strcmp(key, "gemv_max_m") == 0) { kGemvMaxM = value; return true; }
  return false;
}

void linear_avx2(const LinearProblem& p) {
  if (p.M <= kGemvMaxM)
    gemv(p);
  else
    gemm(p);
}

}  // namespace semisparse::sparse24
