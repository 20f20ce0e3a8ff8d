// CUDA implementations of semisparse::block_sparse_attention{,_backward} (schemas, fakes,
// autograd and the pure-torch references live in python/semisparse/ops/block_attention.py;
// the CPU kernels in block_attention_cpu*.cpp). LibTorch stable ABI only.
//
// This file: the front end (the argument checks of block_attention_checks.h, contiguous
// copies, DeviceGuard, the current stream), the choice of kernel, the work-list builder of
// the tensor-core path and the SIMT fallback kernels.
//
//   path         when                                                     kernels
//   flash        fp16 / bf16, D == Dv in {64, 128}, block_q and block_k   block_attention_{fwd,bwd}_cuda.cu
//                multiples of 16, 16-byte aligned data, sm80+ with        (block_attention_flash.cuh)
//                enough shared memory
//   simt         everything else (fp32, fp64, other head dims or blocks)  below
//
// SEMISPARSE_BLOCK_ATTENTION_KERNEL=auto|flash|simt forces a path (tests, benchmarks); a
// forced flash that does not fit raises, naming the reason.
//
// Work lists (flash path): build_list_kernel compacts block_mask, once per call, into per
// (mask batch, mask head, outer tile) lists of active inner tiles (pair_info in the .cuh;
// one warp per list row, ballot + popc compaction, entries in increasing order with a
// "partial" flag). The kernels then loop over active tiles only -- with 90% of the blocks
// empty that is a tenth of the iterations a bit-testing loop would run, each with a
// warp-uniform trip count and no per-tile mask reads for full tiles -- and a mask that
// broadcasts over batch / heads gives one list shared by all of them. The forward uses the
// 128 x 64 list (query tile -> key tiles); the backward a 64 x 64 list for dq and its
// transpose (key tile -> query tiles) for dk / dv.
//
// SIMT fallback (no speed target; exact semantics): one warp per query row (forward, dq)
// or per key row (dk / dv, over the query heads of its GQA group), 32 keys (queries) at a
// time -- lane = key: its score by a dot product, then a warp max / sum for the online
// softmax -- and the output accumulated with lane = feature in a global fp32 (fp64 for
// fp64) scratch row. Arithmetic in fp32 (fp64 for fp64 inputs). Deterministic.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "blocksparse/block_attention_checks.h"
#include "blocksparse/block_attention_flash.cuh"
#include "common/cuda_launch.cuh"
#include "common/stable_tensor.h"

namespace semisparse::blockattn::cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using common::contig;
namespace fl = semisparse::blockattn::flash;

enum class DType { F32, BF16, F16, F64 };

struct Shape {
  DType dt;
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk, nqb, nkb, mB, mH;
  double scale;
  bool causal;
  int32_t dev;
};

std::string dev_str(const Tensor& t) {
  return t.is_cuda() ? "cuda:" + std::to_string(t.get_device_index()) : std::string("cpu");
}

// The shared checks of block_attention_checks.h, for CUDA tensors on one device.
Shape check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, int64_t block_q,
            int64_t block_k, double scale, bool causal) {
  Shape s{};
  checks::check_shapes(s, op, q, k, v, mask, block_q, block_k, scale, causal, [&] {
    STD_TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && mask.is_cuda(), op,
                    ": all tensors must be CUDA tensors for this kernel, got q on ", dev_str(q), ", k on ",
                    dev_str(k), ", v on ", dev_str(v), ", block_mask on ", dev_str(mask));
    s.dev = q.get_device_index();
    STD_TORCH_CHECK(k.get_device_index() == s.dev && v.get_device_index() == s.dev &&
                        mask.get_device_index() == s.dev,
                    op, ": q, k, v and block_mask must be on one device, got ", dev_str(q), ", ", dev_str(k), ", ",
                    dev_str(v), ", ", dev_str(mask));
  });
  return s;
}

void check_same(const char* op, const char* what, const Tensor& t, const std::vector<int64_t>& shape, int32_t dev) {
  checks::check_same(op, what, t, shape);
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == dev, op, ": ", what, " must be on q's device cuda:", dev,
                  ", got ", dev_str(t));
}

// ------------------------------------------------------------------ kernel choice
enum class Forced { kAuto, kFlash, kSimt };

Forced forced_kernel() {
  const char* e = std::getenv("SEMISPARSE_BLOCK_ATTENTION_KERNEL");
  if (e == nullptr || *e == '\0' || std::strcmp(e, "auto") == 0) return Forced::kAuto;
  if (std::strcmp(e, "flash") == 0) return Forced::kFlash;
  if (std::strcmp(e, "simt") == 0) return Forced::kSimt;
  STD_TORCH_CHECK(false, "SEMISPARSE_BLOCK_ATTENTION_KERNEL must be auto, flash or simt, got '", e, "'");
  return Forced::kAuto;
}

struct DeviceInfo {
  int cc_major = 0;
  int smem_optin = 0;
};

DeviceInfo device_info(int32_t dev) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];  // filled once per device; racing writers store equal values
  if (dev >= 0 && dev < kMaxDevices && cache[dev].cc_major > 0) return cache[dev];
  DeviceInfo d;
  if (cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceInfo{};
  }
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = d;
  return d;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// nullptr when the tensor-core path takes the problem, else why not.
const char* flash_unfit(const Shape& s, const std::vector<const void*>& ptrs, bool backward) {
  if (s.dt != DType::F16 && s.dt != DType::BF16) return "needs float16 or bfloat16";
  if (s.D != s.Dv || (s.D != 64 && s.D != 128)) return "needs head dims D == Dv in {64, 128}";
  if (s.bq % 16 != 0 || s.bk % 16 != 0) return "needs block_q and block_k multiples of 16";
  for (const void* p : ptrs)
    if (!aligned16(p)) return "needs 16-byte aligned q, k, v (and out, grad_out)";
  const DeviceInfo d = device_info(s.dev);
  if (d.cc_major < 8) return "needs a device of compute capability 8.0 or newer";
  const size_t smem = backward ? std::max(fl::dq_smem_bytes(int(s.D)), fl::dkdv_smem_bytes(int(s.D)))
                               : fl::fwd_smem_bytes(int(s.D));
  if (size_t(d.smem_optin) < smem) return "needs more shared memory per block than the device offers";
  const int64_t kMaxGrid = (int64_t(1) << 31) - 1;
  const int64_t nkt = fl::cdiv(s.Lk, fl::kBN), nqt = fl::cdiv(s.Lq, fl::kBwdBM);
  if (s.B * s.Hq * nqt > kMaxGrid || s.B * s.Hkv * nkt > kMaxGrid) return "needs fewer than 2^31 CTAs";
  if (s.mB * s.mH * nqt * nkt > kMaxGrid) return "needs work lists of fewer than 2^31 entries";
  return nullptr;
}

// ------------------------------------------------------------------ work lists
struct ListArgs {
  const bool* mask;
  fl::Geometry geo;
  int64_t TM, TN, rows, n_outer, n_inner;
  bool transposed;  // outer = key tiles, inner = query tiles
  int32_t* cnt;
  uint32_t* idx;
};

__global__ void __launch_bounds__(256) build_list_kernel(const ListArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < a.rows; row += warps) {
    const int64_t mbh = row / a.n_outer, outer = row % a.n_outer;
    const bool* m = a.mask + mbh * a.geo.nqb * a.geo.nkb;
    uint32_t* out = a.idx + row * a.n_inner;
    int64_t count = 0;
    for (int64_t base = 0; base < a.n_inner; base += 32) {
      const int64_t inner = base + lane;
      uint32_t info = 0;
      if (inner < a.n_inner)
        info = a.transposed ? fl::pair_info(m, a.geo, a.TM, a.TN, inner, outer)
                            : fl::pair_info(m, a.geo, a.TM, a.TN, outer, inner);
      const unsigned bal = __ballot_sync(0xffffffffu, info & 1u);
      if (info & 1u) out[count + __popc(bal & ((1u << lane) - 1u))] = fl::list_entry(inner, info);
      count += __popc(bal);
    }
    if (lane == 0) a.cnt[row] = int32_t(count);
  }
}

struct Lists {
  Tensor cnt, idx;
};

Lists build_lists(const Tensor& like, const Shape& s, const bool* mask, int64_t TM, int64_t TN, bool transposed,
                  cudaStream_t stream) {
  const int64_t nq = fl::cdiv(s.Lq, TM), nk = fl::cdiv(s.Lk, TN);
  const int64_t n_outer = transposed ? nk : nq, n_inner = transposed ? nq : nk;
  ListArgs a{};
  a.mask = mask;
  a.geo = fl::Geometry{s.Lq, s.Lk, s.bq, s.bk, s.nqb, s.nkb, s.causal};
  a.TM = TM;
  a.TN = TN;
  a.rows = s.mB * s.mH * n_outer;
  a.n_outer = n_outer;
  a.n_inner = n_inner;
  a.transposed = transposed;
  Lists l{torch::stable::new_empty(like, {std::max<int64_t>(a.rows, 1)}, ScalarType::Int),
          torch::stable::new_empty(like, {std::max<int64_t>(a.rows * n_inner, 1)}, ScalarType::Int)};
  a.cnt = static_cast<int32_t*>(l.cnt.mutable_data_ptr());
  a.idx = static_cast<uint32_t*>(l.idx.mutable_data_ptr());
  if (a.rows > 0) {
    const int64_t blocks = std::min<int64_t>((a.rows + 7) / 8, 65536);
    build_list_kernel<<<unsigned(blocks), 256, 0, stream>>>(a);
    common::check_launch("block_sparse_attention (work lists)");
  }
  return l;
}

fl::Params flash_params(const Shape& s) {
  fl::Params p{};
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.Lq_pad = fl::cdiv(s.Lq, fl::kBwdBM) * fl::kBwdBM;
  p.mB = s.mB;
  p.mH = s.mH;
  p.geo = fl::Geometry{s.Lq, s.Lk, s.bq, s.bk, s.nqb, s.nkb, s.causal};
  p.D = int(s.D);
  p.scale = float(s.scale);
  p.scale_log2 = float(s.scale * 1.4426950408889634);
  p.is_bf16 = s.dt == DType::BF16 ? 1 : 0;
  return p;
}

void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "semisparse: ", what, " CUDA kernel launch failed: ", cudaGetErrorName(err),
                  ": ", cudaGetErrorString(err));
}

// ------------------------------------------------------------------ SIMT fallback
template <class T, class A>
__device__ __forceinline__ A ld(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, __half>) return A(__half2float(p[i]));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return A(__bfloat162float(p[i]));
  else return A(p[i]);
}
template <class T, class A>
__device__ __forceinline__ void st(T* p, int64_t i, A v) {
  if constexpr (std::is_same_v<T, __half>) p[i] = __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) p[i] = __float2bfloat16_rn(float(v));
  else p[i] = T(v);
}
__device__ __forceinline__ float ex(float x) { return expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }
template <class A>
__device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}
template <class A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <class T, class A>
__device__ __forceinline__ A dot(const T* a, const T* b, int64_t n) {
  A s = A(0);
  for (int64_t d = 0; d < n; ++d) s += ld<T, A>(a, d) * ld<T, A>(b, d);
  return s;
}

constexpr int kSimtWarps = 4;

struct SimtParams {
  const void *q, *k, *v, *o, *go, *lse_in;
  const bool* mask;
  void *out, *lse, *dq, *dk, *dv;
  void* scratch;   // A: forward [B Hq Lq][Dv], dq [B Hq Lq][D]
  void* scratch2;  // A: dkdv [B Hkv Lk][D + Dv]
  void* dsum;     // A [B Hq Lq]
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk, nqb, nkb, mB, mH;
  double scale;
  bool causal;
};

__device__ __forceinline__ const bool* mask_row(const SimtParams& p, int64_t b, int64_t h) {
  return p.mask + ((p.mB == 1 ? 0 : b) * p.mH + (p.mH == 1 ? 0 : h)) * p.nqb * p.nkb;
}

// forward: one warp per query row
template <class T, class A>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_fwd_kernel(const SimtParams p) {
  __shared__ A pbuf[kSimtWarps][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t rows = p.B * p.Hq * p.Lq, nwarps = int64_t(gridDim.x) * kSimtWarps;
  const A scale = A(p.scale), ninf = -std::numeric_limits<A>::infinity();
  for (int64_t r = int64_t(blockIdx.x) * kSimtWarps + w; r < rows; r += nwarps) {
    const int64_t i = r % p.Lq, bh = r / p.Lq, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t bkv = b * p.Hkv + h / (p.Hq / p.Hkv);
    const T* q = static_cast<const T*>(p.q) + r * p.D;
    const T* k = static_cast<const T*>(p.k) + bkv * p.Lk * p.D;
    const T* v = static_cast<const T*>(p.v) + bkv * p.Lk * p.Dv;
    const bool* mrow = mask_row(p, b, h) + (i / p.bq) * p.nkb;
    A* acc = static_cast<A*>(p.scratch) + r * p.Dv;
    for (int64_t d = lane; d < p.Dv; d += 32) acc[d] = A(0);
    A m = ninf, l = A(0);
    for (int64_t kb = 0; kb < p.nkb; ++kb) {
      if (!mrow[kb]) continue;
      const int64_t j0 = kb * p.bk;
      int64_t j1 = j0 + p.bk < p.Lk ? j0 + p.bk : p.Lk;
      if (p.causal && j1 > i + 1) j1 = i + 1;
      for (int64_t jc = j0; jc < j1; jc += 32) {
        const int64_t j = jc + lane;
        const bool valid = j < j1;
        const A s = valid ? dot<T, A>(q, k + j * p.D, p.D) * scale : ninf;
        const A cm = warp_max(s);  // finite: lane 0 is valid
        const A mn = m > cm ? m : cm;
        const A alpha = ex(m - mn);
        const A pj = valid ? ex(s - mn) : A(0);
        l = l * alpha + warp_sum(pj);
        m = mn;
        pbuf[w][lane] = pj;
        __syncwarp();
        const int nv = int(j1 - jc < 32 ? j1 - jc : 32);
        for (int64_t d = lane; d < p.Dv; d += 32) {
          A a = acc[d] * alpha;
          for (int t = 0; t < nv; ++t) a += pbuf[w][t] * ld<T, A>(v, (jc + t) * p.Dv + d);
          acc[d] = a;
        }
        __syncwarp();
      }
    }
    const A inv = l > A(0) ? A(1) / l : A(0);
    for (int64_t d = lane; d < p.Dv; d += 32) st<T, A>(static_cast<T*>(p.out), r * p.Dv + d, acc[d] * inv);
    if (lane == 0) static_cast<A*>(p.lse)[r] = l > A(0) ? m + lg(l) : ninf;
  }
}

// backward prep: dsum[r] = sum_d grad_out[r, d] * out[r, d]
template <class T, class A>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_prep_kernel(const SimtParams p) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t rows = p.B * p.Hq * p.Lq, nwarps = int64_t(gridDim.x) * kSimtWarps;
  for (int64_t r = int64_t(blockIdx.x) * kSimtWarps + w; r < rows; r += nwarps) {
    A s = A(0);
    for (int64_t d = lane; d < p.Dv; d += 32)
      s += ld<T, A>(static_cast<const T*>(p.go), r * p.Dv + d) * ld<T, A>(static_cast<const T*>(p.o), r * p.Dv + d);
    s = warp_sum(s);
    if (lane == 0) static_cast<A*>(p.dsum)[r] = s;
  }
}

// dq: one warp per query row
template <class T, class A>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_dq_kernel(const SimtParams p) {
  __shared__ A pbuf[kSimtWarps][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t rows = p.B * p.Hq * p.Lq, nwarps = int64_t(gridDim.x) * kSimtWarps;
  const A scale = A(p.scale), ninf = -std::numeric_limits<A>::infinity();
  for (int64_t r = int64_t(blockIdx.x) * kSimtWarps + w; r < rows; r += nwarps) {
    const int64_t i = r % p.Lq, bh = r / p.Lq, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t bkv = b * p.Hkv + h / (p.Hq / p.Hkv);
    const T* q = static_cast<const T*>(p.q) + r * p.D;
    const T* go = static_cast<const T*>(p.go) + r * p.Dv;
    const T* k = static_cast<const T*>(p.k) + bkv * p.Lk * p.D;
    const T* v = static_cast<const T*>(p.v) + bkv * p.Lk * p.Dv;
    const bool* mrow = mask_row(p, b, h) + (i / p.bq) * p.nkb;
    const A lse = static_cast<const A*>(p.lse_in)[r], dsum = static_cast<const A*>(p.dsum)[r];
    A* acc = static_cast<A*>(p.scratch) + r * p.D;
    for (int64_t d = lane; d < p.D; d += 32) acc[d] = A(0);
    if (lse != ninf) {
      for (int64_t kb = 0; kb < p.nkb; ++kb) {
        if (!mrow[kb]) continue;
        const int64_t j0 = kb * p.bk;
        int64_t j1 = j0 + p.bk < p.Lk ? j0 + p.bk : p.Lk;
        if (p.causal && j1 > i + 1) j1 = i + 1;
        for (int64_t jc = j0; jc < j1; jc += 32) {
          const int64_t j = jc + lane;
          A ds = A(0);
          if (j < j1) {
            const A pr = ex(dot<T, A>(q, k + j * p.D, p.D) * scale - lse);
            ds = pr * (dot<T, A>(go, v + j * p.Dv, p.Dv) - dsum);
          }
          pbuf[w][lane] = ds;
          __syncwarp();
          const int nv = int(j1 - jc < 32 ? j1 - jc : 32);
          for (int64_t d = lane; d < p.D; d += 32) {
            A a = acc[d];
            for (int t = 0; t < nv; ++t) a += pbuf[w][t] * ld<T, A>(k, (jc + t) * p.D + d);
            acc[d] = a;
          }
          __syncwarp();
        }
      }
    }
    for (int64_t d = lane; d < p.D; d += 32) st<T, A>(static_cast<T*>(p.dq), r * p.D + d, acc[d] * scale);
  }
}

// dk, dv: one warp per key row, over the query heads of its GQA group
template <class T, class A>
__global__ void __launch_bounds__(kSimtWarps * 32) simt_dkdv_kernel(const SimtParams p) {
  __shared__ A pbuf[kSimtWarps][2][32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t rows = p.B * p.Hkv * p.Lk, nwarps = int64_t(gridDim.x) * kSimtWarps;
  const int64_t G = p.Hq / p.Hkv;
  const A scale = A(p.scale), ninf = -std::numeric_limits<A>::infinity();
  for (int64_t r = int64_t(blockIdx.x) * kSimtWarps + w; r < rows; r += nwarps) {
    const int64_t j = r % p.Lk, bkv = r / p.Lk, hkv = bkv % p.Hkv, b = bkv / p.Hkv;
    const int64_t kb = j / p.bk;
    const T* kr = static_cast<const T*>(p.k) + r * p.D;
    const T* vr = static_cast<const T*>(p.v) + r * p.Dv;
    A* ak = static_cast<A*>(p.scratch) + r * (p.D + p.Dv);
    A* av = ak + p.D;
    for (int64_t d = lane; d < p.D; d += 32) ak[d] = A(0);
    for (int64_t d = lane; d < p.Dv; d += 32) av[d] = A(0);
    for (int64_t hh = 0; hh < G; ++hh) {
      const int64_t h = hkv * G + hh, bh = b * p.Hq + h;
      const bool* mcol = mask_row(p, b, h) + kb;
      const T* q = static_cast<const T*>(p.q) + bh * p.Lq * p.D;
      const T* go = static_cast<const T*>(p.go) + bh * p.Lq * p.Dv;
      const A* lse = static_cast<const A*>(p.lse_in) + bh * p.Lq;
      const A* dsum = static_cast<const A*>(p.dsum) + bh * p.Lq;
      for (int64_t qb = 0; qb < p.nqb; ++qb) {
        if (!mcol[qb * p.nkb]) continue;
        int64_t i0 = qb * p.bq;
        const int64_t i1 = i0 + p.bq < p.Lq ? i0 + p.bq : p.Lq;
        if (p.causal && i0 < j) i0 = j;
        for (int64_t ic = i0; ic < i1; ic += 32) {
          const int64_t i = ic + lane;
          A pr = A(0), ds = A(0);
          if (i < i1 && lse[i] != ninf) {
            pr = ex(dot<T, A>(q + i * p.D, kr, p.D) * scale - lse[i]);
            ds = pr * (dot<T, A>(go + i * p.Dv, vr, p.Dv) - dsum[i]);
          }
          pbuf[w][0][lane] = pr;
          pbuf[w][1][lane] = ds;
          __syncwarp();
          const int nv = int(i1 - ic < 32 ? i1 - ic : 32);
          for (int64_t d = lane; d < p.Dv; d += 32) {
            A a = av[d];
            for (int t = 0; t < nv; ++t) a += pbuf[w][0][t] * ld<T, A>(go, (ic + t) * p.Dv + d);
            av[d] = a;
          }
          for (int64_t d = lane; d < p.D; d += 32) {
            A a = ak[d];
            for (int t = 0; t < nv; ++t) a += pbuf[w][1][t] * ld<T, A>(q, (ic + t) * p.D + d);
            ak[d] = a;
          }
          __syncwarp();
        }
      }
    }
    for (int64_t d = lane; d < p.D; d += 32) st<T, A>(static_cast<T*>(p.dk), r * p.D + d, ak[d] * scale);
    for (int64_t d = lane; d < p.Dv; d += 32) st<T, A>(static_cast<T*>(p.dv), r * p.Dv + d, av[d]);
  }
}

SimtParams simt_params(const Shape& s) {
  SimtParams p{};
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.D = s.D;
  p.Dv = s.Dv;
  p.bq = s.bq;
  p.bk = s.bk;
  p.nqb = s.nqb;
  p.nkb = s.nkb;
  p.mB = s.mB;
  p.mH = s.mH;
  p.scale = s.scale;
  p.causal = s.causal;
  return p;
}

unsigned simt_grid(int64_t rows, int32_t dev) {
  return common::grid_for((rows + kSimtWarps - 1) / kSimtWarps, dev, 1, 16);  // blocks, 16 per SM at most
}

template <class T, class A>
void simt_forward(const SimtParams& p, int32_t dev, cudaStream_t stream) {
  const int64_t rows = p.B * p.Hq * p.Lq;
  simt_fwd_kernel<T, A><<<simt_grid(rows, dev), kSimtWarps * 32, 0, stream>>>(p);
  common::check_launch("block_sparse_attention (SIMT forward)");
}

template <class T, class A>
void simt_backward(const SimtParams& p, int32_t dev, cudaStream_t stream) {
  const int64_t qrows = p.B * p.Hq * p.Lq, krows = p.B * p.Hkv * p.Lk;
  simt_prep_kernel<T, A><<<simt_grid(qrows, dev), kSimtWarps * 32, 0, stream>>>(p);
  common::check_launch("block_sparse_attention_backward (SIMT prep)");
  simt_dq_kernel<T, A><<<simt_grid(qrows, dev), kSimtWarps * 32, 0, stream>>>(p);
  common::check_launch("block_sparse_attention_backward (SIMT dq)");
  SimtParams p2 = p;
  p2.scratch = p.scratch2;
  simt_dkdv_kernel<T, A><<<simt_grid(krows, dev), kSimtWarps * 32, 0, stream>>>(p2);
  common::check_launch("block_sparse_attention_backward (SIMT dk/dv)");
}

// ------------------------------------------------------------------ the ops
std::tuple<Tensor, Tensor> forward_cuda(Tensor q, Tensor k, Tensor v, Tensor block_mask, int64_t block_q,
                                        int64_t block_k, double scale, bool causal) {
  const char* op = "block_sparse_attention";
  const Shape s = check(op, q, k, v, block_mask, block_q, block_k, scale, causal);
  torch::stable::accelerator::DeviceGuard guard(s.dev);
  const cudaStream_t stream = common::current_stream(s.dev);
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), mc = contig(block_mask);
  Tensor out = torch::stable::new_empty(qc, {s.B, s.Hq, s.Lq, s.Dv});
  Tensor lse = torch::stable::new_empty(qc, {s.B, s.Hq, s.Lq}, checks::lse_type(s));
  if (s.B * s.Hq * s.Lq == 0) return {out, lse};

  const Forced forced = forced_kernel();
  if (forced != Forced::kSimt) {
    const char* why =
        flash_unfit(s, {qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), out.mutable_data_ptr()}, false);
    STD_TORCH_CHECK(why == nullptr || forced == Forced::kAuto, op,
                    ": SEMISPARSE_BLOCK_ATTENTION_KERNEL=flash, but the tensor-core kernel ", why);
    if (why == nullptr) {
      const bool* mask = static_cast<const bool*>(mc.const_data_ptr());
      Lists l = build_lists(qc, s, mask, fl::kFwdBM, fl::kBN, false, stream);
      fl::Params p = flash_params(s);
      p.q = qc.const_data_ptr();
      p.k = kc.const_data_ptr();
      p.v = vc.const_data_ptr();
      p.mask = mask;
      p.out = out.mutable_data_ptr();
      p.lse = static_cast<float*>(lse.mutable_data_ptr());
      p.cnt = static_cast<const int32_t*>(l.cnt.const_data_ptr());
      p.idx = static_cast<const uint32_t*>(l.idx.const_data_ptr());
      check_cuda(fl::run_forward(p, stream), "block_sparse_attention (tensor-core forward)");
      return {out, lse};
    }
  }
  SimtParams p = simt_params(s);
  Tensor scratch =
      torch::stable::new_empty(qc, {std::max<int64_t>(s.B * s.Hq * s.Lq * s.Dv, 1)}, checks::lse_type(s));
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.mask = static_cast<const bool*>(mc.const_data_ptr());
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  p.scratch = scratch.mutable_data_ptr();
  switch (s.dt) {
    case DType::F64: simt_forward<double, double>(p, s.dev, stream); break;
    case DType::F32: simt_forward<float, float>(p, s.dev, stream); break;
    case DType::BF16: simt_forward<__nv_bfloat16, float>(p, s.dev, stream); break;
    default: simt_forward<__half, float>(p, s.dev, stream); break;
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> backward_cuda(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                                                 Tensor lse, Tensor block_mask, int64_t block_q, int64_t block_k,
                                                 double scale, bool causal) {
  const char* op = "block_sparse_attention_backward";
  const Shape s = check(op, q, k, v, block_mask, block_q, block_k, scale, causal);
  check_same(op, "grad_out", grad_out, {s.B, s.Hq, s.Lq, s.Dv}, s.dev);
  check_same(op, "out", out, {s.B, s.Hq, s.Lq, s.Dv}, s.dev);
  check_same(op, "lse", lse, {s.B, s.Hq, s.Lq}, s.dev);
  checks::check_backward_dtypes(s, op, q, grad_out, out, lse);
  torch::stable::accelerator::DeviceGuard guard(s.dev);
  const cudaStream_t stream = common::current_stream(s.dev);
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), mc = contig(block_mask);
  Tensor gc = contig(grad_out), oc = contig(out), lc = contig(lse);
  Tensor dq = torch::stable::new_empty(qc, {s.B, s.Hq, s.Lq, s.D});
  Tensor dk = torch::stable::new_empty(qc, {s.B, s.Hkv, s.Lk, s.D});
  Tensor dv = torch::stable::new_empty(qc, {s.B, s.Hkv, s.Lk, s.Dv});
  if (s.B * s.Hq * s.Lq * s.Lk == 0) {  // no (query, key) pair: every gradient is 0
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
    return {dq, dk, dv};
  }
  const bool* mask = static_cast<const bool*>(mc.const_data_ptr());

  const Forced forced = forced_kernel();
  if (forced != Forced::kSimt) {
    const char* why = flash_unfit(s,
                                  {qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), gc.const_data_ptr(),
                                   oc.const_data_ptr(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
                                   dv.mutable_data_ptr()},
                                  true);
    STD_TORCH_CHECK(why == nullptr || forced == Forced::kAuto, op,
                    ": SEMISPARSE_BLOCK_ATTENTION_KERNEL=flash, but the tensor-core kernel ", why);
    if (why == nullptr) {
      Lists rows = build_lists(qc, s, mask, fl::kBwdBM, fl::kBN, false, stream);
      Lists cols = build_lists(qc, s, mask, fl::kBwdBM, fl::kBN, true, stream);
      fl::Params p = flash_params(s);
      Tensor ws = torch::stable::new_empty(qc, {2 * s.B * s.Hq * p.Lq_pad}, ScalarType::Float);
      p.q = qc.const_data_ptr();
      p.k = kc.const_data_ptr();
      p.v = vc.const_data_ptr();
      p.o = oc.const_data_ptr();
      p.go = gc.const_data_ptr();
      p.lse_in = static_cast<const float*>(lc.const_data_ptr());
      p.mask = mask;
      p.lse2 = static_cast<float*>(ws.mutable_data_ptr());
      p.dsum = p.lse2 + s.B * s.Hq * p.Lq_pad;
      p.dq = dq.mutable_data_ptr();
      p.dk = dk.mutable_data_ptr();
      p.dv = dv.mutable_data_ptr();
      p.cnt = static_cast<const int32_t*>(rows.cnt.const_data_ptr());
      p.idx = static_cast<const uint32_t*>(rows.idx.const_data_ptr());
      p.tcnt = static_cast<const int32_t*>(cols.cnt.const_data_ptr());
      p.tidx = static_cast<const uint32_t*>(cols.idx.const_data_ptr());
      check_cuda(fl::run_backward(p, stream), "block_sparse_attention_backward (tensor-core backward)");
      return {dq, dk, dv};
    }
  }
  SimtParams p = simt_params(s);
  const ScalarType at = checks::lse_type(s);
  Tensor dsum = torch::stable::new_empty(qc, {s.B * s.Hq * s.Lq}, at);
  Tensor s1 = torch::stable::new_empty(qc, {std::max<int64_t>(s.B * s.Hq * s.Lq * s.D, 1)}, at);
  Tensor s2 = torch::stable::new_empty(qc, {std::max<int64_t>(s.B * s.Hkv * s.Lk * (s.D + s.Dv), 1)}, at);
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.o = oc.const_data_ptr();
  p.go = gc.const_data_ptr();
  p.lse_in = lc.const_data_ptr();
  p.mask = mask;
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  p.dsum = dsum.mutable_data_ptr();
  p.scratch = s1.mutable_data_ptr();
  p.scratch2 = s2.mutable_data_ptr();
  switch (s.dt) {
    case DType::F64: simt_backward<double, double>(p, s.dev, stream); break;
    case DType::F32: simt_backward<float, float>(p, s.dev, stream); break;
    case DType::BF16: simt_backward<__nv_bfloat16, float>(p, s.dev, stream); break;
    default: simt_backward<__half, float>(p, s.dev, stream); break;
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace semisparse::blockattn::cuda

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("block_sparse_attention", TORCH_BOX(&semisparse::blockattn::cuda::forward_cuda));
  m.impl("block_sparse_attention_backward", TORCH_BOX(&semisparse::blockattn::cuda::backward_cuda));
}
