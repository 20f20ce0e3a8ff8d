// The CUDA 2:4 GEMM kernels behind semisparse::sparse24_mm (front end:
// sparse24_gemm_cuda.cu). Each kernel lives in its own translation unit so CI compiles
// stay short; this header is the only thing they share with the front end.
//
//   y[M, N] = act(x[M, K] @ W^T + bias[N])
//
// x, y row-major and contiguous (ld K and N); W [N, K] 2:4 sparse: values [N, K/2]
// row-major (the kept entries of each group of 4, in column order) and meta in the
// kernel's layout (meta_layout.h); bias optional (nullptr); fp16 or bf16 everywhere with
// fp32 accumulation; the activation is applied in the epilogue after the bias.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "sparse24/meta_layout.h"

namespace semisparse::sparse24 {

enum class GemmDType : int { kF16 = 0, kBF16 = 1 };

struct GemmArgs {
  const void* x = nullptr;
  const void* values = nullptr;
  const void* meta = nullptr;
  const void* bias = nullptr;  // [N] or nullptr
  void* y = nullptr;
  int64_t m = 0, n = 0, k = 0;
  GemmDType dtype = GemmDType::kBF16;
  Activation act = Activation::kNone;
  int device = 0;
  cudaStream_t stream = nullptr;
  void* workspace = nullptr;  // device memory of gemm_*_workspace() bytes (may be nullptr when 0)
  size_t workspace_bytes = 0;
};

// Every entry point returns nullptr when it launched, or a static message saying why it
// does not fit (shape, alignment, architecture, built without CUTLASS): then nothing was
// launched and the caller picks another kernel. CUDA launch / CUTLASS run errors throw
// (STD_TORCH_CHECK).

// CUTLASS 2.x SparseGemm (sm80 .. sm90), meta layout cutlass_sm80. gemm_sm80_f16.cu / _bf16.cu.
const char* gemm_sm80_f16(const GemmArgs& a);
const char* gemm_sm80_bf16(const GemmArgs& a);
size_t gemm_sm80_workspace(const GemmArgs& a);

// CUTLASS 3.x warp-specialized sparse GEMM (sm90a only), meta layout cutlass_sm90.
// gemm_sm90_f16.cu / _bf16.cu.
const char* gemm_sm90_f16(const GemmArgs& a);
const char* gemm_sm90_bf16(const GemmArgs& a);
size_t gemm_sm90_workspace(const GemmArgs& a);

// Memory-bound kernel for M <= 16 (decode): streams values + meta once, expands in
// registers, reduces over K. Reads meta in either GPU layout. sparse24_small_m.cu.
constexpr int64_t kSmallMMax = 16;
const char* gemm_small_m(const GemmArgs& a, MetaLayout layout);

}  // namespace semisparse::sparse24
