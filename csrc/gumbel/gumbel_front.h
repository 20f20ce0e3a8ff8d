// The argument checks of the gumbel_nm_* ops, shared by the CPU (gumbel_cpu.cpp) and CUDA
// (gumbel_cuda.cu) front ends: every argument is validated before a kernel runs, with the
// same words on both devices. LibTorch stable ABI only, header-only (nvcc compiles it too).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include "common/stable_tensor.h"
#include "gumbel/gumbel_problem.h"

namespace semisparse::gumbel::front {

enum class Device { CPU, CUDA };

inline const char* device_name(Device d) { return d == Device::CPU ? "CPU" : "CUDA"; }

// t must live on the kernel's device (for CUDA: the logits' device, index dev).
inline void check_device(const char* op, const torch::stable::Tensor& t, const char* what, Device d, int32_t dev) {
  STD_TORCH_CHECK(d == Device::CPU ? t.is_cpu() : t.is_cuda(), op, ": ", what, " must be a ", device_name(d),
                  " tensor for this kernel");
  if (d == Device::CUDA)
    STD_TORCH_CHECK(t.get_device_index() == dev, op, ": ", what, " is on cuda:", t.get_device_index(),
                    " but the logits are on cuda:", dev);
}

inline DType to_dtype(const torch::stable::Tensor& t, const char* op, const char* what) {
  return common::dtype_of<DType>(t, op, ": ", what, " must be float32/bfloat16/float16/float64, got ");
}

inline std::vector<int64_t> sizes_of(const torch::stable::Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d < t.dim(); ++d) s.push_back(t.size(d));
  return s;
}

// Checks the scalar arguments and the logits; returns a Problem with the patterns filled.
inline Problem common(const char* op, const torch::stable::Tensor& logits, int64_t seed, int64_t offset, double tau,
                      double kappa, int64_t n, int64_t m, Device d) {
  STD_TORCH_CHECK(1 <= n && n < m && m <= 8, op, ": n:m = ", n, ":", m,
                  " is not supported; expected 1 <= n < m <= 8 (e.g. 2:4, 1:4, 4:8)");
  STD_TORCH_CHECK(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);
  STD_TORCH_CHECK(std::isfinite(kappa), op, ": kappa must be finite, got ", kappa);
  check_device(op, logits, "logits", d, logits.get_device_index());
  Problem p{};
  p.n = int(n);
  p.m = int(m);
  fill_patterns(p);
  p.lt = to_dtype(logits, op, "logits");
  STD_TORCH_CHECK(logits.dim() == 2 && logits.size(1) == p.C, op, ": logits must have shape [groups, C(", m, ",", n,
                  ") = ", p.C, "], got ", common::shape_str(logits));
  p.G = logits.size(0);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.tau = tau;
  p.kappa = kappa;
  return p;
}

inline void check_weight(const char* op, const torch::stable::Tensor& weight, const torch::stable::Tensor& logits,
                         Problem& p, Device d) {
  check_device(op, weight, "weight", d, logits.get_device_index());
  p.wt = to_dtype(weight, op, "weight");
  STD_TORCH_CHECK(weight.dim() >= 1 && weight.size(weight.dim() - 1) % p.m == 0, op,
                  ": the weight's last dim must be a multiple of m=", p.m, ", got shape ", common::shape_str(weight));
  STD_TORCH_CHECK(p.G * p.m == weight.numel(), op, ": logits shape ", common::shape_str(logits),
                  " does not match the weight ", common::shape_str(weight), ": expected [", weight.numel() / p.m, ", ",
                  p.C, "] (weight.numel() / m groups)");
}

inline void check_grad(const char* op, const torch::stable::Tensor& g, const std::vector<int64_t>& shape,
                       const torch::stable::Tensor& logits, Problem& p, Device d) {
  check_device(op, g, "the gradient", d, logits.get_device_index());
  bool ok = g.dim() == int64_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = g.size(int64_t(i)) == shape[i];
  std::string want = "(";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  want += shape.size() == 1 ? ",)" : ")";
  STD_TORCH_CHECK(ok, op, ": the gradient must have shape ", want, ", got ", common::shape_str(g));
  p.gt = to_dtype(g, op, "the gradient");
}

}  // namespace semisparse::gumbel::front
