// Where the 2:4 metadata of one row / column range lives in each GPU layout. Plain C++
// usable from host code (the CPU library's pack / unpack, tested against PyTorch's CPU
// reference) and from device code (the CUDA pack / unpack and the small-M GEMM), so both
// sides share one definition of every layout.
//
// All layouts hold the same 4-bit codes as layout "cpu" (idx0 | idx1 << 2 per group of 4
// columns, see sparse24_cpu.h); they only move them:
//
//  cutlass_sm80  int16 words [N, K/16] (N % 32 == 0, K % 32 == 0): word (r, c) holds the
//                codes of columns 16c .. 16c+15 of row r (group j of the word in bits
//                4j .. 4j+3, i.e. the little-endian int16 of "cpu" meta bytes 2c, 2c+1),
//                stored at sm80_meta_word(r, c, N) of CUTLASS's ColumnMajorInterleaved<2>
//                order for 16-bit operands (rows grouped by 32 and interleaved by 4, then
//                2x2 word blocks transposed) -- bit-identical to
//                torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass.
//  cutlass_sm90  bytes [K/64, N/64, 512] (N % 64 == 0, K % 64 == 0): byte (r, j) holds the
//                codes of columns 8j .. 8j+7 of row r (the lower group in the low nibble,
//                i.e. "cpu" meta byte j), stored at sm90_meta_byte(r, j, N): CUTLASS 3.x's
//                Sm90GemmSparseConfig<half/bf16, K-major, ..., MinTileShapeK = 64>
//                ::fill_layoutE, the layout every sm90 kernel here is built for (tile K 64).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEMISPARSE_HD __host__ __device__ __forceinline__
#else
#define SEMISPARSE_HD inline
#endif

namespace semisparse::sparse24 {

enum class MetaLayout : int { kCpu = 0, kSm80 = 1, kSm90 = 2 };

// The activation sparse24_mm fuses after the bias (declared here, not in sparse24_gemm.h,
// because the CPU library uses it too and must not include cuda_runtime.h).
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2 /* exact (erf) */, kSilu = 3 };

// Row / column multiples a layout needs (cutlass layouts: 16-bit values only).
constexpr int64_t kSm80RowMultiple = 32, kSm80ColMultiple = 32;
constexpr int64_t kSm90RowMultiple = 64, kSm90ColMultiple = 64;

// cutlass_sm80: index of int16 word (r, c) (c < K/16) in a matrix of `rows` rows.
SEMISPARSE_HD int64_t sm80_meta_word(int64_t r, int64_t c, int64_t rows) {
  int64_t rr = (r / 32) * 32 + (r % 8) * 4 + (r % 32) / 8;
  // transpose each 2x2 block of words: (even row, odd col) <-> (odd row, even col)
  if ((rr & 1) == 0 && (c & 1) == 1) {
    rr += 1;
    c -= 1;
  } else if ((rr & 1) == 1 && (c & 1) == 0) {
    rr -= 1;
    c += 1;
  }
  return (c / 2) * rows * 2 + rr * 2 + (c & 1);
}

// cutlass_sm90: index of byte (r, j) (j < K/8) in a matrix of `rows` rows (rows % 64 == 0).
// The E atom of a 64 x 64 tile, in logical (1-bit) units, orders its modes
// (k % 16 : 1) (m / 8 % 2 : 16) (k / 32 % 2 : 32) (m % 8 : 64) (k / 16 % 2 : 512)
// (m / 16 % 4 : 1024); atoms follow along M (4096 apart), then along K (rows * 64 apart).
SEMISPARSE_HD int64_t sm90_meta_byte(int64_t r, int64_t j, int64_t rows) {
  const int64_t k = 8 * j;
  const int64_t m_in = r % 64, k_in = k % 64;
  const int64_t idx = (k_in % 16) + 16 * ((m_in / 8) % 2) + 32 * (k_in / 32) + 64 * (m_in % 8) +
                      512 * ((k_in / 16) % 2) + 1024 * (m_in / 16) + 4096 * (r / 64) + (k / 64) * rows * 64;
  return idx / 8;
}

}  // namespace semisparse::sparse24
