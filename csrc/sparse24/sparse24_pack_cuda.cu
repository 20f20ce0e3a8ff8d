// CUDA implementations of semisparse::sparse24_pack / sparse24_unpack (schemas, fakes and
// references live in python/semisparse/ops/sparse24.py):
//
//   sparse24_pack(Tensor dense, str layout, bool prune=False) -> (Tensor values, Tensor meta)
//   sparse24_unpack(Tensor values, Tensor meta, str layout) -> Tensor
//
// layout "cpu"          meta uint8 [N, ceil(K/8)], group g in byte g/2 (low nibble for even g)
//        "cutlass_sm80" meta int16 [N, K/16] placed by sm80_meta_word   (N % 32, K % 32 == 0)
//        "cutlass_sm90" meta uint8 [K/64, N/64, 512] placed by sm90_meta_byte (N % 64, K % 64 == 0)
// values [N, K/2] in every layout. Bit-exact with the CPU op: codes from kCodeFromMask of
// the non-zero mask (a group with > 2 non-zeros keeps its first two; the Python layer
// rejects such input unless prune=True), kept zeros of either sign stored as +0; prune
// keeps the 2 largest |value| per group (ties to the lower index, NaN ranks lowest) and
// then encodes dense * mask. Unpack writes +0 at every pruned position.
//
// One thread per metadata unit, grid-stride: "cpu" one meta byte (8 columns), the cutlass
// layouts one 16-bit code word (16 columns of one row). The cutlass kernels walk the meta
// buffer in storage order and map each unit back to its (row, columns) with the inverse
// placement (pack_kernels.cuh), so meta is read / written fully coalesced, and each
// thread's dense (32 B) and values (16 B) accesses are whole 16-byte vectors. Entries are
// handled as raw bits (uint16/32/64). LibTorch stable ABI only.
#include <cstdint>
#include <string>
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
#include "common/stable_tensor.h"
#include "sparse24/meta_layout.h"
#include "sparse24/pack_kernels.cuh"

#if !defined(USE_CUDA)
#error "sparse24_pack_cuda.cu needs USE_CUDA (aoti_torch_get_current_cuda_stream is declared under it)"
#endif

namespace semisparse::sparse24::pack {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr int kThreads = 256;

// ------------------------------------------------------------------ vector access
template <int kBytes>
struct VecType;
template <>
struct VecType<16> {
  using type = uint4;
};
template <>
struct VecType<8> {
  using type = uint2;
};

// NE consecutive entries at p; kVec: p is aligned to min(16, NE * sizeof(T)) bytes.
template <class T, int NE, bool kVec>
__device__ __forceinline__ void load_elems(const T* __restrict__ p, T (&e)[NE]) {
  if constexpr (kVec) {
    constexpr int kBytes = NE * static_cast<int>(sizeof(T));
    constexpr int kW = kBytes >= 16 ? 16 : kBytes;
    static_assert(kBytes % kW == 0 && (kW == 16 || kW == 8), "vector width");
    using V = typename VecType<kW>::type;
    union {
      V v[kBytes / kW];
      T e[NE];
    } u;
#pragma unroll
    for (int i = 0; i < kBytes / kW; ++i) u.v[i] = reinterpret_cast<const V*>(p)[i];
#pragma unroll
    for (int i = 0; i < NE; ++i) e[i] = u.e[i];
  } else {
#pragma unroll
    for (int i = 0; i < NE; ++i) e[i] = p[i];
  }
}

template <class T, int NE, bool kVec>
__device__ __forceinline__ void store_elems(T* __restrict__ p, const T (&e)[NE]) {
  if constexpr (kVec) {
    constexpr int kBytes = NE * static_cast<int>(sizeof(T));
    constexpr int kW = kBytes >= 16 ? 16 : kBytes;
    static_assert(kBytes % kW == 0 && (kW == 16 || kW == 8), "vector width");
    using V = typename VecType<kW>::type;
    union {
      V v[kBytes / kW];
      T e[NE];
    } u;
#pragma unroll
    for (int i = 0; i < NE; ++i) u.e[i] = e[i];
#pragma unroll
    for (int i = 0; i < kBytes / kW; ++i) reinterpret_cast<V*>(p)[i] = u.v[i];
  } else {
#pragma unroll
    for (int i = 0; i < NE; ++i) p[i] = e[i];
  }
}

// G consecutive groups: 4 G entries at src -> 2 G values at dst; returns the codes (group i
// in bits 4i .. 4i+3).
template <class T, int G, bool kVec>
__device__ __forceinline__ unsigned pack_groups(const T* __restrict__ src, T* __restrict__ dst, bool prune, T inf) {
  T e[4 * G];
  load_elems<T, 4 * G, kVec>(src, e);
  T v[2 * G];
  unsigned codes = 0;
#pragma unroll
  for (int i = 0; i < G; ++i)
    codes |= pack_group(e[4 * i], e[4 * i + 1], e[4 * i + 2], e[4 * i + 3], prune, inf, v[2 * i], v[2 * i + 1]) << (4 * i);
  store_elems<T, 2 * G, kVec>(dst, v);
  return codes;
}

template <class T, int G, bool kVec>
__device__ __forceinline__ void unpack_groups(const T* __restrict__ src, unsigned codes, T* __restrict__ dst) {
  T v[2 * G];
  load_elems<T, 2 * G, kVec>(src, v);
  T e[4 * G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    T out[4];
    unpack_group(v[2 * i], v[2 * i + 1], (codes >> (4 * i)) & 15u, out);
#pragma unroll
    for (int j = 0; j < 4; ++j) e[4 * i + j] = out[j];
  }
  store_elems<T, 4 * G, kVec>(dst, e);
}

// ------------------------------------------------------------------------ kernels
// "cpu": p = meta byte index (row r = p / mc, byte jb = p % mc: groups 2 jb, 2 jb + 1; the
// second is absent in a row's last byte when K / 4 is odd, its nibble stays 0). kVec needs
// K % 8 == 0 (then every byte has both groups) and 16-byte aligned bases.
template <class T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    pack_cpu_kernel(const T* __restrict__ dense, T* __restrict__ values, uint8_t* __restrict__ meta, int64_t n,
                    int64_t k, int64_t mc, bool prune, T inf) {
  const int64_t groups = k / 4, total = n * mc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
    const int64_t r = p / mc, g = 2 * (p - r * mc);
    const T* src = dense + r * k + 4 * g;
    T* dst = values + r * (k / 2) + 2 * g;
    unsigned byte;
    if (kVec || g + 1 < groups)
      byte = pack_groups<T, 2, kVec>(src, dst, prune, inf);
    else
      byte = pack_groups<T, 1, false>(src, dst, prune, inf);
    meta[p] = static_cast<uint8_t>(byte);
  }
}

template <class T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    unpack_cpu_kernel(const T* __restrict__ values, const uint8_t* __restrict__ meta, T* __restrict__ dense, int64_t n,
                      int64_t k, int64_t mc) {
  const int64_t groups = k / 4, total = n * mc;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total; p += stride) {
    const int64_t r = p / mc, g = 2 * (p - r * mc);
    const unsigned byte = meta[p];
    const T* src = values + r * (k / 2) + 2 * g;
    T* dst = dense + r * k + 4 * g;
    if (kVec || g + 1 < groups)
      unpack_groups<T, 2, kVec>(src, byte, dst);
    else
      unpack_groups<T, 1, false>(src, byte, dst);
  }
}

// cutlass layouts (16-bit entries): q = index of the 16-bit code unit in the meta buffer
// (sm80: int16 word; sm90: byte pair 2q, 2q+1), mapped back to (row, 16-column chunk).
template <MetaLayout L>
__device__ __forceinline__ RowChunk unit_coords(int64_t q, int64_t n) {
  if constexpr (L == MetaLayout::kSm80)
    return sm80_word_coords(q, n);
  else
    return sm90_pair_coords(q, n);
}

template <MetaLayout L, bool kVec>
__global__ void __launch_bounds__(kThreads)
    pack_cutlass_kernel(const uint16_t* __restrict__ dense, uint16_t* __restrict__ values, uint16_t* __restrict__ meta,
                        int64_t n, int64_t k, bool prune, uint16_t inf) {
  const int64_t total = n * (k / 16);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const RowChunk rc = unit_coords<L>(q, n);
    meta[q] = static_cast<uint16_t>(
        pack_groups<uint16_t, 4, kVec>(dense + rc.r * k + 16 * rc.c, values + rc.r * (k / 2) + 8 * rc.c, prune, inf));
  }
}

template <MetaLayout L, bool kVec>
__global__ void __launch_bounds__(kThreads)
    unpack_cutlass_kernel(const uint16_t* __restrict__ values, const uint16_t* __restrict__ meta,
                          uint16_t* __restrict__ dense, int64_t n, int64_t k) {
  const int64_t total = n * (k / 16);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < total; q += stride) {
    const RowChunk rc = unit_coords<L>(q, n);
    unpack_groups<uint16_t, 4, kVec>(values + rc.r * (k / 2) + 8 * rc.c, meta[q], dense + rc.r * k + 16 * rc.c);
  }
}

// ------------------------------------------------------------------ launching
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t work, int32_t device_index) {
  return common::grid_for(work, device_index, kThreads, 16);
}

template <class T>
void launch_pack_cpu(const void* dense, void* values, uint8_t* meta, int64_t n, int64_t k, bool prune, T inf,
                     int32_t dev) {
  const int64_t mc = (k + 7) / 8;
  const unsigned grid = grid_for(n * mc, dev);
  cudaStream_t stream = common::current_stream(dev);
  const T* d = static_cast<const T*>(dense);
  T* v = static_cast<T*>(values);
  if (k % 8 == 0 && aligned16(d) && aligned16(v))
    pack_cpu_kernel<T, true><<<grid, kThreads, 0, stream>>>(d, v, meta, n, k, mc, prune, inf);
  else
    pack_cpu_kernel<T, false><<<grid, kThreads, 0, stream>>>(d, v, meta, n, k, mc, prune, inf);
  common::check_launch("sparse24_pack");
}

template <class T>
void launch_unpack_cpu(const void* values, const uint8_t* meta, void* dense, int64_t n, int64_t k, int32_t dev) {
  const int64_t mc = (k + 7) / 8;
  const unsigned grid = grid_for(n * mc, dev);
  cudaStream_t stream = common::current_stream(dev);
  const T* v = static_cast<const T*>(values);
  T* d = static_cast<T*>(dense);
  if (k % 8 == 0 && aligned16(d) && aligned16(v))
    unpack_cpu_kernel<T, true><<<grid, kThreads, 0, stream>>>(v, meta, d, n, k, mc);
  else
    unpack_cpu_kernel<T, false><<<grid, kThreads, 0, stream>>>(v, meta, d, n, k, mc);
  common::check_launch("sparse24_unpack");
}

template <MetaLayout L>
void launch_pack_cutlass(const void* dense, void* values, void* meta, int64_t n, int64_t k, bool prune, uint16_t inf,
                         int32_t dev) {
  const unsigned grid = grid_for(n * (k / 16), dev);
  cudaStream_t stream = common::current_stream(dev);
  const auto* d = static_cast<const uint16_t*>(dense);
  auto* v = static_cast<uint16_t*>(values);
  auto* m = static_cast<uint16_t*>(meta);
  if (aligned16(d) && aligned16(v))
    pack_cutlass_kernel<L, true><<<grid, kThreads, 0, stream>>>(d, v, m, n, k, prune, inf);
  else
    pack_cutlass_kernel<L, false><<<grid, kThreads, 0, stream>>>(d, v, m, n, k, prune, inf);
  common::check_launch("sparse24_pack");
}

template <MetaLayout L>
void launch_unpack_cutlass(const void* values, const void* meta, void* dense, int64_t n, int64_t k, int32_t dev) {
  const unsigned grid = grid_for(n * (k / 16), dev);
  cudaStream_t stream = common::current_stream(dev);
  const auto* v = static_cast<const uint16_t*>(values);
  const auto* m = static_cast<const uint16_t*>(meta);
  auto* d = static_cast<uint16_t*>(dense);
  if (aligned16(d) && aligned16(v))
    unpack_cutlass_kernel<L, true><<<grid, kThreads, 0, stream>>>(v, m, d, n, k);
  else
    unpack_cutlass_kernel<L, false><<<grid, kThreads, 0, stream>>>(v, m, d, n, k);
  common::check_launch("sparse24_unpack");
}

// ------------------------------------------------------------------- checking
const char* layout_name(MetaLayout l) {
  return l == MetaLayout::kCpu ? "cpu" : l == MetaLayout::kSm80 ? "cutlass_sm80" : "cutlass_sm90";
}

MetaLayout parse_layout(const std::string& s, const char* op) {
  if (s == "cpu") return MetaLayout::kCpu;
  if (s == "cutlass_sm80") return MetaLayout::kSm80;
  if (s == "cutlass_sm90") return MetaLayout::kSm90;
  STD_TORCH_CHECK(false, op, ": unknown layout '", s, "' (expected 'cpu', 'cutlass_sm80' or 'cutlass_sm90')");
  return MetaLayout::kCpu;
}

std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Short: return "int16";
    default: return torch::headeronly::toString(t);
  }
}

// The entry dtype a layout accepts: fp16 / bf16 for the cutlass layouts, also fp32 / fp64 for "cpu".
void check_entry_dtype(ScalarType t, MetaLayout l, const char* op, const char* what) {
  const bool half = t == ScalarType::Half || t == ScalarType::BFloat16;
  if (l == MetaLayout::kCpu) {
    STD_TORCH_CHECK(half || t == ScalarType::Float || t == ScalarType::Double, op, ": layout 'cpu' needs ", what,
                    " of dtype float32, float16, bfloat16 or float64, got ", dtype_name(t));
  } else {
    STD_TORCH_CHECK(half, op, ": layout '", layout_name(l), "' needs ", what, " of dtype float16 or bfloat16, got ",
                    dtype_name(t));
  }
}

void check_shape(int64_t n, int64_t k, MetaLayout l, const char* op) {
  if (l == MetaLayout::kCpu) {
    STD_TORCH_CHECK(k % 4 == 0, op, ": layout 'cpu' needs K a multiple of 4, got K=", k);
    return;
  }
  const int64_t rm = l == MetaLayout::kSm80 ? kSm80RowMultiple : kSm90RowMultiple;
  const int64_t cm = l == MetaLayout::kSm80 ? kSm80ColMultiple : kSm90ColMultiple;
  STD_TORCH_CHECK(n % rm == 0, op, ": layout '", layout_name(l), "' needs N a multiple of ", rm, ", got N=", n);
  STD_TORCH_CHECK(k % cm == 0, op, ": layout '", layout_name(l), "' needs K a multiple of ", cm, ", got K=", k);
}

// raw bits of +inf for the prune rank
uint64_t inf_bits(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return 0x7c00u;
    case ScalarType::BFloat16: return 0x7f80u;
    case ScalarType::Float: return 0x7f800000u;
    default: return 0x7ff0000000000000ull;
  }
}

// ------------------------------------------------------------------------ ops
std::tuple<Tensor, Tensor> pack_cuda(Tensor dense, std::string layout, bool prune) {
  const char* op = "sparse24_pack";
  const MetaLayout l = parse_layout(layout, op);
  STD_TORCH_CHECK(dense.is_cuda(), op, ": dense must be a CUDA tensor for this kernel");
  STD_TORCH_CHECK(dense.dim() == 2, op, ": dense must be 2-D [N, K], got ", dense.dim(), " dims");
  const ScalarType st = dense.scalar_type();
  check_entry_dtype(st, l, op, "dense");
  const int64_t n = dense.size(0), k = dense.size(1);
  check_shape(n, k, l, op);

  const int32_t dev = dense.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor dc = common::contig(dense);
  Tensor values = torch::stable::new_empty(dc, {n, k / 2});
  Tensor meta = l == MetaLayout::kCpu    ? torch::stable::new_empty(dc, {n, (k + 7) / 8}, ScalarType::Byte)
                : l == MetaLayout::kSm80 ? torch::stable::new_empty(dc, {n, k / 16}, ScalarType::Short)
                                         : torch::stable::new_empty(dc, {k / 64, n / 64, 512}, ScalarType::Byte);
  if (n > 0 && k > 0) {
    const void* d = dc.const_data_ptr();
    void* v = values.mutable_data_ptr();
    void* m = meta.mutable_data_ptr();
    const uint64_t inf = inf_bits(st);
    if (l == MetaLayout::kCpu) {
      auto* mb = static_cast<uint8_t*>(m);
      switch (st) {
        case ScalarType::Double: launch_pack_cpu<uint64_t>(d, v, mb, n, k, prune, inf, dev); break;
        case ScalarType::Float: launch_pack_cpu<uint32_t>(d, v, mb, n, k, prune, static_cast<uint32_t>(inf), dev); break;
        default: launch_pack_cpu<uint16_t>(d, v, mb, n, k, prune, static_cast<uint16_t>(inf), dev); break;
      }
    } else if (l == MetaLayout::kSm80) {
      launch_pack_cutlass<MetaLayout::kSm80>(d, v, m, n, k, prune, static_cast<uint16_t>(inf), dev);
    } else {
      launch_pack_cutlass<MetaLayout::kSm90>(d, v, m, n, k, prune, static_cast<uint16_t>(inf), dev);
    }
  }
  return std::make_tuple(values, meta);
}

Tensor unpack_cuda(Tensor values, Tensor meta, std::string layout) {
  const char* op = "sparse24_unpack";
  const MetaLayout l = parse_layout(layout, op);
  STD_TORCH_CHECK(values.is_cuda() && meta.is_cuda(), op, ": values and meta must be CUDA tensors for this kernel");
  STD_TORCH_CHECK(values.get_device_index() == meta.get_device_index(), op,
                  ": values and meta must be on the same CUDA device, got cuda:", values.get_device_index(),
                  " and cuda:", meta.get_device_index());
  STD_TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.dim(), " dims");
  const ScalarType st = values.scalar_type();
  check_entry_dtype(st, l, op, "values");
  const int64_t n = values.size(0), k = 2 * values.size(1);
  check_shape(n, k, l, op);

  const ScalarType want_meta = l == MetaLayout::kSm80 ? ScalarType::Short : ScalarType::Byte;
  STD_TORCH_CHECK(meta.scalar_type() == want_meta, op, ": layout '", layout_name(l), "' needs meta of dtype ",
                  dtype_name(want_meta), ", got ", dtype_name(meta.scalar_type()));
  if (l == MetaLayout::kSm90) {
    STD_TORCH_CHECK(meta.dim() == 3 && meta.size(0) == k / 64 && meta.size(1) == n / 64 && meta.size(2) == 512, op,
                    ": layout 'cutlass_sm90' needs meta of shape (K/64, N/64, 512) = (", k / 64, ", ", n / 64,
                    ", 512), got ", common::shape_str(meta));
  } else {
    const int64_t cols = l == MetaLayout::kCpu ? (k + 7) / 8 : k / 16;
    STD_TORCH_CHECK(meta.dim() == 2 && meta.size(0) == n && meta.size(1) == cols, op, ": layout '", layout_name(l),
                    "' needs meta of shape ", l == MetaLayout::kCpu ? "(N, ceil(K/8))" : "(N, K/16)", " = (", n, ", ",
                    cols, "), got ", common::shape_str(meta));
  }

  const int32_t dev = values.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(dev);
  Tensor vc = common::contig(values);
  Tensor mc = common::contig(meta);
  // the cutlass kernels read 16-bit code units: a byte buffer at an odd address gets a fresh copy
  if (l == MetaLayout::kSm90 && reinterpret_cast<uintptr_t>(mc.const_data_ptr()) % 2 != 0)
    mc = torch::stable::clone(mc);
  Tensor dense = torch::stable::new_empty(vc, {n, k});
  if (n > 0 && k > 0) {
    const void* v = vc.const_data_ptr();
    const void* m = mc.const_data_ptr();
    void* d = dense.mutable_data_ptr();
    if (l == MetaLayout::kCpu) {
      const auto* mb = static_cast<const uint8_t*>(m);
      switch (st) {
        case ScalarType::Double: launch_unpack_cpu<uint64_t>(v, mb, d, n, k, dev); break;
        case ScalarType::Float: launch_unpack_cpu<uint32_t>(v, mb, d, n, k, dev); break;
        default: launch_unpack_cpu<uint16_t>(v, mb, d, n, k, dev); break;
      }
    } else if (l == MetaLayout::kSm80) {
      launch_unpack_cutlass<MetaLayout::kSm80>(v, m, d, n, k, dev);
    } else {
      launch_unpack_cutlass<MetaLayout::kSm90>(v, m, d, n, k, dev);
    }
  }
  return dense;
}

}  // namespace
}  // namespace semisparse::sparse24::pack

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("sparse24_pack", TORCH_BOX(&semisparse::sparse24::pack::pack_cuda));
  m.impl("sparse24_unpack", TORCH_BOX(&semisparse::sparse24::pack::unpack_cuda));
}
