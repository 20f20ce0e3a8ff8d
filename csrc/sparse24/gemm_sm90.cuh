// The Hopper (sm90a) 2:4 sparse GEMM behind gemm_sm90_f16 / gemm_sm90_bf16
// (sparse24_gemm.h), built from CUTLASS 3.x collective builders. Included by the
// translation units gemm_sm90_f16.cu and gemm_sm90_bf16.cu, which instantiate it.
//
//   y[M, N] = act(x[M, K] @ W^T + bias[N])   as the CUTLASS GEMM   D = act(A @ B + bias)
//
//   GEMM-M = N (weight rows), GEMM-N = M (tokens), GEMM-K = K;
//   A = W, 2:4 sparse, K-major: values [N, K/2] row-major (SparseConfig::fill_layoutA for a
//       K-major A with K % 16 == 0 is exactly that) plus the metadata E in layout
//       cutlass_sm90 of meta_layout.h (SparseConfig::fill_layoutE, MinTileShapeK = 64);
//   B = x read as a column-major K x M matrix (K-major, ld K);
//   D = y read as a column-major N x M matrix (ld N); no C operand (ElementC = void);
//   epilogue LinCombPerRowBiasEltAct: act(1 * acc + bias[row]) in fp32, rounded once to
//   the output type; bias nullptr reads as 0 (Sm90ColBroadcast's null default).
//
// Two tile shapes per dtype and activation (tile K is always 64, which fixes the metadata
// layout for every kernel here):
//   Wide   128 x 128 x 64, KernelTmaWarpSpecializedCooperative (2 consumer warpgroups)
//   Narrow  64 x  64 x 64, KernelTmaWarpSpecializedPingpong    (token counts <= 256, or
//          when the wide tile would leave more than half of the multiprocessors idle)
// Both are persistent kernels, cluster 1x1x1, fp32 accumulation.
//
// The kernels only exist for sm_90a (CUTLASS guards their bodies with
// __CUDA_ARCH_FEAT_SM90_ALL), so the TU also compiles in an sm_80 pass; at run time the
// entry points return a reason unless the device is compute capability 9.0.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include <torch/headeronly/util/Exception.h>

#include "sparse24/sparse24_gemm.h"

namespace semisparse::sparse24::sm90 {
// Workspace bytes per dtype (gemm_sm90_workspace in gemm_sm90_f16.cu dispatches on dtype).
size_t workspace_f16(const GemmArgs& a);
size_t workspace_bf16(const GemmArgs& a);
}  // namespace semisparse::sparse24::sm90

#if defined(SEMISPARSE_HAVE_CUTLASS)

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

namespace semisparse::sparse24::sm90 {

// ------------------------------------------------------------------ device facts
constexpr int kMaxDevices = 64;

// Multiprocessor count of `device`, cached (0 when it cannot be read).
inline int sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    return 0;
  }
  if (cached) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// True when `device` is compute capability 9.0 (the only one sm_90a code runs on), cached.
inline bool is_sm90(int device) {
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached) {
    const int v = cache[device].load(std::memory_order_relaxed);
    if (v != 0) return v == 1;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const bool yes = major == 9 && minor == 0;
  if (cached) cache[device].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}

// ------------------------------------------------------------------ kernel types
using namespace cute;

inline constexpr const char* kNoSm90aCode =
    "sm90 sparse GEMM: this build has no sm_90a code (add 90a to SEMISPARSE_CUDA_ARCHS)";

struct WideTile {
  using TileShape = Shape<_128, _128, _64>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
struct NarrowTile {
  using TileShape = Shape<_64, _64, _64>;
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
};

template <class T, class Tile, template <class> class Act>
struct Kernel {
  using ClusterShape = Shape<_1, _1, _1>;
  static constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;  // 16 bytes

  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<
      Act, /*ElementOutput=*/T, /*ElementCompute=*/float, /*ElementBias=*/T, /*ElementSource=*/T,
      /*ElementScalar=*/float>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, typename Tile::TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlign,  // no C
      T, cutlass::layout::ColumnMajor, kAlign,     // D = y^T, ld N
      typename Tile::EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      T, cutlass::layout::RowMajor, kAlign,     // A = W (sparse, K-major)
      T, cutlass::layout::ColumnMajor, kAlign,  // B = x^T (K-major)
      float, typename Tile::TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Tile::KernelSchedule>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using SparseConfig = typename CollectiveMainloop::SparseConfig;
  using ElementE = typename CollectiveMainloop::ElementE;
  using StrideB = typename GemmKernel::StrideB;
  using StrideC = typename GemmKernel::StrideC;
  using StrideD = typename GemmKernel::StrideD;

  // The metadata layout every kernel here is built for (meta_layout.h, cutlass_sm90).
  static_assert(decltype(size<2>(typename Tile::TileShape{}))::value == 64, "tile K must be 64");
  static_assert(cute::is_same_v<ElementE, uint8_t>, "sm90 16-bit metadata is bytes");
  static_assert(decltype(size(typename SparseConfig::TensorEAtom{}))::value == 64 * 64,
                "metadata atom must be 64 rows x 64 columns (MinTileShapeK = 64)");

  static typename Gemm::Arguments arguments(const GemmArgs& a, int sms) {
    const int gm = static_cast<int>(a.n), gn = static_cast<int>(a.m), gk = static_cast<int>(a.k);
    const auto problem = cute::make_shape(gm, gn, gk, 1);
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = problem;
    args.mainloop.ptr_A = static_cast<const T*>(a.values);
    args.mainloop.layout_a = SparseConfig::fill_layoutA(problem);
    args.mainloop.ptr_B = static_cast<const T*>(a.x);
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(gn, gk, 1));
    args.mainloop.ptr_E = static_cast<const ElementE*>(a.meta);
    args.mainloop.layout_e = SparseConfig::fill_layoutE(problem);
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = 0.0f;
    fusion.bias_ptr = static_cast<const T*>(a.bias);  // nullptr -> bias 0
    args.epilogue.ptr_C = nullptr;
    args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(gm, gn, 1));
    args.epilogue.ptr_D = static_cast<T*>(a.y);
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(gm, gn, 1));
    args.hw_info.device_id = a.device;
    args.hw_info.sm_count = sms;
    return args;
  }

  static size_t workspace(const GemmArgs& a, int sms) { return Gemm::get_workspace_size(arguments(a, sms)); }

  static const char* run(const GemmArgs& a, int sms) {
    typename Gemm::Arguments args = arguments(a, sms);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess)
      return "sm90 sparse GEMM: CUTLASS can_implement rejected the problem (shape or alignment)";
    if (const char* why = prepare(a.device)) return why;
    const size_t need = Gemm::get_workspace_size(args);
    STD_TORCH_CHECK(need <= a.workspace_bytes && (need == 0 || a.workspace != nullptr),
                    "semisparse: sm90 sparse GEMM needs ", need, " bytes of workspace, got ", a.workspace_bytes);
    cutlass::Status st = GemmKernel::initialize_workspace(args, a.workspace, a.stream);
    STD_TORCH_CHECK(st == cutlass::Status::kSuccess, "semisparse: sm90 sparse GEMM workspace initialization failed: ",
                    cutlass::cutlassGetStatusString(st));
    typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, a.workspace);
    st = Gemm::run(params, a.stream);
    const cudaError_t err = cudaGetLastError();
    STD_TORCH_CHECK(st == cutlass::Status::kSuccess && err == cudaSuccess,
                    "semisparse: sm90 sparse GEMM launch failed: ", cutlass::cutlassGetStatusString(st), ", ",
                    cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    return nullptr;
  }

  // Once per device (the caller's current device is a.device: the front end holds a
  // device guard): checks that the kernel the runtime picked was compiled from sm_90a
  // code -- with 90a missing from the build's architectures it would be the sm_80 pass's
  // stub, which does nothing -- and raises its dynamic shared-memory limit.
  static const char* prepare(int device) {
    static std::atomic<int> state[kMaxDevices] = {};  // 0 unknown, 1 ready, 2 no sm_90a code
    const bool cached = device >= 0 && device < kMaxDevices;
    if (cached) {
      const int v = state[device].load(std::memory_order_acquire);
      if (v == 1) return nullptr;
      if (v == 2) return kNoSm90aCode;
    }
    cudaFuncAttributes attr{};
    cudaError_t err = cudaFuncGetAttributes(&attr, cutlass::device_kernel<GemmKernel>);
    STD_TORCH_CHECK(err == cudaSuccess, "semisparse: sm90 sparse GEMM: cudaFuncGetAttributes failed: ",
                    cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    if (attr.ptxVersion < 90) {
      if (cached) state[device].store(2, std::memory_order_release);
      return kNoSm90aCode;
    }
    constexpr int smem = GemmKernel::SharedStorageSize;
    if constexpr (smem >= (48 << 10)) {
      err = cudaFuncSetAttribute(cutlass::device_kernel<GemmKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      STD_TORCH_CHECK(err == cudaSuccess, "semisparse: sm90 sparse GEMM: cudaFuncSetAttribute(", smem,
                      " bytes of shared memory) failed: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    }
    if (cached) state[device].store(1, std::memory_order_release);
    return nullptr;
  }
};

// ------------------------------------------------------------------ checks + dispatch
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// nullptr when the problem fits every kernel here, else why not. Device-independent.
inline const char* check_problem(const GemmArgs& a) {
  if (a.m < 1) return "sm90 sparse GEMM: needs M >= 1";
  if (a.n < 64 || a.n % 64 != 0) return "sm90 sparse GEMM: needs N % 64 == 0 (meta layout cutlass_sm90)";
  if (a.k < 64 || a.k % 64 != 0) return "sm90 sparse GEMM: needs K % 64 == 0 (meta layout cutlass_sm90, tile K 64)";
  constexpr int64_t kMaxInt = 2147483647;  // CUTLASS problem shape is int32 per mode
  if (a.m > kMaxInt || a.n > kMaxInt || a.k > kMaxInt) return "sm90 sparse GEMM: M, N and K must be < 2^31";
  if (!aligned16(a.x) || !aligned16(a.values) || !aligned16(a.meta) || !aligned16(a.y))
    return "sm90 sparse GEMM: x, values, meta and y must be 16-byte aligned (TMA)";
  if (a.bias != nullptr && !aligned16(a.bias)) return "sm90 sparse GEMM: bias must be 16-byte aligned";
  return nullptr;
}

// Narrow tiles for few tokens, or when wide tiles would leave over half the SMs idle.
inline bool use_narrow(const GemmArgs& a, int sms) {
  if (a.m <= 256) return true;
  const int64_t wide_tiles = (a.n + 127) / 128 * ((a.m + 127) / 128);
  return wide_tiles * 2 < sms;
}

template <class T, template <class> class Act>
const char* run_act(const GemmArgs& a, int sms) {
  if (use_narrow(a, sms)) return Kernel<T, NarrowTile, Act>::run(a, sms);
  return Kernel<T, WideTile, Act>::run(a, sms);
}

template <class T>
size_t workspace(const GemmArgs& a) {
  if (check_problem(a) != nullptr) return 0;
  const int sms = sm_count(a.device);
  if (sms <= 0) return 0;
  if (use_narrow(a, sms)) return Kernel<T, NarrowTile, cutlass::epilogue::thread::Identity>::workspace(a, sms);
  return Kernel<T, WideTile, cutlass::epilogue::thread::Identity>::workspace(a, sms);
}

// Per-activation entry, defined (explicitly instantiated) in the TU that owns it, so the
// activations can be spread over translation units.
template <class T, Activation kAct>
const char* run(const GemmArgs& a, int sms);

// Everything before the launch: reasons that do not depend on the activation.
inline const char* preflight(const GemmArgs& a, int* sms) {
  if (const char* why = check_problem(a)) return why;
  if (!is_sm90(a.device)) return "sm90 sparse GEMM: needs a compute capability 9.0 GPU (sm_90a kernels)";
  *sms = sm_count(a.device);
  if (*sms <= 0) return "sm90 sparse GEMM: could not read the multiprocessor count";
  return nullptr;
}

template <class T>
const char* dispatch(const GemmArgs& a) {
  int sms = 0;
  if (const char* why = preflight(a, &sms)) return why;
  switch (a.act) {
    case Activation::kNone: return run<T, Activation::kNone>(a, sms);
    case Activation::kRelu: return run<T, Activation::kRelu>(a, sms);
    case Activation::kGelu: return run<T, Activation::kGelu>(a, sms);
    case Activation::kSilu: return run<T, Activation::kSilu>(a, sms);
  }
  return "sm90 sparse GEMM: unknown activation";
}

template <Activation kAct>
struct ActFn;
template <> struct ActFn<Activation::kNone> { template <class C> using F = cutlass::epilogue::thread::Identity<C>; };
template <> struct ActFn<Activation::kRelu> { template <class C> using F = cutlass::epilogue::thread::ReLu<C>; };
template <> struct ActFn<Activation::kGelu> { template <class C> using F = cutlass::epilogue::thread::GELU<C>; };
template <> struct ActFn<Activation::kSilu> { template <class C> using F = cutlass::epilogue::thread::SiLu<C>; };

// Definition of run<T, kAct>. The TU that owns an activation instantiates it with
//   template const char* run<cutlass::half_t, Activation::kRelu>(const GemmArgs&, int);
// a TU that calls dispatch<T> for activations compiled elsewhere declares them with
//   extern template const char* run<cutlass::half_t, Activation::kRelu>(const GemmArgs&, int);
template <class T, Activation kAct>
const char* run(const GemmArgs& a, int sms) {
  return run_act<T, ActFn<kAct>::template F>(a, sms);
}

}  // namespace semisparse::sparse24::sm90

#endif  // SEMISPARSE_HAVE_CUTLASS
