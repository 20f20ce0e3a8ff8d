// Generic (portable C++) 2:4 CPU kernels: compress, decompress, and the linear
// fallback used when no SIMD path is available. Written so that GCC/Clang vectorize
// the inner loops for the baseline ISA (SSE2 on x86-64, NEON on AArch64).
#include <memory>
#include <type_traits>
#include <vector>

#include <torch/headeronly/util/Half.h>

#include "common/cpu_features.h"
#include "common/parallel.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {

float f16_to_f32(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
uint16_t f32_to_f16(float f) { return c10::Half(f).x; }

namespace {

template <class T>
inline bool is_nonzero(T v);
template <>
inline bool is_nonzero<uint32_t>(uint32_t v) { return (v & 0x7fffffffu) != 0; }
template <>
inline bool is_nonzero<uint64_t>(uint64_t v) { return (v & 0x7fffffffffffffffull) != 0; }
template <>
inline bool is_nonzero<uint16_t>(uint16_t v) { return (v & 0x7fffu) != 0; }

// Works on the raw bits: every supported type has its sign in the top bit, so
// "zero of either sign" is "all other bits zero", and copies are exact.
template <class T>
void compress_rows(const T* dense, T* values, uint8_t* meta, int64_t r0, int64_t r1, int64_t K,
                   int64_t meta_cols) {
  const int64_t groups = K / 4;
  for (int64_t r = r0; r < r1; ++r) {
    const T* w = dense + r * K;
    T* v = values + r * (K / 2);
    uint8_t* m = meta + r * meta_cols;
    std::memset(m, 0, static_cast<size_t>(meta_cols));
    for (int64_t g = 0; g < groups; ++g) {
      const T* q = w + 4 * g;
      const int mask = int(is_nonzero(q[0])) | int(is_nonzero(q[1])) << 1 |
                       int(is_nonzero(q[2])) << 2 | int(is_nonzero(q[3])) << 3;
      const uint8_t code = kCodeFromMask[mask];
      const T a = q[code & 3], b = q[code >> 2];
      v[2 * g] = is_nonzero(a) ? a : T(0);
      v[2 * g + 1] = is_nonzero(b) ? b : T(0);
      m[g >> 1] |= static_cast<uint8_t>(code << (4 * (g & 1)));
    }
  }
}

template <class T>
void decompress_rows(const T* values, const uint8_t* meta, T* dense, int64_t r0, int64_t r1,
                     int64_t K, int64_t meta_cols) {
  const int64_t groups = K / 4;
  for (int64_t r = r0; r < r1; ++r) {
    T* w = dense + r * K;
    const T* v = values + r * (K / 2);
    const uint8_t* m = meta + r * meta_cols;
    std::memset(w, 0, static_cast<size_t>(K) * sizeof(T));
    for (int64_t g = 0; g < groups; ++g) {
      const int code = (m[g >> 1] >> (4 * (g & 1))) & 15;
      w[4 * g + (code & 3)] = v[2 * g];
      w[4 * g + (code >> 2)] = v[2 * g + 1];
    }
  }
}

int64_t row_grain(int64_t bytes_per_row) {
  // about 64 KiB of work per task
  const int64_t g = (int64_t(1) << 16) / (bytes_per_row > 0 ? bytes_per_row : 1);
  return g < 1 ? 1 : g;
}

}  // namespace

void compress(const void* dense, void* values, uint8_t* meta, int64_t N, int64_t K,
              int64_t meta_cols, DType t) {
  parallel_for(0, N, row_grain(K * dtype_size(t)), [&](int64_t r0, int64_t r1) {
    if (t == DType::F64) {
      compress_rows(static_cast<const uint64_t*>(dense), static_cast<uint64_t*>(values), meta,
                    r0, r1, K, meta_cols);
    } else if (t == DType::F32) {
      compress_rows(static_cast<const uint32_t*>(dense), static_cast<uint32_t*>(values), meta,
                    r0, r1, K, meta_cols);
    } else {
      compress_rows(static_cast<const uint16_t*>(dense), static_cast<uint16_t*>(values), meta,
                    r0, r1, K, meta_cols);
    }
  });
}

void decompress(const void* values, const uint8_t* meta, void* dense, int64_t N, int64_t K,
                int64_t meta_cols, DType t) {
  parallel_for(0, N, row_grain(K * dtype_size(t)), [&](int64_t r0, int64_t r1) {
    if (t == DType::F64) {
      decompress_rows(static_cast<const uint64_t*>(values), meta, static_cast<uint64_t*>(dense),
                      r0, r1, K, meta_cols);
    } else if (t == DType::F32) {
      decompress_rows(static_cast<const uint32_t*>(values), meta, static_cast<uint32_t*>(dense),
                      r0, r1, K, meta_cols);
    } else {
      decompress_rows(static_cast<const uint16_t*>(values), meta, static_cast<uint16_t*>(dense),
                      r0, r1, K, meta_cols);
    }
  });
}

// Generic linear: x is converted to the accumulation type once; every output row of W
// is decoded once (kept column indices and values) and applied to all M rows of x.
// fp32 accumulation for fp32/bf16/fp16, fp64 for fp64.
template <class Acc>
void linear_generic_impl(const LinearProblem& p) {
  const int64_t M = p.M, N = p.N, K = p.K, H = K / 2;
  auto load = [&](const void* src, int64_t i) -> Acc {
    if constexpr (std::is_same_v<Acc, double>) return static_cast<const double*>(src)[i];
    else return load_as_f32(src, i, p.dtype);
  };
  auto store = [&](int64_t i, Acc v) {
    if constexpr (std::is_same_v<Acc, double>) static_cast<double*>(p.y)[i] = v;
    else store_from_f32(p.y, i, p.dtype, v);
  };
  std::vector<Acc> xbuf(static_cast<size_t>(M * K));
  parallel_for(0, M * K, 1 << 14, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) xbuf[i] = load(p.x, i);
  });
  const Acc* xf = xbuf.data();
  parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<Acc> val(static_cast<size_t>(H));
    std::vector<int32_t> col(static_cast<size_t>(H));
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* m = p.meta + n * p.meta_cols;
      for (int64_t g = 0; g < K / 4; ++g) {
        const int code = (m[g >> 1] >> (4 * (g & 1))) & 15;
        col[2 * g] = static_cast<int32_t>(4 * g + (code & 3));
        col[2 * g + 1] = static_cast<int32_t>(4 * g + (code >> 2));
        val[2 * g] = load(p.values, n * H + 2 * g);
        val[2 * g + 1] = load(p.values, n * H + 2 * g + 1);
      }
      const Acc b = p.bias ? load(p.bias, n) : Acc(0);
      for (int64_t i = 0; i < M; ++i) {
        const Acc* xr = xf + i * K;
        Acc acc0 = 0, acc1 = 0;
        for (int64_t j = 0; j < H; j += 2) {
          acc0 += val[j] * xr[col[j]];
          acc1 += val[j + 1] * xr[col[j + 1]];
        }
        store(i * N + n, acc0 + acc1 + b);
      }
    }
  });
}

void linear_generic(const LinearProblem& p) {
  if (p.dtype == DType::F64)
    linear_generic_impl<double>(p);
  else
    linear_generic_impl<float>(p);
}

void linear(const LinearProblem& p) {
#if defined(SEMISPARSE_HAVE_AVX2_TU)
  const CpuIsa isa = active_cpu_isa();
  if (p.dtype != DType::F64 && (isa == CpuIsa::Avx2Fma || isa == CpuIsa::Avx512Bf16)) {
    if (isa == CpuIsa::Avx512Bf16 && linear_avx512bf16(p)) return;
    linear_avx2(p);
    return;
  }
#endif
  linear_generic(p);
}

}  // namespace semisparse::sparse24
