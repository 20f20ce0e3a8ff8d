// CPU implementations of the semisparse::sparse24_* ops (schemas are defined once, in
// python/semisparse/ops/sparse24.py). LibTorch stable ABI only.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "sparse24/sparse24_checks.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using common::contig;

void check_cpu(const Tensor& t, const char* what) {
  STD_TORCH_CHECK(t.is_cpu(), "semisparse: ", what, " must be a CPU tensor for this kernel");
}

Tensor linear_cpu(Tensor x, Tensor values, Tensor meta, std::optional<Tensor> bias) {
  check_cpu(x, "x");
  check_cpu(values, "values");
  check_cpu(meta, "meta");
  check_compressed(values, meta);
  const DType t = to_dtype(values, "values");
  STD_TORCH_CHECK(x.scalar_type() == values.scalar_type(), "semisparse: x has dtype ",
                  torch::headeronly::toString(x.scalar_type()), " but the sparse weight has ",
                  torch::headeronly::toString(values.scalar_type()));
  const int64_t N = values.size(0), K = 2 * values.size(1);
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) == K, "semisparse: x must end in K=", K,
                  " features, got ", x.dim() >= 1 ? x.size(x.dim() - 1) : 0);
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    STD_TORCH_CHECK(bias->scalar_type() == values.scalar_type(), "semisparse: bias has dtype ",
                    torch::headeronly::toString(bias->scalar_type()), ", expected ",
                    torch::headeronly::toString(values.scalar_type()));
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "semisparse: bias must have shape [",
                    N, "]");
  }
  // (each stable-ABI call is a trip through the dispatcher: skip it when there is nothing to do)
  Tensor xc = contig(x);
  Tensor vc = contig(values);
  Tensor mc = contig(meta);
  std::optional<Tensor> bc;
  if (bias.has_value()) bc = contig(*bias);
  const int64_t M = K == 0 ? 0 : xc.numel() / K;
  std::vector<int64_t> out_sizes;
  for (int64_t d = 0; d + 1 < xc.dim(); ++d) out_sizes.push_back(xc.size(d));
  out_sizes.push_back(N);
  Tensor y = torch::stable::new_empty(xc, out_sizes);
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    torch::stable::zero_(y);
    return y;
  }
  LinearProblem p{xc.const_data_ptr(), vc.const_data_ptr(),
                  static_cast<const uint8_t*>(mc.const_data_ptr()),
                  bc ? bc->const_data_ptr() : nullptr, y.mutable_data_ptr(), M, N, K,
                  mc.size(1), t};
  linear(p);
  return y;
}

std::tuple<Tensor, Tensor> compress_cpu(Tensor dense) {
  check_cpu(dense, "dense");
  STD_TORCH_CHECK(dense.dim() == 2, "semisparse: dense must be 2-D, got ", dense.dim(), " dims");
  const DType t = to_dtype(dense, "dense");
  const int64_t N = dense.size(0), K = dense.size(1);
  STD_TORCH_CHECK(K % 4 == 0, "semisparse: the last dim must be a multiple of 4, got ", K);
  Tensor dc = torch::stable::contiguous(dense);
  Tensor values = torch::stable::new_empty(dc, {N, K / 2});
  Tensor meta = torch::stable::new_empty(dc, {N, meta_cols_for(K)}, ScalarType::Byte);
  if (N > 0 && K > 0)
    compress(dc.const_data_ptr(), values.mutable_data_ptr(),
             static_cast<uint8_t*>(meta.mutable_data_ptr()), N, K, meta_cols_for(K), t);
  return std::make_tuple(values, meta);
}

Tensor decompress_cpu(Tensor values, Tensor meta) {
  check_cpu(values, "values");
  check_cpu(meta, "meta");
  check_compressed(values, meta);
  const DType t = to_dtype(values, "values");
  const int64_t N = values.size(0), K = 2 * values.size(1);
  Tensor vc = torch::stable::contiguous(values);
  Tensor mc = torch::stable::contiguous(meta);
  Tensor dense = torch::stable::new_empty(vc, {N, K});
  if (N > 0 && K > 0)
    decompress(vc.const_data_ptr(), static_cast<const uint8_t*>(mc.const_data_ptr()),
               dense.mutable_data_ptr(), N, K, mc.size(1), t);
  return dense;
}

}  // namespace
}  // namespace semisparse::sparse24

STABLE_TORCH_LIBRARY_IMPL(semisparse, CPU, m) {
  m.impl("sparse24_linear", TORCH_BOX(&semisparse::sparse24::linear_cpu));
  m.impl("sparse24_compress", TORCH_BOX(&semisparse::sparse24::compress_cpu));
  m.impl("sparse24_decompress", TORCH_BOX(&semisparse::sparse24::decompress_cpu));
}
