// CPU implementations of the semisparse::gumbel_nm_* ops (schemas, fakes, autograd and the
// pure-torch references live in python/semisparse/ops/gumbel.py). LibTorch stable ABI only.
// Every argument is validated here too, so a direct call into the kernel cannot crash.
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/stable_tensor.h"
#include "gumbel/gumbel_cpu.h"
#include "gumbel/gumbel_front.h"

namespace semisparse::gumbel {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using common::contig;

// A fresh output of tens of MiB costs one page fault per 4 KiB when the kernel first writes
// it (~45 ms per 64 MiB measured on the benchmark VM: as long as the kernel itself). Ask for
// transparent huge pages on its 2 MiB-aligned interior (Linux, THP "madvise" mode; a no-op
// where THP is off or the range is too small). Only untouched memory we just allocated.
void advise_huge(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = size_t(t.numel()) * size_t(t.element_size());
  if (bytes < 4 * kHuge) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory: ignore errors
#else
  (void)t;
#endif
}

using front::check_grad;
using front::check_weight;
using front::Device;
using front::sizes_of;

Problem common(const char* op, const Tensor& logits, int64_t seed, int64_t offset, double tau, double kappa,
               int64_t n, int64_t m) {
  return front::common(op, logits, seed, offset, tau, kappa, n, m, Device::CPU);
}

// Runs p (inputs set) as op into a fresh output of the given sizes with like's device and
// dtype (ot is that dtype, as the kernels name it).
Tensor run_new(Problem& p, Op op, const Tensor& like, DType ot, const std::vector<int64_t>& sizes) {
  Tensor out = torch::stable::new_empty(like, sizes);
  advise_huge(out);
  p.op = op;
  p.out = out.mutable_data_ptr();
  p.ot = ot;
  run(p);
  return out;
}

Tensor mask_cpu(Tensor logits, int64_t seed, int64_t offset, double tau, double kappa, int64_t n, int64_t m,
                bool hard) {
  Problem p = common("gumbel_nm_mask", logits, seed, offset, tau, kappa, n, m);
  Tensor lc = contig(logits);
  p.hard = hard;
  p.logits = lc.const_data_ptr();
  return run_new(p, Op::Mask, lc, p.lt, {p.G, int64_t(p.m)});
}

Tensor masked_weight_cpu(Tensor weight, Tensor logits, int64_t seed, int64_t offset, double tau, double kappa,
                         int64_t n, int64_t m, bool hard) {
  const char* op = "gumbel_nm_masked_weight";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_weight(op, weight, logits, p, Device::CPU);
  Tensor lc = contig(logits);
  Tensor wc = contig(weight);
  p.hard = hard;
  p.logits = lc.const_data_ptr();
  p.weight = wc.const_data_ptr();
  return run_new(p, Op::MaskedWeight, wc, p.wt, sizes_of(weight));
}

Tensor mask_backward_cpu(Tensor grad_mask, Tensor logits, int64_t seed, int64_t offset, double tau, double kappa,
                         int64_t n, int64_t m) {
  const char* op = "gumbel_nm_mask_backward";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_grad(op, grad_mask, {p.G, int64_t(p.m)}, logits, p, Device::CPU);
  Tensor lc = contig(logits);
  Tensor gc = contig(grad_mask);
  p.logits = lc.const_data_ptr();
  p.grad = gc.const_data_ptr();
  return run_new(p, Op::MaskBackward, lc, p.lt, {p.G, int64_t(p.C)});
}

Tensor masked_weight_backward_cpu(Tensor grad_out, Tensor weight, Tensor logits, int64_t seed, int64_t offset,
                                  double tau, double kappa, int64_t n, int64_t m) {
  const char* op = "gumbel_nm_masked_weight_backward";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_weight(op, weight, logits, p, Device::CPU);
  check_grad(op, grad_out, sizes_of(weight), logits, p, Device::CPU);
  Tensor lc = contig(logits);
  Tensor wc = contig(weight);
  Tensor gc = contig(grad_out);
  p.logits = lc.const_data_ptr();
  p.weight = wc.const_data_ptr();
  p.grad = gc.const_data_ptr();
  return run_new(p, Op::MaskedWeightBackward, lc, p.lt, {p.G, int64_t(p.C)});
}

}  // namespace
}  // namespace semisparse::gumbel

STABLE_TORCH_LIBRARY_IMPL(semisparse, CPU, m) {
  m.impl("gumbel_nm_mask", TORCH_BOX(&semisparse::gumbel::mask_cpu));
  m.impl("gumbel_nm_masked_weight", TORCH_BOX(&semisparse::gumbel::masked_weight_cpu));
  m.impl("gumbel_nm_mask_backward", TORCH_BOX(&semisparse::gumbel::mask_backward_cpu));
  m.impl("gumbel_nm_masked_weight_backward", TORCH_BOX(&semisparse::gumbel::masked_weight_backward_cpu));
}
