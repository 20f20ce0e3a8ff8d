// CUDA front end of semisparse::sparse24_mm (schema in python/semisparse/ops/sparse24.py):
// checks the arguments, then picks a kernel by layout, architecture and shape.
//
//   layout        M <= 16                  M > 16
//   cutlass_sm90  small-M kernel           CUTLASS 3.x sm90a GEMM (gemm_sm90_*.cu)
//   cutlass_sm80  small-M kernel           CUTLASS 2.x SparseGemm (gemm_sm80_*.cu)
//   cpu / none fits                        fallback: unpack to dense (the CUDA
//                                          sparse24_unpack kernel) + cuBLAS matmul, then a
//                                          bias + activation kernel
//
// Each kernel entry point says why it does not fit (a static string) instead of launching,
// and the front end moves on down the list, so an unusual shape, a misaligned view or a
// library built without CUTLASS still gets a correct result. SEMISPARSE_SPARSE24_KERNEL
// (auto | small_m | cutlass | fallback) forces one path -- for the tests, which check every
// kernel against the reference, and for the benchmarks; a forced kernel that does not fit
// raises, naming the reason. LibTorch stable ABI only.
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/stableivalue_conversions.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/cuda_launch.cuh"
#include "common/stable_tensor.h"
#include "sparse24/layout_checks.h"
#include "sparse24/sparse24_gemm.h"

namespace semisparse::sparse24 {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using common::contig;

enum class Forced { kAuto, kSmallM, kCutlass, kFallback };

Forced forced_kernel() {
  const char* s = std::getenv("SEMISPARSE_SPARSE24_KERNEL");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Forced::kAuto;
  if (std::strcmp(s, "small_m") == 0) return Forced::kSmallM;
  if (std::strcmp(s, "cutlass") == 0) return Forced::kCutlass;
  if (std::strcmp(s, "fallback") == 0) return Forced::kFallback;
  STD_TORCH_CHECK(false, "SEMISPARSE_SPARSE24_KERNEL must be auto, small_m, cutlass or fallback, got '", s, "'");
  return Forced::kAuto;
}

// ------------------------------------------------ bias + activation (fallback path)
__device__ __forceinline__ float act_f(float z, Activation a) {
  switch (a) {
    case Activation::kRelu: return z > 0.f ? z : 0.f;
    case Activation::kGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752440f));
    case Activation::kSilu: return z / (1.f + __expf(-z));
    default: return z;
  }
}

// (bias + activation in fp32; in fp64 for float64 outputs)
__device__ __forceinline__ double act_f(double z, Activation a) {
  switch (a) {
    case Activation::kRelu: return z > 0.0 ? z : 0.0;
    case Activation::kGelu: return 0.5 * z * (1.0 + erf(z * 0.70710678118654752440));
    case Activation::kSilu: return z / (1.0 + exp(-z));
    default: return z;
  }
}

template <class T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}

template <class T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return static_cast<T>(v);
}

// y[i] = act(y[i] + bias[i % n]) over M * N entries, grid-stride
template <class T>
__global__ void bias_act_kernel(T* __restrict__ y, const T* __restrict__ bias, int64_t total, int64_t n, Activation act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, double>) {
      double z = y[i];
      if (bias != nullptr) z += bias[i % n];
      y[i] = act_f(z, act);
    } else {
      float z = to_f(y[i]);
      if (bias != nullptr) z += to_f(bias[i % n]);
      y[i] = from_f<T>(act_f(z, act));
    }
  }
}

void bias_act(Tensor& y, const std::optional<Tensor>& bias, int64_t n, Activation act, int dev, cudaStream_t stream) {
  const int64_t total = y.numel();
  if (total == 0 || (!bias && act == Activation::kNone)) return;
  const unsigned grid = common::grid_for(total, dev, 256, 8);
  const void* b = bias ? bias->const_data_ptr() : nullptr;
  switch (y.scalar_type()) {
    case ScalarType::Half:
      bias_act_kernel<__half><<<grid, 256, 0, stream>>>(static_cast<__half*>(y.mutable_data_ptr()),
                                                         static_cast<const __half*>(b), total, n, act);
      break;
    case ScalarType::BFloat16:
      bias_act_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(y.mutable_data_ptr()),
                                                               static_cast<const __nv_bfloat16*>(b), total, n, act);
      break;
    case ScalarType::Double:
      bias_act_kernel<double><<<grid, 256, 0, stream>>>(static_cast<double*>(y.mutable_data_ptr()),
                                                        static_cast<const double*>(b), total, n, act);
      break;
    default:
      bias_act_kernel<float><<<grid, 256, 0, stream>>>(static_cast<float*>(y.mutable_data_ptr()),
                                                       static_cast<const float*>(b), total, n, act);
  }
  common::check_launch("sparse24_mm (bias + activation)");
}

// dense W [N, K] from the CUDA sparse24_unpack kernel, through the dispatcher
Tensor unpack_dense(const Tensor& values, const Tensor& meta, const std::string& layout) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(values), torch::stable::detail::from(meta),
                                    torch::stable::detail::from(layout)};
  STD_TORCH_CHECK(torch_call_dispatcher("semisparse::sparse24_unpack", "", stack.data(), TORCH_ABI_VERSION) ==
                      AOTI_TORCH_SUCCESS,
                  "sparse24_mm: the fallback path could not unpack the sparse weight (semisparse::sparse24_unpack)");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// ---------------------------------------------------------------- the op
Tensor mm_cuda(Tensor x, Tensor values, Tensor meta, std::string layout, std::optional<Tensor> bias,
               std::string activation) {
  const char* op = "sparse24_mm";
  const MetaLayout l = parse_layout(layout, op);
  const Activation act = parse_activation(activation, op);
  STD_TORCH_CHECK(values.is_cuda() && x.is_cuda() && meta.is_cuda(), op, ": x, values and meta must be CUDA tensors");
  const int32_t dev = values.get_device_index();
  STD_TORCH_CHECK(x.get_device_index() == dev && meta.get_device_index() == dev, op,
                  ": x, values and meta must be on one device");
  STD_TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.dim(), " dims");
  const ScalarType st = values.scalar_type();
  STD_TORCH_CHECK(st == ScalarType::Half || st == ScalarType::BFloat16 || st == ScalarType::Float ||
                      st == ScalarType::Double,
                  op, ": values must be float16, bfloat16, float32 or float64, got ", torch::headeronly::toString(st));
  const int64_t N = values.size(0), K = 2 * values.size(1);
  check_layout_shape(l, N, K, st, op);
  check_layout_meta(l, meta, N, K, op);
  STD_TORCH_CHECK(x.scalar_type() == st, op, ": x has dtype ", torch::headeronly::toString(x.scalar_type()),
                  " but the sparse weight has ", torch::headeronly::toString(st));
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) == K, op, ": x must end in K=", K, " features, got shape ",
                  common::shape_str(x));
  std::optional<Tensor> bc;
  if (bias.has_value()) {
    STD_TORCH_CHECK(bias->is_cuda() && bias->get_device_index() == dev, op, ": bias must be on the weight's device");
    STD_TORCH_CHECK(bias->scalar_type() == st, op, ": bias has dtype ", torch::headeronly::toString(bias->scalar_type()),
                    ", expected ", torch::headeronly::toString(st));
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ",
                    common::shape_str(*bias));
    bc = contig(*bias);
  }
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = common::current_stream(dev);

  Tensor xc = contig(x);
  int64_t M = 1;
  std::vector<int64_t> out_sizes;
  for (int64_t d = 0; d + 1 < xc.dim(); ++d) {
    out_sizes.push_back(xc.size(d));
    M *= xc.size(d);
  }
  out_sizes.push_back(N);
  if (M == 0 || N == 0 || K == 0) {
    Tensor y = torch::stable::new_zeros(xc, out_sizes);
    bias_act(y, bc, N, act, dev, stream);
    return y;
  }
  Tensor y = torch::stable::new_empty(xc, out_sizes);
  const Forced forced = forced_kernel();

  if (l != MetaLayout::kCpu && forced != Forced::kFallback) {
    Tensor vc = contig(values);
    Tensor mc = contig(meta);
    GemmArgs a;
    a.x = xc.const_data_ptr();
    a.values = vc.const_data_ptr();
    a.meta = mc.const_data_ptr();
    a.bias = bc ? bc->const_data_ptr() : nullptr;
    a.y = y.mutable_data_ptr();
    a.m = M;
    a.n = N;
    a.k = K;
    a.dtype = st == ScalarType::Half ? GemmDType::kF16 : GemmDType::kBF16;
    a.act = act;
    a.device = dev;
    a.stream = stream;
    const char* why_small = "not tried";
    const char* why_big = "not tried";
    if (forced == Forced::kSmallM || (forced == Forced::kAuto && M <= kSmallMMax)) {
      why_small = gemm_small_m(a, l);
      if (why_small == nullptr) return y;
    }
    if (forced != Forced::kSmallM) {
      const bool f16 = a.dtype == GemmDType::kF16;
      const size_t ws = l == MetaLayout::kSm90 ? gemm_sm90_workspace(a) : gemm_sm80_workspace(a);
      std::optional<Tensor> wst;
      if (ws > 0) {
        wst = torch::stable::new_empty(xc, {static_cast<int64_t>(ws)}, ScalarType::Byte);
        a.workspace = wst->mutable_data_ptr();
        a.workspace_bytes = ws;
      }
      if (l == MetaLayout::kSm90) why_big = f16 ? gemm_sm90_f16(a) : gemm_sm90_bf16(a);
      else why_big = f16 ? gemm_sm80_f16(a) : gemm_sm80_bf16(a);
      if (why_big == nullptr) return y;
    }
    STD_TORCH_CHECK(forced == Forced::kAuto, op, ": SEMISPARSE_SPARSE24_KERNEL forces a kernel that does not fit (M=",
                    M, ", N=", N, ", K=", K, ", layout '", layout, "'): small-M: ", why_small, "; CUTLASS: ", why_big);
  }
  // fallback: dense weight + cuBLAS (its output rounded to the dtype), then bias + activation
  // (so for 16-bit types one more rounding than the fused kernels, as on the CPU)
  Tensor w = unpack_dense(values, meta, layout);
  Tensor x2 = torch::stable::view(xc, {M, K});
  Tensor y2 = torch::stable::matmul(x2, torch::stable::transpose(w, 0, 1));
  y2 = torch::stable::reshape(y2, out_sizes);
  bias_act(y2, bc, N, act, dev, stream);
  return y2;
}

}  // namespace
}  // namespace semisparse::sparse24

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("sparse24_mm", TORCH_BOX(&semisparse::sparse24::mm_cuda));
}
