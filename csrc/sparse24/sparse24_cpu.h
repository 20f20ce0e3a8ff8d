// 2:4 semi-structured sparsity on the CPU: the "cpu" compressed layout and the kernels
// that use it. Shared by the generic (plain C++) and the AVX2+FMA translation units.
//
// Layout "cpu" of a 2:4 matrix W [N, K] (K a multiple of 4):
//   values [N, K/2]           the two kept entries of every group of 4, in column order
//   meta   [N, ceil(K/8)] u8  one 4-bit code per group: idx0 | idx1 << 2 (idx0 < idx1 are
//                             the kept positions within the group); group g sits in byte
//                             g/2, low nibble for even g. Read as little-endian int16, four
//                             groups form exactly the 16-bit word CUTLASS's sm80 layout
//                             stores before its reordering, so the two layouts share one
//                             encoding (the same choice as PyTorch for groups with fewer
//                             than two non-zeros).
#pragma once

#include <cstdint>
#include <cstring>

namespace semisparse::sparse24 {

// F64 is served by the generic kernels only (for float64 gradchecks and references).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

inline int dtype_size(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

// 4-bit non-zero mask of a group (bit i = element i non-zero) -> 4-bit code
// idx0 | idx1 << 2. Masks with more than two bits are never produced by the
// checked front end; for them the table keeps the first two non-zeros.
inline constexpr uint8_t kCodeFromMask[16] = {14, 8, 9, 4, 14, 8, 9, 4,
                                             14, 12, 13, 4, 14, 12, 13, 4};

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

inline float load_as_f32(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::F64: return static_cast<float>(static_cast<const double*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store_from_f32(void* p, int64_t i, DType t, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

// y[M, N] = x[M, K] @ W^T + bias, W in the "cpu" layout; x, W, bias, y all of `dtype`,
// accumulation in fp32. All pointers are to contiguous row-major storage.
struct LinearProblem {
  const void* x;
  const void* values;
  const uint8_t* meta;
  const void* bias;  // may be null
  void* y;
  int64_t M, N, K, meta_cols;
  DType dtype;
};

void linear_generic(const LinearProblem& p);
#if defined(SEMISPARSE_HAVE_AVX2_TU)
void linear_avx2(const LinearProblem& p);
// bfloat16 on AVX-512 BF16; false (nothing done) for other dtypes.
bool linear_avx512bf16(const LinearProblem& p);
// Set a schedule threshold of the AVX-512 BF16 kernels ("bf16_gemv_max_m"); false for
// an unknown key. For the microbenchmark's A/B runs.
bool tune_avx512bf16(const char* key, int64_t value);
// Set a schedule threshold of the AVX2 kernels ("gemv_max_m");
// false for an unknown key. For the microbenchmark's A/B runs.
bool tune_avx2(const char* key, int64_t value);
#endif
// Chooses the path from semisparse::active_cpu_isa().
void linear(const LinearProblem& p);

// dense [N, K] -> values [N, K/2], meta [N, meta_cols]. Entries equal to zero (both
// signs) count as pruned and are stored as +0.0. A group with more than two non-zeros
// keeps its first two (the Python front end rejects such input before it gets here).
void compress(const void* dense, void* values, uint8_t* meta, int64_t N, int64_t K,
              int64_t meta_cols, DType t);
// values, meta -> dense [N, K]
void decompress(const void* values, const uint8_t* meta, void* dense, int64_t N, int64_t K,
                int64_t meta_cols, DType t);

}  // namespace semisparse::sparse24
