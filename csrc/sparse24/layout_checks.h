// Argument checks of the layout-aware sparse24 ops (sparse24_pack / sparse24_unpack /
// sparse24_mm), shared by their CPU and CUDA front ends. Stable ABI only, header-only.
// The messages match the Python checks in python/semisparse/ops/sparse24.py.
#pragma once

#include <cstdint>
#include <string>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "sparse24/meta_layout.h"

namespace semisparse::sparse24 {

inline MetaLayout parse_layout(const std::string& s, const char* op) {
  if (s == "cpu") return MetaLayout::kCpu;
  if (s == "cutlass_sm80") return MetaLayout::kSm80;
  if (s == "cutlass_sm90") return MetaLayout::kSm90;
  STD_TORCH_CHECK(false, op, ": layout must be one of ('cpu', 'cutlass_sm80', 'cutlass_sm90'), got '", s, "'");
  return MetaLayout::kCpu;
}

inline const char* layout_name(MetaLayout l) {
  return l == MetaLayout::kCpu ? "cpu" : l == MetaLayout::kSm80 ? "cutlass_sm80" : "cutlass_sm90";
}

inline Activation parse_activation(const std::string& s, const char* op) {
  if (s == "none") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "silu") return Activation::kSilu;
  STD_TORCH_CHECK(false, op, ": activation must be one of ('none', 'relu', 'gelu', 'silu'), got '", s, "'");
  return Activation::kNone;
}

// An [N, K] matrix of scalar type st fits the layout.
inline void check_layout_shape(MetaLayout l, int64_t N, int64_t K, torch::headeronly::ScalarType st, const char* op) {
  using torch::headeronly::ScalarType;
  if (l == MetaLayout::kCpu) {
    STD_TORCH_CHECK(K % 4 == 0, op, ": layout 'cpu' needs K a multiple of 4, got K=", K, " (shape (", N, ", ", K, "))");
    return;
  }
  STD_TORCH_CHECK(st == ScalarType::Half || st == ScalarType::BFloat16, op, ": layout '", layout_name(l),
                  "' takes float16 or bfloat16, got ", torch::headeronly::toString(st));
  const int64_t rm = l == MetaLayout::kSm80 ? kSm80RowMultiple : kSm90RowMultiple;
  const int64_t cm = l == MetaLayout::kSm80 ? kSm80ColMultiple : kSm90ColMultiple;
  STD_TORCH_CHECK(N % rm == 0, op, ": layout '", layout_name(l), "' needs N a multiple of ", rm, ", got N=", N, " (shape (", N, ", ", K, "))");
  STD_TORCH_CHECK(K % cm == 0, op, ": layout '", layout_name(l), "' needs K a multiple of ", cm, ", got K=", K, " (shape (", N, ", ", K, "))");
}

// meta has the dtype and shape of layout l for an [N, K] matrix.
inline void check_layout_meta(MetaLayout l, const torch::stable::Tensor& meta, int64_t N, int64_t K, const char* op) {
  using torch::headeronly::ScalarType;
  if (l == MetaLayout::kCpu) {
    STD_TORCH_CHECK(meta.scalar_type() == ScalarType::Byte && meta.dim() == 2 && meta.size(0) == N &&
                        meta.size(1) == (K + 7) / 8,
                    op, ": layout 'cpu' meta must be uint8 of shape (", N, ", ", (K + 7) / 8, ")");
  } else if (l == MetaLayout::kSm80) {
    STD_TORCH_CHECK(meta.scalar_type() == ScalarType::Short && meta.dim() == 2 && meta.size(0) == N &&
                        meta.size(1) == K / 16,
                    op, ": layout 'cutlass_sm80' meta must be int16 of shape (", N, ", ", K / 16, ")");
  } else {
    STD_TORCH_CHECK(meta.scalar_type() == ScalarType::Byte && meta.dim() == 3 && meta.size(0) == K / 64 &&
                        meta.size(1) == N / 64 && meta.size(2) == 512,
                    op, ": layout 'cutlass_sm90' meta must be uint8 of shape (", K / 64, ", ", N / 64, ", 512)");
  }
}

}  // namespace semisparse::sparse24
