// Small tensor helpers shared by the op front ends (CPU and CUDA) of every kernel family.
// LibTorch stable ABI only and header-only, so nvcc compiles it too.
#pragma once

#include <cstdint>
#include <string>

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

namespace semisparse::common {

// t itself when it is contiguous, else a contiguous copy.
inline torch::stable::Tensor contig(const torch::stable::Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

// The shape as Python prints a tuple: "(2, 3)", "(4,)", "()".
inline std::string shape_str(const torch::stable::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d) s += ", ";
    s += std::to_string(t.size(d));
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

// t's scalar type as a kernel dtype enum DT (one with F32, BF16, F16 and F64). Any other
// scalar type fails the check with the message msg... followed by the type's name, so
// each op keeps its own wording.
template <class DT, class... Msg>
inline DT dtype_of(const torch::stable::Tensor& t, const Msg&... msg) {
  using torch::headeronly::ScalarType;
  switch (t.scalar_type()) {
    case ScalarType::Float: return DT::F32;
    case ScalarType::BFloat16: return DT::BF16;
    case ScalarType::Half: return DT::F16;
    case ScalarType::Double: return DT::F64;
    default:
      STD_TORCH_CHECK(false, msg..., torch::headeronly::toString(t.scalar_type()));
  }
  return DT::F32;
}

}  // namespace semisparse::common
