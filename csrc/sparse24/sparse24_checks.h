// Argument checks shared by the CPU and CUDA entry points of the sparse24 ops (stable
// ABI only, so nvcc compiles it too).
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/stable_tensor.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {

inline DType to_dtype(const torch::stable::Tensor& t, const char* what) {
  return common::dtype_of<DType>(t, "semisparse: ", what, " must be float32, bfloat16, float16 (or float64), got ");
}

inline int64_t meta_cols_for(int64_t K) { return (K + 7) / 8; }

// values [N, K/2] and meta uint8 [N, ceil(K/8)] of one 2:4 matrix
inline void check_compressed(const torch::stable::Tensor& values, const torch::stable::Tensor& meta) {
  STD_TORCH_CHECK(values.dim() == 2, "semisparse: values must be 2-D [N, K/2], got ", values.dim(), " dims");
  STD_TORCH_CHECK(meta.dim() == 2, "semisparse: meta must be 2-D [N, ceil(K/8)], got ", meta.dim(), " dims");
  STD_TORCH_CHECK(meta.scalar_type() == torch::headeronly::ScalarType::Byte, "semisparse: meta must be uint8, got ",
                  torch::headeronly::toString(meta.scalar_type()));
  const int64_t N = values.size(0), K = 2 * values.size(1);
  STD_TORCH_CHECK(K % 4 == 0, "semisparse: values must have K/2 columns with K a multiple of 4, got ",
                  values.size(1), " columns");
  STD_TORCH_CHECK(meta.size(0) == N && meta.size(1) == meta_cols_for(K), "semisparse: meta must have shape [", N,
                  ", ", meta_cols_for(K), "], got [", meta.size(0), ", ", meta.size(1), "]");
}

}  // namespace semisparse::sparse24
