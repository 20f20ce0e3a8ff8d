// AVX2 + FMA (+ F16C) kernels for y = x @ W^T with W 2:4-sparse in the "cpu" layout.
// This translation unit alone is compiled with -mavx2 -mfma -mf16c; it is entered only
// when cpuid reports those features (common/cpu_features.cpp).
//
// Two paths, both accumulating in fp32:
//  * M <= kGemvMaxM (decode sizes, memory bound): each output row streams its values and
//    metadata once; every block of 8 kept values (16 columns) turns its 16 metadata bits
//    into a permutation that gathers the matching 8 entries of x from two 8-wide loads.
//  * larger M (compute bound): x is packed once into fp32 panels of 24 rows (8 or 16 for the last),
//    transposed (panel[k][0..W)), so one kept weight w at column k contributes
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

constexpr int64_t kGemvMaxM = 4;
constexpr int64_t kKC = 192;  // K chunk (columns); multiple of 16. 192 x 24 fp32 = 18 KiB of L1
constexpr int64_t kNB = 64;   // output rows per task in the GEMM path

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
template <int MM>
void gemv_rows(const LinearProblem& p, const float* xf, int64_t n0, int64_t n1) {
  const int64_t K = p.K, H = K / 2, blocks = K / 16, groups = K / 4;
  const int es = dtype_size(p.dtype);
  for (int64_t n = n0; n < n1; ++n) {
    const char* vrow = static_cast<const char*>(p.values) + n * H * es;
    const uint8_t* mrow = p.meta + n * p.meta_cols;
    __m256 acc[MM];
    for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(vrow + (8 * b + 256) * es, _MM_HINT_T0);
      const __m256i perm = perm_from_meta(meta16(mrow, b));
      const __m256 v = load8(vrow + 8 * b * es, p.dtype);
      for (int i = 0; i < MM; ++i) {
        const float* xr = xf + i * K + 16 * b;
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
        s += load_as_f32(p.values, n * H + 2 * g, p.dtype) * xf[i * K + 4 * g + (c & 3)];
        s += load_as_f32(p.values, n * H + 2 * g + 1, p.dtype) * xf[i * K + 4 * g + (c >> 2)];
      }
      store_from_f32(p.y, i * p.N + n, p.dtype, s + bias);
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
  parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    switch (p.M) {
      case 1: gemv_rows<1>(p, xf, n0, n1); break;
      case 2: gemv_rows<2>(p, xf, n0, n1); break;
      case 3: gemv_rows<3>(p, xf, n0, n1); break;
      default: gemv_rows<4>(p, xf, n0, n1); break;
    }
  });
}

// ------------------------------------------------------------------ GEMM path
struct Panel {
  int64_t m0;     // first row of x in this panel
  int64_t rows;   // valid rows (<= width)
  int width;      // 8 or 16
  float* data;    // [K][width]
};

// acc[r][v] (+)= sum_j val[r][j] * xp[col[r][j]][8v .. 8v+8), for NR rows of W.
// With one 8-wide vector per row (MV == 1) the j loop is split over two accumulator
// sets so that enough FMAs are in flight to hide their latency.
template <int MV, int NR>
inline void ukernel(const float* xp, const float* val, const int32_t* col, int64_t J, float* c,
                    int64_t ldc, bool first) {
  constexpr int W = 8 * MV;
  constexpr int U = MV == 1 ? 2 : 1;
  __m256 acc[U][NR][MV];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NR; ++r)
      for (int v = 0; v < MV; ++v)
        acc[u][r][v] = (first || u > 0) ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8 * v);
  int64_t j = 0;
  for (; j + U <= J; j += U) {
    for (int u = 0; u < U; ++u) {
      for (int r = 0; r < NR; ++r) {
        const __m256 w = _mm256_broadcast_ss(val + r * J + j + u);
        const float* xr = xp + static_cast<int64_t>(col[r * J + j + u]) * W;
        for (int v = 0; v < MV; ++v)
          acc[u][r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[u][r][v]);
      }
    }
  }
  for (; j < J; ++j) {
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_broadcast_ss(val + r * J + j);
      const float* xr = xp + static_cast<int64_t>(col[r * J + j]) * W;
      for (int v = 0; v < MV; ++v) acc[0][r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[0][r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) {
      __m256 a = acc[0][r][v];
      if constexpr (U == 2) a = _mm256_add_ps(a, acc[1][r][v]);
      _mm256_storeu_ps(c + r * ldc + 8 * v, a);
    }
}

template <int MV>
void panel_rows(const float* xp, const float* val, const int32_t* col, int64_t J, int64_t rows,
                float* c, int64_t ldc, bool first) {
  constexpr int NR = 4;
  int64_t r = 0;
  for (; r + NR <= rows; r += NR)
    ukernel<MV, NR>(xp, val + r * J, col + r * J, J, c + r * ldc, ldc, first);
  for (; r < rows; ++r) ukernel<MV, 1>(xp, val + r * J, col + r * J, J, c + r * ldc, ldc, first);
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

  const int64_t nblocks = (N + kNB - 1) / kNB;
  parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t JC = kKC / 2;
    Buffer<float> val = scratch<float>(kNB * JC);
    Buffer<int32_t> col = scratch<int32_t>(kNB * JC);
    Buffer<float> cbuf = scratch<float>(kNB * Mpad);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kNB, rows = std::min(kNB, N - n0);
      for (int64_t kc = 0; kc < K; kc += kKC) {
        const int64_t kl = std::min(kKC, K - kc), J = kl / 2;
        // Decode rows [n0, n0 + rows), columns [kc, kc + kl): fp32 values and column
        // indices local to the chunk.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = n0 + r;
          const char* vrow = static_cast<const char*>(p.values) + (n * H + kc / 2) * es;
          const uint8_t* mrow = p.meta + n * p.meta_cols;
          float* vd = val.get() + r * J;
          int32_t* cd = col.get() + r * J;
          int64_t j = 0;
          const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
          const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
          for (; j + 8 <= J; j += 8) {
            _mm256_storeu_ps(vd + j, load8(vrow + j * es, p.dtype));
            const uint32_t bits = meta16(mrow, (kc + 2 * j) / 16);
            __m256i c = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(bits)), shifts);
            c = _mm256_add_epi32(_mm256_and_si256(c, _mm256_set1_epi32(3)),
                                 _mm256_add_epi32(base, _mm256_set1_epi32(static_cast<int>(2 * j))));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(cd + j), c);
          }
          for (; j < J; j += 2) {
            const int64_t g = (kc + 2 * j) / 4;
            const int code = code_of(mrow, g);
            vd[j] = load_as_f32(vrow, j, p.dtype);
            vd[j + 1] = load_as_f32(vrow, j + 1, p.dtype);
            cd[j] = static_cast<int32_t>(2 * j + (code & 3));
            cd[j + 1] = static_cast<int32_t>(2 * j + (code >> 2));
          }
        }
        int64_t mo = 0;
        for (const Panel& pn : panels) {
          const float* xpk = pn.data + kc * pn.width;
          float* cb = cbuf.get() + mo;
          if (pn.width == 24)
            panel_rows<3>(xpk, val.get(), col.get(), J, rows, cb, Mpad, kc == 0);
          else if (pn.width == 16)
            panel_rows<2>(xpk, val.get(), col.get(), J, rows, cb, Mpad, kc == 0);
          else
            panel_rows<1>(xpk, val.get(), col.get(), J, rows, cb, Mpad, kc == 0);
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

void linear_avx2(const LinearProblem& p) {
  if (p.M <= kGemvMaxM)
    gemv(p);
  else
    gemm(p);
}

}  // namespace semisparse::sparse24
