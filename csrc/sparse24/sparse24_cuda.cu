// CUDA implementations of semisparse::sparse24_compress / sparse24_decompress (schemas are
// defined once, in python/semisparse/ops/sparse24.py). Same "cpu" layout and bit-exact
// output as the CPU kernels in sparse24_cpu_generic.cpp (see sparse24_cpu.h):
//   values [N, K/2], meta uint8 [N, ceil(K/8)], code idx0 | idx1 << 2 per group from
//   kCodeFromMask, group g in byte g/2 (low nibble for even g), zeros of either sign
//   stored as +0.0.
// LibTorch stable ABI only (no torch/extension.h, no ATen): see DESIGN.md "Build facts".
//
// One thread per meta byte (two groups of 4): it reads 8 dense entries, writes 4 values
// and 1 meta byte (compress), or the reverse (decompress). Adjacent threads touch
// adjacent bytes, so every access is coalesced; loops are grid-stride. Entries are
// handled as raw bits (uint16/32/64), so copies are exact and "zero of either sign" is
// "all bits but the sign bit zero", exactly as on the CPU.
#include <cstdint>
#include <tuple>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/cuda_launch.cuh"
#include "sparse24/sparse24_checks.h"
#include "sparse24/sparse24_cpu.h"  // DType, kCodeFromMask (plain C++, shared with the CPU)

#if !defined(USE_CUDA)
#error "sparse24_cuda.cu needs USE_CUDA (aoti_torch_get_current_cuda_stream is declared under it)"
#endif

namespace semisparse::sparse24 {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// ------------------------------------------------------------------ code table
// kCodeFromMask packed into one 64-bit constant (nibble m = code of mask m): usable in
// device code without a __constant__ copy, and the table keeps a single definition.
constexpr uint64_t pack_code_table() {
  uint64_t p = 0;
  for (int m = 0; m < 16; ++m) p |= static_cast<uint64_t>(kCodeFromMask[m] & 15u) << (4 * m);
  return p;
}
constexpr uint64_t kPackedCodes = pack_code_table();
static_assert(((kPackedCodes >> (4 * 0b0101)) & 15u) == (0u | (2u << 2)), "code table packing");

__device__ __forceinline__ unsigned code_from_mask(unsigned mask) {
  return static_cast<unsigned>(kPackedCodes >> (4u * mask)) & 15u;
}

// ---------------------------------------------------------------- raw-bit helpers
template <class T>
__device__ __forceinline__ bool is_nonzero(T v) {
  constexpr T kMagnitude = static_cast<T>(~(T(1) << (8 * sizeof(T) - 1)));
  return (v & kMagnitude) != 0;
}

template <class T>
__device__ __forceinline__ T pick4(T e0, T e1, T e2, T e3, unsigned i) {
  // selects rather than a dynamically indexed array (which would go to local memory)
  return i == 0 ? e0 : i == 1 ? e1 : i == 2 ? e2 : e3;
}

template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};
template <class T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

// One group: q -> 2 values at v; returns the 4-bit code.
template <class T, bool kVec>
__device__ __forceinline__ unsigned compress_group(const T* __restrict__ q, T* __restrict__ v) {
  T e0, e1, e2, e3;
  if constexpr (kVec) {
    const Quad<T> x = *reinterpret_cast<const Quad<T>*>(q);
    e0 = x.v[0], e1 = x.v[1], e2 = x.v[2], e3 = x.v[3];
  } else {
    e0 = q[0], e1 = q[1], e2 = q[2], e3 = q[3];
  }
  const unsigned mask = unsigned(is_nonzero(e0)) | unsigned(is_nonzero(e1)) << 1 |
                        unsigned(is_nonzero(e2)) << 2 | unsigned(is_nonzero(e3)) << 3;
  const unsigned code = code_from_mask(mask);
  const T a = pick4(e0, e1, e2, e3, code & 3u);
  const T b = pick4(e0, e1, e2, e3, code >> 2);
  Pair<T> out;
  out.v[0] = is_nonzero(a) ? a : T(0);
  out.v[1] = is_nonzero(b) ? b : T(0);
  if constexpr (kVec) {
    *reinterpret_cast<Pair<T>*>(v) = out;
  } else {
    v[0] = out.v[0];
    v[1] = out.v[1];
  }
  return code;
}

// One group: 2 values at v + 4-bit code -> 4 dense entries at w. The second index is
// written last, as on the CPU, so even a code with idx0 == idx1 decodes identically.
template <class T, bool kVec>
__device__ __forceinline__ void decompress_group(const T* __restrict__ v, unsigned code,
                                                 T* __restrict__ w) {
  T a, b;
  if constexpr (kVec) {
    const Pair<T> x = *reinterpret_cast<const Pair<T>*>(v);
    a = x.v[0], b = x.v[1];
  } else {
    a = v[0], b = v[1];
  }
  const unsigned i0 = code & 3u, i1 = code >> 2;
  Quad<T> out;
#pragma unroll
  for (unsigned i = 0; i < 4; ++i) out.v[i] = i == i1 ? b : i == i0 ? a : T(0);
  if constexpr (kVec) {
    *reinterpret_cast<Quad<T>*>(w) = out;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = out.v[i];
  }
}

constexpr int kThreads = 256;

// p indexes meta bytes: row r = p / meta_cols, byte c = p % meta_cols, groups 2c, 2c+1
// (the second absent in the last byte of a row when K/4 is odd: its nibble stays 0).
template <class T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    compress_kernel(const T* __restrict__ dense, T* __restrict__ values,
                    uint8_t* __restrict__ meta, int64_t N, int64_t K, int64_t meta_cols) {
  const int64_t groups = K / 4;
  const int64_t total = N * meta_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += stride) {
    const int64_t r = p / meta_cols;
    const int64_t g = 2 * (p - r * meta_cols);
    const T* q = dense + r * K + 4 * g;
    T* v = values + r * (K / 2) + 2 * g;
    unsigned byte = compress_group<T, kVec>(q, v);
    if (g + 1 < groups) byte |= compress_group<T, kVec>(q + 4, v + 2) << 4;
    meta[p] = static_cast<uint8_t>(byte);
  }
}

template <class T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    decompress_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta,
                      T* __restrict__ dense, int64_t N, int64_t K, int64_t meta_cols) {
  const int64_t groups = K / 4;
  const int64_t total = N * meta_cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += stride) {
    const int64_t r = p / meta_cols;
    const int64_t g = 2 * (p - r * meta_cols);
    const unsigned byte = meta[p];
    const T* v = values + r * (K / 2) + 2 * g;
    T* w = dense + r * K + 4 * g;
    decompress_group<T, kVec>(v, byte & 15u, w);
    if (g + 1 < groups) decompress_group<T, kVec>(v + 2, byte >> 4, w + 4);
  }
}

// ------------------------------------------------------------------ launching
using common::check_launch;
using common::current_stream;

unsigned grid_for(int64_t work, int32_t device_index) {
  return common::grid_for(work, device_index, kThreads, 32);
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <class T>
void launch_compress(const void* dense, void* values, uint8_t* meta, int64_t N, int64_t K,
                     int64_t meta_cols, int32_t device_index) {
  const int64_t work = N * meta_cols;
  const unsigned grid = grid_for(work, device_index);
  cudaStream_t stream = current_stream(device_index);
  const T* d = static_cast<const T*>(dense);
  T* v = static_cast<T*>(values);
  // rows of dense start at multiples of 4 entries and rows of values at multiples of 2
  // (K % 4 == 0), so aligned bases make every group access aligned.
  if (aligned(d, 4 * sizeof(T)) && aligned(v, 2 * sizeof(T)))
    compress_kernel<T, true><<<grid, kThreads, 0, stream>>>(d, v, meta, N, K, meta_cols);
  else
    compress_kernel<T, false><<<grid, kThreads, 0, stream>>>(d, v, meta, N, K, meta_cols);
  check_launch("sparse24_compress");
}

template <class T>
void launch_decompress(const void* values, const uint8_t* meta, void* dense, int64_t N, int64_t K,
                       int64_t meta_cols, int32_t device_index) {
  const int64_t work = N * meta_cols;
  const unsigned grid = grid_for(work, device_index);
  cudaStream_t stream = current_stream(device_index);
  const T* v = static_cast<const T*>(values);
  T* d = static_cast<T*>(dense);
  if (aligned(d, 4 * sizeof(T)) && aligned(v, 2 * sizeof(T)))
    decompress_kernel<T, true><<<grid, kThreads, 0, stream>>>(v, meta, d, N, K, meta_cols);
  else
    decompress_kernel<T, false><<<grid, kThreads, 0, stream>>>(v, meta, d, N, K, meta_cols);
  check_launch("sparse24_decompress");
}

// ------------------------------------------------------------------- checking
void check_cuda(const Tensor& t, const char* what) {
  STD_TORCH_CHECK(t.is_cuda(), "semisparse: ", what, " must be a CUDA tensor for this kernel");
}

void check_compressed_cuda(const Tensor& values, const Tensor& meta) {
  STD_TORCH_CHECK(values.get_device_index() == meta.get_device_index(),
                  "semisparse: values and meta must be on the same CUDA device, got cuda:",
                  values.get_device_index(), " and cuda:", meta.get_device_index());
  check_compressed(values, meta);
}

// ------------------------------------------------------------------------ ops
// Non-contiguous inputs are copied to contiguous ones first, as on the CPU.
std::tuple<Tensor, Tensor> compress_cuda(Tensor dense) {
  check_cuda(dense, "dense");
  STD_TORCH_CHECK(dense.dim() == 2, "semisparse: dense must be 2-D, got ", dense.dim(), " dims");
  const DType t = to_dtype(dense, "dense");
  const int64_t N = dense.size(0), K = dense.size(1);
  STD_TORCH_CHECK(K % 4 == 0, "semisparse: the last dim must be a multiple of 4, got ", K);
  const int32_t dev = dense.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dc = torch::stable::contiguous(dense);
  Tensor values = torch::stable::new_empty(dc, {N, K / 2});
  Tensor meta = torch::stable::new_empty(dc, {N, meta_cols_for(K)}, ScalarType::Byte);
  if (N > 0 && K > 0) {
    const void* d = dc.const_data_ptr();
    void* v = values.mutable_data_ptr();
    auto* m = static_cast<uint8_t*>(meta.mutable_data_ptr());
    const int64_t mc = meta_cols_for(K);
    switch (t) {
      case DType::F64: launch_compress<uint64_t>(d, v, m, N, K, mc, dev); break;
      case DType::F32: launch_compress<uint32_t>(d, v, m, N, K, mc, dev); break;
      default: launch_compress<uint16_t>(d, v, m, N, K, mc, dev); break;
    }
  }
  return std::make_tuple(values, meta);
}

Tensor decompress_cuda(Tensor values, Tensor meta) {
  check_cuda(values, "values");
  check_cuda(meta, "meta");
  check_compressed_cuda(values, meta);
  const DType t = to_dtype(values, "values");
  const int64_t N = values.size(0), K = 2 * values.size(1);
  const int32_t dev = values.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor vc = torch::stable::contiguous(values);
  Tensor mc = torch::stable::contiguous(meta);
  Tensor dense = torch::stable::new_empty(vc, {N, K});
  if (N > 0 && K > 0) {
    const void* v = vc.const_data_ptr();
    const auto* m = static_cast<const uint8_t*>(mc.const_data_ptr());
    void* d = dense.mutable_data_ptr();
    const int64_t cols = mc.size(1);
    switch (t) {
      case DType::F64: launch_decompress<uint64_t>(v, m, d, N, K, cols, dev); break;
      case DType::F32: launch_decompress<uint32_t>(v, m, d, N, K, cols, dev); break;
      default: launch_decompress<uint16_t>(v, m, d, N, K, cols, dev); break;
    }
  }
  return dense;
}

}  // namespace
}  // namespace semisparse::sparse24

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("sparse24_compress", TORCH_BOX(&semisparse::sparse24::compress_cuda));
  m.impl("sparse24_decompress", TORCH_BOX(&semisparse::sparse24::decompress_cuda));
}
