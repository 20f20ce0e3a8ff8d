// Launch helpers shared by the CUDA front ends (sparse24_cuda.cu, gumbel_cuda.cu): the
// current stream through the stable ABI, a grid size for grid-stride kernels, and the
// launch-error check. Needs USE_CUDA (aoti_torch_get_current_cuda_stream is declared under it).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/headeronly/util/Exception.h>

#if !defined(USE_CUDA)
#error "common/cuda_launch.cuh needs USE_CUDA (aoti_torch_get_current_cuda_stream is declared under it)"
#endif

namespace semisparse::common {

inline cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "semisparse: could not get the current CUDA stream of device ", device_index);
  return static_cast<cudaStream_t>(stream);
}

// Blocks of `threads` for `work` items, capped at blocks_per_sm per multiprocessor (the
// kernels grid-stride beyond that).
inline unsigned grid_for(int64_t work, int32_t device_index, int threads, int blocks_per_sm) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // clear it; fall back to a fixed count
    sms = 128;
  }
  const int64_t blocks = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sms) * blocks_per_sm;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "semisparse: ", op, " CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

}  // namespace semisparse::common
