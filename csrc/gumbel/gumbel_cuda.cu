// CUDA implementations of the semisparse::gumbel_nm_* ops (schemas, fakes, autograd and the
// pure-torch references live in python/semisparse/ops/gumbel.py; the CPU kernels in
// gumbel_cpu*.cpp). LibTorch stable ABI only (see DESIGN.md "Build facts").
//
// The noise is keyed exactly as on the CPU: Philox4x32-10 with key = seed and counter =
// (id lo, id hi, offset lo, offset hi), id = group * ceil(C/4) + c/4, word c%4 of that block
// for candidate c; u = ((word >> 8) + 0.5) * 2^-24 (clamped below 1 in fp32), g = -log(-log u).
// The Philox words are bit-identical to the CPU's; log/exp are CUDA's (the CPU fp32 kernel
// uses polynomials), so fp32 results agree to a few ulps, not bit for bit, and the sample
// statistics agree.
//
// One thread per group of m weights (grid-stride): it draws the C candidates' noise, forms
// y_c = (kappa * logit_c + g_c) / tau, and writes the soft mask (softmax-weighted sum of the
// candidates' patterns), the hard mask (the argmax pattern), W * mask, or the logits'
// gradient y_c * (dp_c - sum_c' y_c' dp_c') * kappa / tau with dp_c = sum of the incoming
// gradient (times W for masked_weight) over the elements candidate c keeps. Arithmetic in
// fp32 (fp64 when any tensor is fp64). 2:4 (C = 6) has its own fully unrolled instance that
// keeps every array in registers; other n:m (C <= 70) use the generic instance.
//
// Not yet tuned: each thread reads its C logits and m weights as separate loads (adjacent
// threads are C or m elements apart, so the loads are cached, not coalesced).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_launch.cuh"
#include "common/stable_tensor.h"
#include "gumbel/gumbel_front.h"
#include "gumbel/gumbel_problem.h"

namespace semisparse::gumbel {
namespace {

using torch::stable::Tensor;

constexpr int kThreads = 256;
constexpr int kMaxC = kMaxPatterns;

// ------------------------------------------------------------------ device helpers
template <class A>
__device__ __forceinline__ A load_as(const void* p, int64_t i, DType t) {
  switch (t) {
    case DType::F32: return A(static_cast<const float*>(p)[i]);
    case DType::F64: return A(static_cast<const double*>(p)[i]);
    case DType::BF16: return A(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]));
    default: return A(__half2float(static_cast<const __half*>(p)[i]));
  }
}

template <class A>
__device__ __forceinline__ void store_as(void* p, int64_t i, DType t, A v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = float(v); break;
    case DType::F64: static_cast<double*>(p)[i] = double(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(float(v)); break;
    default: static_cast<__half*>(p)[i] = __float2half_rn(float(v)); break;
  }
}

__device__ __forceinline__ float gumbel_of(uint32_t w, float) {
  float u = (float(w >> 8) + 0.5f) * 5.9604644775390625e-08f;
  u = fminf(u, 0.99999994039535522f);
  return -logf(-logf(u));
}
__device__ __forceinline__ double gumbel_of(uint32_t w, double) {
  const double u = (double(w >> 8) + 0.5) * 5.9604644775390625e-08;
  return -log(-log(u));
}
__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// One group per thread. CM / MM: compile-time bounds on C and m (6 / 4 for 2:4, where every
// loop unrolls and the arrays live in registers); the runtime p.C / p.m are <= them.
template <class A, int CM, int MM>
__global__ void __launch_bounds__(kThreads) gumbel_kernel(const Problem p) {
  const int C = CM == 6 ? 6 : p.C;
  const int m = MM == 4 ? 4 : p.m;
  const int B = (C + 3) / 4;
  const bool fwd = p.op == Op::Mask || p.op == Op::MaskedWeight;
  const A kappa = A(p.kappa), inv_tau = A(1.0 / p.tau);
  const uint32_t k0 = uint32_t(p.seed), k1 = uint32_t(p.seed >> 32);
  const uint32_t olo = uint32_t(p.offset), ohi = uint32_t(p.offset >> 32);
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < p.G; g += int64_t(gridDim.x) * blockDim.x) {
    A y[CM];
#pragma unroll
    for (int b = 0; b < (CM + 3) / 4; ++b) {
      if (b < B) {
        const uint64_t id = uint64_t(g) * uint64_t(B) + uint64_t(b);
        const uint32_t ctr[4] = {uint32_t(id), uint32_t(id >> 32), olo, ohi};
        uint32_t w[4];
        philox4x32_10(ctr, k0, k1, w);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int c = 4 * b + q;
          if (c < C && c < CM) y[c] = (kappa * load_as<A>(p.logits, g * C + c, p.lt) + gumbel_of(w[q], A(0))) * inv_tau;
        }
      }
    }
    A mask[MM];
    if (fwd && p.hard) {
      int best = 0;
      A by = y[0];
#pragma unroll
      for (int c = 1; c < CM; ++c)
        if (c < C && y[c] > by) {
          by = y[c];
          best = c;
        }
      const unsigned bits = p.pattern[best];
#pragma unroll
      for (int j = 0; j < MM; ++j) mask[j] = A((bits >> j) & 1u);
    } else {
      A mx = y[0];
#pragma unroll
      for (int c = 1; c < CM; ++c)
        if (c < C) mx = y[c] > mx ? y[c] : mx;
      A s = A(0);
#pragma unroll
      for (int c = 0; c < CM; ++c)
        if (c < C) {
          y[c] = exp_of(y[c] - mx);
          s += y[c];
        }
      const A inv = A(1) / s;
#pragma unroll
      for (int c = 0; c < CM; ++c)
        if (c < C) y[c] *= inv;
      if (fwd) {
#pragma unroll
        for (int j = 0; j < MM; ++j) mask[j] = A(0);
#pragma unroll
        for (int c = 0; c < CM; ++c)
          if (c < C) {
            const unsigned bits = p.pattern[c];
#pragma unroll
            for (int j = 0; j < MM; ++j)
              if ((bits >> j) & 1u) mask[j] += y[c];
          }
      }
    }
    if (fwd) {
#pragma unroll
      for (int j = 0; j < MM; ++j)
        if (j < m) {
          const int64_t e = g * m + j;
          const A v = p.op == Op::MaskedWeight ? load_as<A>(p.weight, e, p.wt) * mask[j] : mask[j];
          store_as<A>(p.out, e, p.ot, v);
        }
      continue;
    }
    A gm[MM];
#pragma unroll
    for (int j = 0; j < MM; ++j)
      if (j < m) {
        const int64_t e = g * m + j;
        gm[j] = load_as<A>(p.grad, e, p.gt);
        if (p.op == Op::MaskedWeightBackward) gm[j] *= load_as<A>(p.weight, e, p.wt);
      }
    A dp[CM];
    A s = A(0);
#pragma unroll
    for (int c = 0; c < CM; ++c)
      if (c < C) {
        const unsigned bits = p.pattern[c];
        A a = A(0);
#pragma unroll
        for (int j = 0; j < MM; ++j)
          if (j < m && ((bits >> j) & 1u)) a += gm[j];
        dp[c] = a;
        s += y[c] * a;
      }
    const A kdt = kappa * inv_tau;
#pragma unroll
    for (int c = 0; c < CM; ++c)
      if (c < C) store_as<A>(p.out, g * C + c, p.ot, y[c] * (dp[c] - s) * kdt);
  }
}

// ------------------------------------------------------------------ host side
void launch(const Problem& p, int32_t dev, const char* op) {
  if (p.G == 0) return;
  const bool f64 = any_f64(p);
  const unsigned grid = common::grid_for(p.G, dev, kThreads, 16);
  cudaStream_t stream = common::current_stream(dev);
  const bool is24 = p.n == 2 && p.m == 4;
  if (f64) {
    if (is24)
      gumbel_kernel<double, 6, 4><<<grid, kThreads, 0, stream>>>(p);
    else
      gumbel_kernel<double, kMaxC, 8><<<grid, kThreads, 0, stream>>>(p);
  } else {
    if (is24)
      gumbel_kernel<float, 6, 4><<<grid, kThreads, 0, stream>>>(p);
    else
      gumbel_kernel<float, kMaxC, 8><<<grid, kThreads, 0, stream>>>(p);
  }
  common::check_launch(op);
}

using front::check_grad;
using front::check_weight;
using front::Device;
using front::sizes_of;

Problem common(const char* op, const Tensor& logits, int64_t seed, int64_t offset, double tau, double kappa, int64_t n,
               int64_t m) {
  return front::common(op, logits, seed, offset, tau, kappa, n, m, Device::CUDA);
}

Tensor run_new(Problem& p, Op op, const Tensor& like, DType ot, const std::vector<int64_t>& sizes, const char* name) {
  const int32_t dev = like.get_device_index();
  Tensor out = torch::stable::new_empty(like, sizes);
  p.op = op;
  p.out = out.mutable_data_ptr();
  p.ot = ot;
  launch(p, dev, name);
  return out;
}

Tensor mask_cuda(Tensor logits, int64_t seed, int64_t offset, double tau, double kappa, int64_t n, int64_t m,
                 bool hard) {
  const char* op = "gumbel_nm_mask";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  Tensor lc = common::contig(logits);
  p.hard = hard;
  p.logits = lc.const_data_ptr();
  return run_new(p, Op::Mask, lc, p.lt, {p.G, int64_t(p.m)}, op);
}

Tensor masked_weight_cuda(Tensor weight, Tensor logits, int64_t seed, int64_t offset, double tau, double kappa,
                          int64_t n, int64_t m, bool hard) {
  const char* op = "gumbel_nm_masked_weight";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_weight(op, weight, logits, p, Device::CUDA);
  torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  Tensor lc = common::contig(logits);
  Tensor wc = common::contig(weight);
  p.hard = hard;
  p.logits = lc.const_data_ptr();
  p.weight = wc.const_data_ptr();
  return run_new(p, Op::MaskedWeight, wc, p.wt, sizes_of(weight), op);
}

Tensor mask_backward_cuda(Tensor grad_mask, Tensor logits, int64_t seed, int64_t offset, double tau, double kappa,
                          int64_t n, int64_t m) {
  const char* op = "gumbel_nm_mask_backward";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_grad(op, grad_mask, {p.G, int64_t(p.m)}, logits, p, Device::CUDA);
  torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  Tensor lc = common::contig(logits);
  Tensor gc = common::contig(grad_mask);
  p.logits = lc.const_data_ptr();
  p.grad = gc.const_data_ptr();
  return run_new(p, Op::MaskBackward, lc, p.lt, {p.G, int64_t(p.C)}, op);
}

Tensor masked_weight_backward_cuda(Tensor grad_out, Tensor weight, Tensor logits, int64_t seed, int64_t offset,
                                   double tau, double kappa, int64_t n, int64_t m) {
  const char* op = "gumbel_nm_masked_weight_backward";
  Problem p = common(op, logits, seed, offset, tau, kappa, n, m);
  check_weight(op, weight, logits, p, Device::CUDA);
  check_grad(op, grad_out, sizes_of(weight), logits, p, Device::CUDA);
  torch::stable::accelerator::DeviceGuard guard(logits.get_device_index());
  Tensor lc = common::contig(logits);
  Tensor wc = common::contig(weight);
  Tensor gc = common::contig(grad_out);
  p.logits = lc.const_data_ptr();
  p.weight = wc.const_data_ptr();
  p.grad = gc.const_data_ptr();
  return run_new(p, Op::MaskedWeightBackward, lc, p.lt, {p.G, int64_t(p.C)}, op);
}

}  // namespace
}  // namespace semisparse::gumbel

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("gumbel_nm_mask", TORCH_BOX(&semisparse::gumbel::mask_cuda));
  m.impl("gumbel_nm_masked_weight", TORCH_BOX(&semisparse::gumbel::masked_weight_cuda));
  m.impl("gumbel_nm_mask_backward", TORCH_BOX(&semisparse::gumbel::mask_backward_cuda));
  m.impl("gumbel_nm_masked_weight_backward", TORCH_BOX(&semisparse::gumbel::masked_weight_backward_cuda));
}
