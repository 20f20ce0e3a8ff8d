// CUDA implementations of the semisparse::bsr_linear* ops (schemas, fakes, autograd and the
// pure-torch references: python/semisparse/ops/bsr.py; CPU kernels: bsr_linear_cpu.cpp;
// argument checks shared with it: bsr_linear_checks.h). LibTorch stable ABI only.
//
//   op                       fast path (fp16 / bf16, bh and bw in {16, 32, 64},    otherwise
//                            16-byte aligned operands)
//   bsr_linear               schedule kernel + tensor-core kernel                  SIMT kernel
//   bsr_linear_grad_input    CSC build (3 kernels) + tensor-core kernel            CSC build + SIMT kernel
//   bsr_linear_grad_values   tensor-core kernel (one CTA per block, token split)    SIMT kernel
//
// The tensor-core kernels live in bsr_linear_mma.cuh (instances: bsr_linear_mma_{f16,bf16}.cu).
// This file holds the small kernels that prepare their work on the device -- no device ->
// host synchronization anywhere:
//  * schedule (single CTA): sanitized row ranges (a running max of crow clamped to [0, nnz],
//    so any crow gives disjoint ranges), the split of long rows into chunks of at most C
//    blocks, the partial-workspace slots and arrival counters of split rows (zeroed here),
//    and the work list ordered longest chunk first (a counting sort over length buckets;
//    the order of equal-length chunks does not affect any result);
//  * CSC build for grad_input (the blocks of every block column in block order, as the CPU
//    builds them): csc_rank (per segment of blocks, one warp: each block's rank among the
//    earlier blocks of its column, __match_any_sync over 32 blocks at a time, counters in
//    shared memory), csc_offsets (single CTA: per-column segment offsets, the column
//    pointers ccol, then the schedule over block columns), csc_scatter (perm and row ids).
// The SIMT kernels serve float32 / float64, other block sizes and misaligned views: one
// thread per output element, fp32 accumulation (fp64 for fp64), like the references.
//
// Index values: the CPU op checks crow / col values on the host; here that needs a device
// -> host copy and a synchronization, so it runs only when SEMISPARSE_BSR_CHECK_INDICES=1.
// Without it every kernel stays memory-safe on bad indices (crow clamped into [0, nnz],
// blocks with a column outside [0, K/bw) skipped), and the result is unspecified.
// SEMISPARSE_BSR_KERNEL = auto | mma | simt forces a path (tests, benchmarks); a forced
// path that does not fit raises, naming the reason.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
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

#include "blocksparse/bsr_linear_checks.h"
#include "blocksparse/bsr_linear_mma.cuh"
#include "common/cuda_launch.cuh"
#include "common/stable_tensor.h"

namespace semisparse::bsr::cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using checks::leading;
using checks::sizes_with_last;
using common::contig;

enum class DType { F32, BF16, F16, F64 };

// ===================================================================== device helpers
template <class T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Elem<double> {
  using Acc = double;
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : v > hi ? hi : v; }

// Exclusive scan of v over a CTA of kScheduleThreads threads; *total gets the sum. sh: 32
// ints of shared memory. Every thread must call it; it ends with the CTA synchronized.
__device__ int block_scan_excl(int v, int* sh, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = sh[lane];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += y;
    }
    sh[lane] = s;
  }
  __syncthreads();
  const int before = warp ? sh[warp - 1] : 0;
  total = sh[31];
  __syncthreads();
  return before + x - v;
}

// Inclusive running max of v over the CTA; *total gets the CTA max.
__device__ int block_scan_max(int v, int* sh, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x = max(x, y);
  }
  if (lane == 31) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int s = sh[lane];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s = max(s, y);
    }
    sh[lane] = s;
  }
  __syncthreads();
  const int r = warp ? max(x, sh[warp - 1]) : x;
  total = sh[31];
  __syncthreads();
  return r;
}

struct SchedOut {
  int32_t* wsbase;    // [nrows]
  int32_t* splitidx;  // [nrows]
  int32_t* work;      // [work_bound * kWorkInts]
  int32_t* nwork;     // [1]
  int32_t* sems;      // [nsems], zeroed here
  int64_t nsems;
  int64_t work_bound;
  int64_t c;
  bool allow_split;
};

// The work list over nrows list rows with monotone starts rs[0..nrows] (single CTA).
__device__ void schedule_rows(const int32_t* rs, int64_t nrows, const SchedOut& o, int* sh, int* hist,
                              int* cursor) {
  const int tid = threadIdx.x;
  for (int64_t i = tid; i < o.nsems; i += kScheduleThreads) o.sems[i] = 0;
  if (tid < kBuckets) hist[tid] = 0;
  __syncthreads();
  // pass 1: chunk counts, the exclusive scans of split chunks / split rows, length histogram
  int carry_ws = 0, carry_sp = 0;
  for (int64_t base = 0; base < nrows; base += kScheduleThreads) {
    const int64_t r = base + tid;
    int64_t lo = 0, cnt = 0, nch = 0;
    if (r < nrows) {
      lo = rs[r];
      cnt = rs[r + 1] - lo;
      nch = chunk_count(cnt, o.c, o.allow_split);
    }
    const bool split = nch > 1;
    int tws = 0, tsp = 0;
    const int ews = block_scan_excl(split ? static_cast<int>(nch) : 0, sh, tws);
    const int esp = block_scan_excl(split ? 1 : 0, sh, tsp);
    if (r < nrows) {
      o.wsbase[r] = split ? carry_ws + ews : -1;
      o.splitidx[r] = split ? carry_sp + esp : -1;
      for (int64_t j = 0; j < nch; ++j) {
        const int64_t len = chunk_begin(lo, cnt, nch, j + 1) - chunk_begin(lo, cnt, nch, j);
        atomicAdd(&hist[bucket_of(len, o.c)], 1);
      }
    }
    carry_ws += tws;
    carry_sp += tsp;
  }
  __syncthreads();
  if (tid == 0) {
    int s = 0;
    for (int b = kBuckets - 1; b >= 0; --b) {
      cursor[b] = s;
      s += hist[b];
    }
    *o.nwork = static_cast<int32_t>(s < o.work_bound ? s : o.work_bound);
  }
  __syncthreads();
  // pass 2: place every chunk at the next slot of its bucket (longest bucket first)
  for (int64_t r = tid; r < nrows; r += kScheduleThreads) {
    const int64_t lo = rs[r], cnt = rs[r + 1] - lo;
    const int64_t nch = chunk_count(cnt, o.c, o.allow_split);
    const int32_t wb = o.wsbase[r], si = o.splitidx[r];
    for (int64_t j = 0; j < nch; ++j) {
      const int64_t b0 = chunk_begin(lo, cnt, nch, j), b1 = chunk_begin(lo, cnt, nch, j + 1);
      const int pos = atomicAdd(&cursor[bucket_of(b1 - b0, o.c)], 1);
      if (pos >= o.work_bound) continue;  // cannot happen: the bound holds for disjoint ranges
      int4* w = reinterpret_cast<int4*>(o.work + static_cast<int64_t>(pos) * kWorkInts);
      w[0] = make_int4(static_cast<int>(r), static_cast<int>(b0), static_cast<int>(b1), static_cast<int>(j));
      w[1] = make_int4(static_cast<int>(nch), wb, si, 0);
    }
  }
}

// forward: rs = running max of crow clamped to [0, nnz], then the schedule over block rows.
__global__ void __launch_bounds__(kScheduleThreads) fwd_schedule_kernel(const int64_t* crow, int64_t nbr, int64_t nnz,
                                                                         int32_t* rs, SchedOut o) {
  __shared__ int sh[32], hist[kBuckets], cursor[kBuckets];
  int carry = 0;
  for (int64_t base = 0; base <= nbr; base += kScheduleThreads) {
    const int64_t i = base + threadIdx.x;
    const int v = i <= nbr ? static_cast<int>(clamp64(crow[i], 0, nnz)) : 0;
    int tmax = 0;
    const int m = block_scan_max(v, sh, tmax);
    if (i <= nbr) rs[i] = max(m, carry);
    carry = max(carry, tmax);
  }
  __syncthreads();
  schedule_rows(rs, nbr, o, sh, hist, cursor);
}

// CSC step 1: segment s of S blocks, one warp. lrank[b] = rank of block b among the earlier
// blocks of its column in the segment (-1: column out of range); segc[s][c] = the segment's
// count of column c. Counters in shared memory when nbc fits (dynamic), else in segc itself.
__global__ void __launch_bounds__(32) csc_rank_kernel(const int64_t* col, int64_t nnz, int64_t nbc, int64_t seg,
                                                       int32_t* lrank, int32_t* segc, int use_smem) {
  extern __shared__ int32_t cnt_sh[];
  const int lane = threadIdx.x;
  const int64_t s = blockIdx.x;
  int32_t* cnt = use_smem ? cnt_sh : segc + s * nbc;
  for (int64_t c = lane; c < nbc; c += 32) cnt[c] = 0;
  __syncwarp();
  const int64_t b_begin = s * seg, b_end = b_begin + seg < nnz ? b_begin + seg : nnz;
  for (int64_t base = b_begin; base < b_end; base += 32) {
    const int64_t b = base + lane;
    int key = -1;
    if (b < b_end) {
      const int64_t c = col[b];
      if (c >= 0 && c < nbc) key = static_cast<int>(c);
    }
    const unsigned same = __match_any_sync(0xffffffffu, key);
    const int before = __popc(same & ((1u << lane) - 1u));
    const int leader = __ffs(same) - 1;
    const int base_cnt = key >= 0 ? cnt[key] : 0;
    __syncwarp();
    if (key >= 0 && lane == leader) cnt[key] = base_cnt + __popc(same);
    __syncwarp();
    if (b < b_end) lrank[b] = key >= 0 ? base_cnt + before : -1;
  }
  if (use_smem) {
    __syncwarp();
    for (int64_t c = lane; c < nbc; c += 32) segc[s * nbc + c] = cnt[c];
  }
}

// CSC step 2 (single CTA): segc[s][c] -> exclusive offset of segment s within column c;
// ccol = exclusive scan of the column counts; then (schedule) the work list over columns.
__global__ void __launch_bounds__(kScheduleThreads) csc_offsets_kernel(int32_t* segc, int64_t nseg, int64_t nbc,
                                                                        int32_t* ccol, SchedOut o, int schedule) {
  __shared__ int sh[32], hist[kBuckets], cursor[kBuckets];
  int carry = 0;
  for (int64_t base = 0; base < nbc; base += kScheduleThreads) {
    const int64_t c = base + threadIdx.x;
    int run = 0;
    if (c < nbc)
      for (int64_t s = 0; s < nseg; ++s) {
        const int v = segc[s * nbc + c];
        segc[s * nbc + c] = run;
        run += v;
      }
    int tot = 0;
    const int e = block_scan_excl(run, sh, tot);
    if (c < nbc) ccol[c] = carry + e;
    carry += tot;
  }
  if (threadIdx.x == 0) ccol[nbc] = carry;
  __syncthreads();
  if (schedule) schedule_rows(ccol, nbc, o, sh, hist, cursor);
}

// CSC step 3: perm[pos] = b, rowid[pos] = block row of b, pos = ccol[c] + segment offset + rank.
__global__ void csc_scatter_kernel(const int64_t* col, const int32_t* lrank, const int32_t* segc, const int32_t* ccol,
                                   const int64_t* crow, int64_t nbr, int64_t nnz, int64_t nbc, int64_t seg,
                                   int32_t* perm, int32_t* rowid) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < nnz;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int r = lrank[b];
    if (r < 0) continue;
    const int64_t c = col[b];
    const int64_t pos = ccol[c] + segc[(b / seg) * nbc + c] + r;
    perm[pos] = static_cast<int32_t>(b);
    rowid[pos] = static_cast<int32_t>(row_of(crow, nbr, nnz, b));
  }
}

// ------------------------------------------------------------------ SIMT kernels
template <class T>
__global__ void fwd_simt_kernel(const T* __restrict__ x, const T* __restrict__ v, const int64_t* __restrict__ crow,
                                const int64_t* __restrict__ col, const T* __restrict__ bias, T* __restrict__ y,
                                int64_t M, int64_t N, int64_t K, int64_t nnz, int64_t bh, int64_t bw) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t nbc = K / bw;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < M * N;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N, n = idx - m * N, r = n / bh, i = n - r * bh;
    const int64_t b0 = clamp64(crow[r], 0, nnz), b1 = clamp64(crow[r + 1], b0, nnz);
    Acc acc = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c = col[b];
      if (c < 0 || c >= nbc) continue;
      const T* xp = x + m * K + c * bw;
      const T* vp = v + (b * bh + i) * bw;
      for (int64_t j = 0; j < bw; ++j) acc += E::load(xp[j]) * E::load(vp[j]);
    }
    if (bias != nullptr) acc += E::load(bias[n]);
    y[idx] = E::store(acc);
  }
}

template <class T>
__global__ void gi_simt_kernel(const T* __restrict__ gy, const T* __restrict__ v, const int32_t* __restrict__ ccol,
                               const int32_t* __restrict__ perm, const int32_t* __restrict__ rowid, T* __restrict__ dx,
                               int64_t M, int64_t N, int64_t K, int64_t bh, int64_t bw) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < M * K;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / K, k = idx - m * K, c = k / bw, j = k - c * bw;
    Acc acc = 0;
    for (int64_t q = ccol[c]; q < ccol[c + 1]; ++q) {
      const T* gp = gy + m * N + static_cast<int64_t>(rowid[q]) * bh;
      const T* vp = v + static_cast<int64_t>(perm[q]) * bh * bw + j;
      for (int64_t i = 0; i < bh; ++i) acc += E::load(gp[i]) * E::load(vp[i * bw]);
    }
    dx[idx] = E::store(acc);
  }
}

template <class T>
__global__ void gv_simt_kernel(const T* __restrict__ gy, const T* __restrict__ x, const int64_t* __restrict__ crow,
                               const int64_t* __restrict__ col, T* __restrict__ gv, int64_t M, int64_t N, int64_t K,
                               int64_t nnz, int64_t bh, int64_t bw) {
  using E = Elem<T>;
  using Acc = typename E::Acc;
  const int64_t nbr = N / bh, nbc = K / bw;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < nnz * bh * bw;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / (bh * bw), rem = idx - b * bh * bw, i = rem / bw, j = rem - i * bw;
    const int64_t r = row_of(crow, nbr, nnz, b), c = col[b];
    Acc acc = 0;
    if (c >= 0 && c < nbc) {
      const T* gp = gy + r * bh + i;
      const T* xp = x + c * bw + j;
      for (int64_t m = 0; m < M; ++m) acc += E::load(gp[m * N]) * E::load(xp[m * K]);
    }
    gv[idx] = E::store(acc);
  }
}

// ======================================================================== host side
enum class Forced { kAuto, kMma, kSimt };

Forced forced_kernel() {
  const char* s = std::getenv("SEMISPARSE_BSR_KERNEL");
  if (s == nullptr || *s == '\0' || std::strcmp(s, "auto") == 0) return Forced::kAuto;
  if (std::strcmp(s, "mma") == 0) return Forced::kMma;
  if (std::strcmp(s, "simt") == 0) return Forced::kSimt;
  STD_TORCH_CHECK(false, "SEMISPARSE_BSR_KERNEL must be auto, mma or simt, got '", s, "'");
  return Forced::kAuto;
}

bool check_indices_requested() {
  const char* s = std::getenv("SEMISPARSE_BSR_CHECK_INDICES");
  return s != nullptr && *s != '\0' && std::strcmp(s, "0") != 0;
}

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 108;
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = n;
  return n;
}

// The CUDA side of the shared checks (bsr_linear_checks.h): every operand a CUDA tensor on
// cuda:dev, the device of the reference operand ref.
struct OnCuda {
  int32_t dev;
  const char* ref;
  void on(const Tensor& t, const char* op, const char* what) const {
    STD_TORCH_CHECK(t.is_cuda(), "semisparse::", op, ": ", what, " must be a CUDA tensor for this kernel");
  }
  void same(const Tensor& t, const char* op, const char* what) const {
    STD_TORCH_CHECK(t.get_device_index() == dev, "semisparse::", op, ": ", what, " is on cuda:",
                    t.get_device_index(), " but ", ref, " is on cuda:", dev);
  }
};

// The shared index checks, then what the shapes alone decide about the index values (crow
// must run from 0 to nnz; col must lie in [0, nbc)) and the int32 limits of the kernels.
void check_index(const Tensor& crow, const Tensor& col, int64_t nbr, int64_t nbc, int64_t nnz, const char* op,
                 const OnCuda& place) {
  checks::check_index(crow, col, nbr, nnz, op, place);
  STD_TORCH_CHECK(nbr > 0 || nnz == 0, "semisparse::", op, ": crow_indices must start at 0 and end at nnz=", nnz,
                  ", but there are no block rows");
  STD_TORCH_CHECK(nbc > 0 || nnz == 0, "semisparse::", op, ": col_indices[0] is out of range [0, 0) (no block columns)");
  STD_TORCH_CHECK(nnz < (int64_t{1} << 31) - 1 && nbr < (int64_t{1} << 31) - 1 && nbc < (int64_t{1} << 31) - 1,
                  "semisparse::", op, ": more than 2^31 - 2 blocks, block rows or block columns");
}

// The CPU op's value checks, run on a host copy (SEMISPARSE_BSR_CHECK_INDICES=1 only).
void check_index_values(const Tensor& crow, const Tensor& col, int64_t nbr, int64_t nbc, int64_t nnz,
                        cudaStream_t stream, const char* op) {
  if (!check_indices_requested()) return;
  std::vector<int64_t> cr(static_cast<size_t>(nbr + 1)), cl(static_cast<size_t>(nnz));
  cudaError_t err = cudaMemcpyAsync(cr.data(), crow.const_data_ptr(), cr.size() * sizeof(int64_t),
                                    cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess && nnz > 0)
    err = cudaMemcpyAsync(cl.data(), col.const_data_ptr(), cl.size() * sizeof(int64_t), cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  STD_TORCH_CHECK(err == cudaSuccess, "semisparse::", op, ": could not copy the indices to check them: ",
                  cudaGetErrorString(err));
  checks::check_index_values(cr.data(), cl.data(), nbr, nbc, nnz, op);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Why the tensor-core path cannot take this call (null: it can).
const char* mma_unfit(DType dt, int64_t bh, int64_t bw, std::initializer_list<const void*> ptrs) {
  if (dt != DType::F16 && dt != DType::BF16) return "the tensor-core path needs float16 or bfloat16";
  if (!fast_block(bh) || !fast_block(bw)) return "the tensor-core path needs block sizes in {16, 32, 64}";
  for (const void* p : ptrs)
    if (!aligned16(p)) return "the tensor-core path needs 16-byte aligned x / grad_y / values";
  return nullptr;
}

bool use_mma(const char* unfit, Forced forced, const char* op) {
  if (forced == Forced::kSimt) return false;
  if (unfit == nullptr) return true;
  STD_TORCH_CHECK(forced != Forced::kMma, "semisparse::", op, ": SEMISPARSE_BSR_KERNEL=mma but ", unfit);
  return false;
}

int concurrent_ctas(DType dt, Mode mode, int64_t bh, int64_t bw, int32_t dev) {
  const int per = dt == DType::F16 ? ctas_per_sm_f16(mode, static_cast<int>(bh), static_cast<int>(bw), dev)
                                   : ctas_per_sm_bf16(mode, static_cast<int>(bh), static_cast<int>(bw), dev);
  return per * sm_count(dev);
}

void run_mma_checked(DType dt, const MmaArgs& a, const char* op) {
  const char* why = dt == DType::F16 ? run_mma_f16(a) : run_mma_bf16(a);
  STD_TORCH_CHECK(why == nullptr, "semisparse::", op, ": tensor-core kernel failed: ", why);
}

// int32 scratch regions, 16-byte aligned, carved out of one tensor.
struct Carve {
  int64_t used = 0;
  int64_t take(int64_t n) {
    const int64_t at = used;
    used += (n + 3) / 4 * 4;
    return at;
  }
};

template <class Launch>
void by_dtype(DType dt, Launch&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F64: f(double{}); break;
    case DType::F16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// --- the CSC order of the blocks (grad_input): perm / rowid by block column, ccol pointers;
// with `sched`, also the work list over block columns.
struct Csc {
  int32_t* ccol;
  int32_t* perm;
  int32_t* rowid;
};

Csc build_csc(int32_t* base, const int64_t* crow, const int64_t* col, int64_t nbr, int64_t nbc,
              int64_t nnz, const SchedOut* sched, int64_t off_lrank, int64_t off_segc, int64_t off_perm,
              int64_t off_rowid, int64_t off_ccol, int32_t dev, cudaStream_t stream) {
  const int64_t seg = csc_segment(nnz);
  const int64_t nseg = (nnz + seg - 1) / seg;
  int32_t* lrank = base + off_lrank;
  int32_t* segc = base + off_segc;
  Csc c{base + off_ccol, base + off_perm, base + off_rowid};
  const bool smem = nbc * 4 <= 48 * 1024;
  csc_rank_kernel<<<static_cast<unsigned>(nseg), 32, smem ? static_cast<size_t>(nbc * 4) : 0, stream>>>(
      col, nnz, nbc, seg, lrank, segc, smem ? 1 : 0);
  common::check_launch("bsr_linear_grad_input (csc_rank)");
  SchedOut o{};
  if (sched != nullptr) o = *sched;
  csc_offsets_kernel<<<1, kScheduleThreads, 0, stream>>>(segc, nseg, nbc, c.ccol, o, sched != nullptr ? 1 : 0);
  common::check_launch("bsr_linear_grad_input (csc_offsets)");
  csc_scatter_kernel<<<common::grid_for(nnz, dev, 256, 8), 256, 0, stream>>>(col, lrank, segc, c.ccol, crow, nbr, nnz,
                                                                             nbc, seg, c.perm, c.rowid);
  common::check_launch("bsr_linear_grad_input (csc_scatter)");
  return c;
}

// ================================================================== the ops
Tensor linear_cuda(Tensor x, Tensor values, Tensor crow, Tensor col, int64_t N, std::optional<Tensor> bias) {
  const char* op = "bsr_linear";
  const OnCuda place{values.get_device_index(), "values"};
  const auto [dt, nnz, bh, bw] = checks::check_values<DType>(x, values, op, "x", place);
  const int64_t K = checks::linear_in_features(x, N, bh, bw, op);
  const int64_t nbr = N / bh, nbc = K / bw;
  const int32_t dev = place.dev;
  check_index(crow, col, nbr, nbc, nnz, op, place);
  if (bias.has_value()) checks::check_bias(*bias, values, N, op, place);
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = common::current_stream(dev);
  Tensor xc = contig(x), vc = contig(values), cc = contig(crow), lc = contig(col);
  std::optional<Tensor> bc;
  if (bias.has_value()) bc = contig(*bias);
  check_index_values(cc, lc, nbr, nbc, nnz, stream, op);
  Tensor y = torch::stable::new_empty(xc, sizes_with_last(xc, N));
  if (y.numel() == 0) return y;
  const int64_t M = leading(xc);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());
  const void* bp = bc ? bc->const_data_ptr() : nullptr;

  const Forced forced = forced_kernel();
  if (use_mma(mma_unfit(dt, bh, bw, {xc.const_data_ptr(), vc.const_data_ptr()}), forced, op)) {
    const int64_t mtiles = (M + kTokTile - 1) / kTokTile;
    const RowPlan plan =
        plan_rows(nbr, nbc, nnz, mtiles, kBK / bw, concurrent_ctas(dt, Mode::kForward, bh, bw, dev));
    STD_TORCH_CHECK(mtiles * plan.work_bound < 0x7fffffffLL, "semisparse::", op, ": too many tiles (M=", M, ")");
    Carve cv;
    const int64_t o_hdr = cv.take(4), o_rs = cv.take(nbr + 1), o_wsb = cv.take(nbr), o_spl = cv.take(nbr);
    const int64_t o_work = cv.take(plan.work_bound * kWorkInts), o_sem = cv.take(mtiles * plan.nsplit);
    Tensor scratch = torch::stable::new_empty(xc, {cv.used}, ScalarType::Int);
    int32_t* sp = static_cast<int32_t*>(scratch.mutable_data_ptr());
    std::optional<Tensor> ws;
    if (plan.ws_slots > 0)
      ws = torch::stable::new_empty(xc, {mtiles * plan.ws_slots * kTokTile * bh}, ScalarType::Float);
    SchedOut o{sp + o_wsb, sp + o_spl, sp + o_work, sp + o_hdr, sp + o_sem, mtiles * plan.nsplit, plan.work_bound,
               plan.c, plan.allow_split};
    fwd_schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(crp, nbr, nnz, sp + o_rs, o);
    common::check_launch("bsr_linear (schedule)");
    MmaArgs a;
    a.mode = Mode::kForward;
    a.a = xc.const_data_ptr();
    a.b = vc.const_data_ptr();
    a.bias = bp;
    a.out = y.mutable_data_ptr();
    a.col = clp;
    a.work = sp + o_work;
    a.nwork = sp + o_hdr;
    a.ws = ws ? static_cast<float*>(ws->mutable_data_ptr()) : nullptr;
    a.sems = sp + o_sem;
    a.m = M;
    a.n = N;
    a.k = K;
    a.nnz = nnz;
    a.bh = static_cast<int>(bh);
    a.bw = static_cast<int>(bw);
    a.mtiles = mtiles;
    a.work_bound = plan.work_bound;
    a.ws_slots = plan.ws_slots;
    a.nsplit = plan.nsplit;
    a.device = dev;
    a.stream = stream;
    run_mma_checked(dt, a, op);
    return y;
  }
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    fwd_simt_kernel<T><<<common::grid_for(M * N, dev, 256, 8), 256, 0, stream>>>(
        static_cast<const T*>(xc.const_data_ptr()), static_cast<const T*>(vc.const_data_ptr()), crp, clp,
        static_cast<const T*>(bp), static_cast<T*>(y.mutable_data_ptr()), M, N, K, nnz, bh, bw);
  });
  common::check_launch("bsr_linear (SIMT)");
  return y;
}

Tensor grad_input_cuda(Tensor gy, Tensor values, Tensor crow, Tensor col, int64_t K) {
  const char* op = "bsr_linear_grad_input";
  const OnCuda place{values.get_device_index(), "values"};
  const auto [dt, nnz, bh, bw] = checks::check_values<DType>(gy, values, op, "grad_y", place);
  const int64_t N = checks::grad_input_out_features(gy, K, bh, bw, op);
  const int64_t nbr = N / bh, nbc = K / bw;
  const int32_t dev = place.dev;
  check_index(crow, col, nbr, nbc, nnz, op, place);
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = common::current_stream(dev);
  Tensor gc = contig(gy), vc = contig(values), cc = contig(crow), lc = contig(col);
  check_index_values(cc, lc, nbr, nbc, nnz, stream, op);
  const std::vector<int64_t> out_sizes = sizes_with_last(gc, K);
  if (nnz == 0) return torch::stable::new_zeros(gc, out_sizes);
  Tensor gx = torch::stable::new_empty(gc, out_sizes);
  if (gx.numel() == 0) return gx;
  const int64_t M = leading(gc);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());

  const Forced forced = forced_kernel();
  const bool mma = use_mma(mma_unfit(dt, bh, bw, {gc.const_data_ptr(), vc.const_data_ptr()}), forced, op);
  const int64_t mtiles = (M + kTokTile - 1) / kTokTile;
  RowPlan plan;
  if (mma) plan = plan_rows(nbc, nbr, nnz, mtiles, kBK / bh, concurrent_ctas(dt, Mode::kGradInput, bh, bw, dev));
  STD_TORCH_CHECK(!mma || mtiles * plan.work_bound < 0x7fffffffLL, "semisparse::", op, ": too many tiles (M=", M, ")");
  const int64_t seg = csc_segment(nnz), nseg = (nnz + seg - 1) / seg;
  Carve cv;
  const int64_t o_hdr = cv.take(4), o_lrank = cv.take(nnz), o_segc = cv.take(nseg * nbc), o_perm = cv.take(nnz),
                o_rowid = cv.take(nnz), o_ccol = cv.take(nbc + 1);
  const int64_t o_wsb = cv.take(mma ? nbc : 0), o_spl = cv.take(mma ? nbc : 0);
  const int64_t o_work = cv.take(plan.work_bound * kWorkInts), o_sem = cv.take(mtiles * plan.nsplit);
  Tensor scratch = torch::stable::new_empty(gc, {cv.used}, ScalarType::Int);
  int32_t* sp = static_cast<int32_t*>(scratch.mutable_data_ptr());
  SchedOut o{sp + o_wsb, sp + o_spl, sp + o_work, sp + o_hdr, sp + o_sem, mtiles * plan.nsplit, plan.work_bound,
             plan.c, plan.allow_split};
  const Csc csc = build_csc(sp, crp, clp, nbr, nbc, nnz, mma ? &o : nullptr, o_lrank, o_segc, o_perm, o_rowid,
                            o_ccol, dev, stream);
  if (mma) {
    std::optional<Tensor> ws;
    if (plan.ws_slots > 0)
      ws = torch::stable::new_empty(gc, {mtiles * plan.ws_slots * kTokTile * bw}, ScalarType::Float);
    MmaArgs a;
    a.mode = Mode::kGradInput;
    a.a = gc.const_data_ptr();
    a.b = vc.const_data_ptr();
    a.out = gx.mutable_data_ptr();
    a.perm = csc.perm;
    a.rowid = csc.rowid;
    a.work = sp + o_work;
    a.nwork = sp + o_hdr;
    a.ws = ws ? static_cast<float*>(ws->mutable_data_ptr()) : nullptr;
    a.sems = sp + o_sem;
    a.m = M;
    a.n = N;
    a.k = K;
    a.nnz = nnz;
    a.bh = static_cast<int>(bh);
    a.bw = static_cast<int>(bw);
    a.mtiles = mtiles;
    a.work_bound = plan.work_bound;
    a.ws_slots = plan.ws_slots;
    a.nsplit = plan.nsplit;
    a.device = dev;
    a.stream = stream;
    run_mma_checked(dt, a, op);
    return gx;
  }
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    gi_simt_kernel<T><<<common::grid_for(M * K, dev, 256, 8), 256, 0, stream>>>(
        static_cast<const T*>(gc.const_data_ptr()), static_cast<const T*>(vc.const_data_ptr()), csc.ccol, csc.perm,
        csc.rowid, static_cast<T*>(gx.mutable_data_ptr()), M, N, K, bh, bw);
  });
  common::check_launch("bsr_linear_grad_input (SIMT)");
  return gx;
}

Tensor grad_values_cuda(Tensor gy, Tensor x, Tensor crow, Tensor col, int64_t bh, int64_t bw) {
  const char* op = "bsr_linear_grad_values";
  const OnCuda place{x.get_device_index(), "x"};
  const auto [dt, N, K, nbr, nbc, nnz] = checks::check_grad_values<DType>(gy, x, col, bh, bw, op, place);
  const int32_t dev = place.dev;
  check_index(crow, col, nbr, nbc, nnz, op, place);
  torch::stable::accelerator::DeviceGuard guard(dev);
  cudaStream_t stream = common::current_stream(dev);
  Tensor gc = contig(gy), xc = contig(x), cc = contig(crow), lc = contig(col);
  check_index_values(cc, lc, nbr, nbc, nnz, stream, op);
  Tensor gv = torch::stable::new_empty(xc, {nnz, bh, bw});
  if (nnz == 0) return gv;
  const int64_t M = leading(xc);
  if (M == 0) {
    torch::stable::zero_(gv);
    return gv;
  }
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());

  const Forced forced = forced_kernel();
  if (use_mma(mma_unfit(dt, bh, bw, {gc.const_data_ptr(), xc.const_data_ptr()}), forced, op)) {
    const GvPlan g = plan_gv(M, nnz, concurrent_ctas(dt, Mode::kGradValues, bh, bw, dev));
    STD_TORCH_CHECK(nnz * g.splits < 0x7fffffffLL, "semisparse::", op, ": too many blocks (", nnz, ")");
    std::optional<Tensor> ws, sems;
    if (g.splits > 1) {
      ws = torch::stable::new_empty(xc, {nnz * g.splits * bh * bw}, ScalarType::Float);
      sems = torch::stable::new_zeros(xc, {nnz}, ScalarType::Int);
    }
    MmaArgs a;
    a.mode = Mode::kGradValues;
    a.a = gc.const_data_ptr();
    a.b = xc.const_data_ptr();
    a.out = gv.mutable_data_ptr();
    a.crow = crp;
    a.col = clp;
    a.ws = ws ? static_cast<float*>(ws->mutable_data_ptr()) : nullptr;
    a.sems = sems ? static_cast<int32_t*>(sems->mutable_data_ptr()) : nullptr;
    a.m = M;
    a.n = N;
    a.k = K;
    a.nnz = nnz;
    a.bh = static_cast<int>(bh);
    a.bw = static_cast<int>(bw);
    a.splits = g.splits;
    a.tok_per_split = g.tok;
    a.device = dev;
    a.stream = stream;
    run_mma_checked(dt, a, op);
    return gv;
  }
  by_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    gv_simt_kernel<T><<<common::grid_for(nnz * bh * bw, dev, 256, 8), 256, 0, stream>>>(
        static_cast<const T*>(gc.const_data_ptr()), static_cast<const T*>(xc.const_data_ptr()), crp, clp,
        static_cast<T*>(gv.mutable_data_ptr()), M, N, K, nnz, bh, bw);
  });
  common::check_launch("bsr_linear_grad_values (SIMT)");
  return gv;
}

}  // namespace
}  // namespace semisparse::bsr::cuda

STABLE_TORCH_LIBRARY_IMPL(semisparse, CUDA, m) {
  m.impl("bsr_linear", TORCH_BOX(&semisparse::bsr::cuda::linear_cuda));
  m.impl("bsr_linear_grad_input", TORCH_BOX(&semisparse::bsr::cuda::grad_input_cuda));
  m.impl("bsr_linear_grad_values", TORCH_BOX(&semisparse::bsr::cuda::grad_values_cuda));
}
