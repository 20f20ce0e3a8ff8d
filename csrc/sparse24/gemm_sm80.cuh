// Shared template code of the CUTLASS 2.x 2:4 sparse GEMM for sm80 / sm86 / sm89 (and, as
// a fallback, sm90), included by gemm_sm80_f16.cu and gemm_sm80_bf16.cu (one dtype per
// translation unit, so each compiles on its own in well under a minute).
//
//   y[M, N] = act(x[M, K] @ W^T + bias[N])      (contract: sparse24_gemm.h)
//
// Mapping onto cutlass::gemm::device::SparseGemm (the sparse operand must be A):
//   GEMM-M = N (weight rows), GEMM-N = M (tokens), GEMM-K = K
//   A = W values [N, K/2] row-major (ld K/2), the compressed sparse operand
//   E = meta, int16 words [N, K/16] in ColumnMajorInterleaved<2> (stride 2N): exactly the
//       "cutlass_sm80" layout of meta_layout.h (checked on the host against CUTLASS's
//       reorder_meta; the kernel's ElementE is uint16_t for 16-bit A, static_asserted below)
//   B = x [M, K] row-major read as a column-major K x M matrix (ld K)
//   D = y [M, N] row-major, i.e. a column-major N x M matrix (ld N)
//   C = bias [N] as a column-major N x M matrix with ldc = 0 (beta = 1), or no C (beta = 0)
//
// Why there is a threadblock epilogue here: CUTLASS 2.x only builds sparse kernels with a
// row-major C / D (DefaultSparseGemm is specialized for layout::RowMajor only; dense GEMMs
// get column-major outputs by swapping A and B, which a sparse A cannot do). A row-major
// D would be y^T. So this file specializes DefaultSparseGemm for its own layout tag,
// ColumnMajorOutput, keeping CUTLASS's sparse mainloop (DefaultSparseMma) and plugging in
// ColumnMajorEpilogue: each warp writes its fp32 accumulators to shared memory in
// column-major order, then every thread takes 8 consecutive rows of one column (16 bytes
// of output), applies the thread-level functor BiasActivation and stores them: coalesced
// 128-bit stores along y's rows. device::SparseGemm (Arguments, can_implement,
// initialize, run) is used unchanged on top of it.
//
// BiasActivation is the one thread-level epilogue functor: act(alpha * acc + beta * c) in
// fp32 with the activation (none / relu / gelu-erf / silu) chosen at run time from its
// Params, rounded once to the output type. Same interface as
// cutlass/epilogue/thread/linear_combination.h (Params, is_source_needed, operator() on
// fragments), activations from cutlass/epilogue/thread/activation.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include <torch/headeronly/util/Exception.h>

#include "sparse24/meta_layout.h"
#include "sparse24/sparse24_gemm.h"

#if defined(SEMISPARSE_HAVE_CUTLASS)

#include "cutlass/cutlass.h"
#include "cutlass/aligned_buffer.h"
#include "cutlass/array.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/device/gemm_sparse.h"
#include "cutlass/gemm/kernel/default_gemm_sparse.h"
#include "cutlass/gemm/warp/mma_sparse_tensor_op.h"
#include "cutlass/layout/matrix.h"
#include "cutlass/matrix_coord.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"
#include "cutlass/tensor_ref.h"

namespace semisparse::sparse24::sm80 {

// ------------------------------------------------------------------ thread-level functor
// D = act(alpha * accumulator + beta * source), fp32 throughout, one rounding to
// ElementOutput. The source (C) has the output type (the bias has the dtype of x and y).
template <typename ElementOutput_, int Count>
class BiasActivation {
 public:
  using ElementOutput = ElementOutput_;
  using ElementSource = ElementOutput_;
  using ElementAccumulator = float;
  using ElementCompute = float;
  static int const kCount = Count;
  static cutlass::FloatRoundStyle const kRound = cutlass::FloatRoundStyle::round_to_nearest;

  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentSource = cutlass::Array<ElementSource, kCount>;
  using FragmentAccumulator = cutlass::Array<ElementAccumulator, kCount>;
  using FragmentCompute = cutlass::Array<ElementCompute, kCount>;

  struct Params {
    ElementCompute alpha = 1.f;
    ElementCompute beta = 0.f;
    Activation act = Activation::kNone;

    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(ElementCompute alpha_, ElementCompute beta_, Activation act_)
        : alpha(alpha_), beta(beta_), act(act_) {}
  };

 private:
  ElementCompute alpha_;
  ElementCompute beta_;
  Activation act_;

 public:
  CUTLASS_HOST_DEVICE explicit BiasActivation(Params const& params)
      : alpha_(params.alpha), beta_(params.beta), act_(params.act) {}

  // The source is read only when it contributes.
  CUTLASS_HOST_DEVICE bool is_source_needed() const { return beta_ != ElementCompute(0); }

  // Serial split-K hook of the CUTLASS kernel interface. The kernels here never split K
  // (a non-linear activation cannot be applied to partial sums; DefaultSparseGemm below
  // static_asserts SplitKSerial == false), so this is never called.
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& accumulator,
                                                FragmentSource const& source) const {
    cutlass::NumericArrayConverter<ElementCompute, ElementSource, kCount, kRound> to_compute;
    FragmentCompute const c = to_compute(source);
    FragmentCompute x;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) x[i] = alpha_ * accumulator[i] + beta_ * c[i];
    return finish(x);
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& accumulator) const {
    FragmentCompute x;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) x[i] = alpha_ * accumulator[i];
    return finish(x);
  }

 private:
  template <typename Act>
  CUTLASS_HOST_DEVICE static void apply(FragmentCompute& x) {
    Act act;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) x[i] = act(x[i]);
  }

  CUTLASS_HOST_DEVICE FragmentOutput finish(FragmentCompute& x) const {
    switch (act_) {  // uniform across the grid: no divergence
      case Activation::kRelu: apply<cutlass::epilogue::thread::ReLu<float>>(x); break;  // NaN-propagating
      case Activation::kGelu: apply<cutlass::epilogue::thread::GELU<float>>(x); break;  // 0.5x(1+erf(x/sqrt2))
      case Activation::kSilu: apply<cutlass::epilogue::thread::SiLu<float>>(x); break;  // x / (1 + exp(-x))
      default: break;
    }
    cutlass::NumericArrayConverter<ElementOutput, ElementCompute, kCount, kRound> to_output;
    return to_output(x);
  }
};

// -------------------------------------------------------------- output layout + iterator
// Column-major matrix layout, as a distinct type: it selects the DefaultSparseGemm
// specialization below (the stock one exists for RowMajor only).
struct ColumnMajorOutput : cutlass::layout::ColumnMajor {
  using Base = cutlass::layout::ColumnMajor;
  CUTLASS_HOST_DEVICE ColumnMajorOutput(typename Base::LongIndex ldm = 0) : Base(ldm) {}
  CUTLASS_HOST_DEVICE ColumnMajorOutput(typename Base::Stride stride) : Base(stride) {}
  CUTLASS_HOST_DEVICE ColumnMajorOutput(Base const& layout) : Base(layout) {}
};

// C / D access for ColumnMajorEpilogue: vectors of kElementsPerAccess consecutive rows of
// one column, addressed relative to the threadblock tile. A null pointer performs no
// access (valid() is false). The host guarantees rows % kElementsPerAccess == 0 (N % 32),
// 16-byte aligned pointers, and ld % kElementsPerAccess == 0 (ld = N for D, 0 for the bias).
template <typename Element_, int kElementsPerAccess_>
class ColumnMajorVectorIterator {
 public:
  using Element = Element_;
  using Layout = ColumnMajorOutput;
  using TensorRef = cutlass::TensorRef<Element, Layout>;
  using TensorCoord = cutlass::MatrixCoord;
  using Index = typename Layout::Index;
  using LongIndex = typename Layout::LongIndex;
  static int const kElementsPerAccess = kElementsPerAccess_;
  using Fragment = cutlass::Array<Element, kElementsPerAccess>;
  using AccessType = cutlass::AlignedArray<Element, kElementsPerAccess>;
  static_assert(sizeof(AccessType) == 16, "one 128-bit access per vector");

  struct Params {
    LongIndex ld = 0;
    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(Layout const& layout) : ld(layout.stride(0)) {}
  };

 private:
  Element* pointer_;  // at the threadblock's (row 0, column 0)
  LongIndex ld_;
  Index rows_;     // rows left from the threadblock's first row
  Index columns_;  // columns left from the threadblock's first column

 public:
  CUTLASS_DEVICE ColumnMajorVectorIterator(Params const& params, Element* pointer, TensorCoord extent,
                                           int /*thread_idx*/, TensorCoord threadblock_offset = TensorCoord())
      : pointer_(pointer),
        ld_(params.ld),
        rows_(extent.row() - threadblock_offset.row()),
        columns_(extent.column() - threadblock_offset.column()) {
    if (pointer_ != nullptr) {
      pointer_ += LongIndex(threadblock_offset.row()) + LongIndex(threadblock_offset.column()) * ld_;
    }
  }

  CUTLASS_DEVICE bool enabled() const { return pointer_ != nullptr; }

  // row: multiple of kElementsPerAccess; the whole vector is in range or none of it.
  CUTLASS_DEVICE bool valid(int row, int column) const {
    return pointer_ != nullptr && row < rows_ && column < columns_;
  }

  CUTLASS_DEVICE void load(Fragment& frag, int row, int column) const {
    AccessType const* src = reinterpret_cast<AccessType const*>(pointer_ + row + LongIndex(column) * ld_);
    AccessType v = *src;
    frag = v;
  }

  CUTLASS_DEVICE void store(Fragment const& frag, int row, int column) const {
    AccessType v;
    static_cast<Fragment&>(v) = frag;
    *reinterpret_cast<AccessType*>(pointer_ + row + LongIndex(column) * ld_) = v;
  }
};

// ---------------------------------------------------------------- threadblock epilogue
// True for the warp-level sparse MMA whose accumulator fragment order the epilogue below
// mirrors: SparseMmaTensorOp with a row-major C and AccumulatorsInRowMajor == false, i.e.
// fragment = one Array<float, 4> per 16x8 MMA tile, tile (mma_m, mma_n) at
// 4 * (mma_m + mma_n * kMmaM) (see SparseMmaTensorOp::operator() and
// MmaTensorOpAccumulatorTileIterator<..., RowMajor, ...>).
template <typename T>
struct IsSupportedWarpMma : std::false_type {};
template <typename Shape, typename EA, typename LA, typename EB, typename LB, typename Policy, typename Enable>
struct IsSupportedWarpMma<cutlass::gemm::warp::SparseMmaTensorOp<Shape, EA, LA, EB, LB, float, cutlass::layout::RowMajor,
                                                                 Policy, 1, false, Enable>> : std::true_type {};

template <typename ThreadblockShape_, typename WarpMma_, typename OutputOp_>
class ColumnMajorEpilogue {
 public:
  using ThreadblockShape = ThreadblockShape_;
  using WarpMma = WarpMma_;
  using OutputOp = OutputOp_;
  using ElementOutput = typename OutputOp::ElementOutput;
  using ElementAccumulator = float;
  static int const kVector = OutputOp::kCount;  // consecutive rows per thread access
  using OutputTileIterator = ColumnMajorVectorIterator<ElementOutput, kVector>;
  using AccumulatorTile = typename WarpMma::FragmentC;

  using WarpShape = typename WarpMma::Shape;
  using InstructionShape = typename WarpMma::Policy::Operator::Shape;
  using OpDelta = typename WarpMma::Policy::OpDelta;

  static int const kWarpsM = ThreadblockShape::kM / WarpShape::kM;
  static int const kWarpsN = ThreadblockShape::kN / WarpShape::kN;
  static int const kThreads = 32 * kWarpsM * kWarpsN;
  static int const kMmaM = WarpShape::kM / InstructionShape::kM;
  static int const kMmaN = WarpShape::kN / InstructionShape::kN;
  // fp32 column stride in shared memory: + 4 keeps float4 alignment, and 2 * kLd = 8 (mod 32)
  // makes the accumulator writes conflict-free (lane (g, q) of a warp lands in bank 8q + g
  // plus a constant).
  static int const kLd = ThreadblockShape::kM + 4;
  static int const kVectorsPerColumn = ThreadblockShape::kM / kVector;
  static int const kVectorsPerThread = ThreadblockShape::kN * kVectorsPerColumn / kThreads;

  static_assert(IsSupportedWarpMma<WarpMma>::value, "unexpected warp-level MMA (fragment order assumed below)");
  static_assert(std::is_same_v<typename WarpMma::ElementC, float>, "fp32 accumulators");
  static_assert(ThreadblockShape::kK == WarpShape::kK, "one warp along K (no cross-warp reduction)");
  static_assert(InstructionShape::kM == 16 && InstructionShape::kN == 8, "mma.sp m16n8k32");
  static_assert(OpDelta::kRow == 1 && OpDelta::kColumn == 1, "adjacent MMA tiles");
  static_assert(AccumulatorTile::kElements == kMmaM * kMmaN * 4, "4 accumulators per thread and MMA tile");
  static_assert(ThreadblockShape::kM % kVector == 0 && kLd % 4 == 0, "float4-aligned columns");
  static_assert(ThreadblockShape::kN * kVectorsPerColumn % kThreads == 0, "whole tile per pass");
  static_assert(std::is_same_v<typename OutputOp::ElementAccumulator, float>, "fp32 functor input");

  struct SharedStorage {
    cutlass::AlignedBuffer<float, ThreadblockShape::kN * kLd> tile;  // column-major [kN][kLd]
  };

 private:
  SharedStorage& shared_;
  int thread_idx_;
  int warp_idx_;
  int lane_idx_;

 public:
  CUTLASS_DEVICE ColumnMajorEpilogue(SharedStorage& shared_storage, int thread_idx, int warp_idx, int lane_idx)
      : shared_(shared_storage), thread_idx_(thread_idx), warp_idx_(warp_idx), lane_idx_(lane_idx) {}

  CUTLASS_DEVICE void operator()(OutputOp const& output_op, OutputTileIterator destination,
                                 AccumulatorTile const& accumulators, OutputTileIterator source) {
    float* tile = shared_.tile.data();

    // The shared storage is a union with the mainloop's: every warp must be done with it
    // (the mainloop also ends with a barrier after draining cp.async; this one is cheap).
    __syncthreads();

    // 1. accumulators -> shared memory, column-major. Warp placement as in the mainloop
    //    (MmaMultistage: warp_m = warp % kWarpsM, warp_n = warp / kWarpsM); within one
    //    16x8 tile, lane (g = lane / 4, q = lane % 4) holds rows g and g + 8, columns
    //    2q and 2q + 1 (mma.sp m16n8 D fragment), as {(g,2q), (g,2q+1), (g+8,2q), (g+8,2q+1)}.
    {
      int const warp_m = warp_idx_ % kWarpsM;
      int const warp_n = warp_idx_ / kWarpsM;
      int const g = lane_idx_ >> 2;
      int const q = lane_idx_ & 3;
      int const row0 = warp_m * WarpShape::kM + g;
      int const col0 = warp_n * WarpShape::kN + 2 * q;
      CUTLASS_PRAGMA_UNROLL
      for (int mma_n = 0; mma_n < kMmaN; ++mma_n) {
        CUTLASS_PRAGMA_UNROLL
        for (int mma_m = 0; mma_m < kMmaM; ++mma_m) {
          int const base = 4 * (mma_m + mma_n * kMmaM);
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < 2; ++r) {
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < 2; ++c) {
              int const row = row0 + mma_m * InstructionShape::kM + 8 * r;
              int const col = col0 + mma_n * InstructionShape::kN + c;
              tile[col * kLd + row] = accumulators[base + 2 * r + c];
            }
          }
        }
      }
    }
    __syncthreads();

    // 2. shared memory -> functor -> global: vector v = (column v / kVectorsPerColumn,
    //    rows 8 (v % kVectorsPerColumn) ..+7); consecutive threads walk down a column, so a
    //    warp stores whole 128- or 256-byte column segments of y's rows.
    bool const with_source = output_op.is_source_needed() && source.enabled();
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kVectorsPerThread; ++i) {
      int const v = thread_idx_ + i * kThreads;
      int const col = v / kVectorsPerColumn;
      int const row = (v % kVectorsPerColumn) * kVector;
      if (!destination.valid(row, col)) continue;

      typename OutputOp::FragmentAccumulator acc;
      float4 const* src = reinterpret_cast<float4 const*>(tile + col * kLd + row);
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < kVector / 4; ++j) {
        float4 const f = src[j];
        acc[4 * j + 0] = f.x;
        acc[4 * j + 1] = f.y;
        acc[4 * j + 2] = f.z;
        acc[4 * j + 3] = f.w;
      }

      typename OutputOp::FragmentOutput out;
      if (with_source) {
        typename OutputOp::FragmentSource c;
        source.load(c, row, col);
        out = output_op(acc, c);
      } else {
        out = output_op(acc);
      }
      destination.store(out, row, col);
    }
  }
};

}  // namespace semisparse::sparse24::sm80

// ------------------------------------------- kernel composition for the column-major D
// CUTLASS's own sparse mainloop, the epilogue above. Selected by LayoutC == ColumnMajorOutput.
namespace cutlass::gemm::kernel {

template <typename ElementA, typename LayoutA, int kAlignmentA, typename ElementB, typename LayoutB, int kAlignmentB,
          typename ElementC, typename ElementAccumulator, typename ThreadblockShape, typename WarpShape,
          typename InstructionShape, typename EpilogueOutputOp, typename ThreadblockSwizzle, int Stages,
          bool SplitKSerial, typename Operator>
struct DefaultSparseGemm<ElementA, LayoutA, kAlignmentA, ElementB, LayoutB, kAlignmentB, ElementC,
                         semisparse::sparse24::sm80::ColumnMajorOutput, ElementAccumulator, arch::OpClassTensorOp,
                         arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, EpilogueOutputOp,
                         ThreadblockSwizzle, Stages, SplitKSerial, Operator> {
  static_assert(!SplitKSerial, "the column-major epilogue applies the activation: no serial split-K");
  static_assert(std::is_same_v<ElementC, typename EpilogueOutputOp::ElementOutput>, "C / D element type");

  using Mma = typename cutlass::gemm::threadblock::DefaultSparseMma<
      ElementA, LayoutA, kAlignmentA, ElementB, LayoutB, kAlignmentB, ElementAccumulator, layout::RowMajor,
      arch::OpClassTensorOp, arch::Sm80, ThreadblockShape, WarpShape, InstructionShape, Stages,
      Operator>::ThreadblockMma;

  using Epilogue =
      semisparse::sparse24::sm80::ColumnMajorEpilogue<ThreadblockShape, typename Mma::Operator, EpilogueOutputOp>;

  using GemmKernel = kernel::SparseGemm<Mma, Epilogue, ThreadblockSwizzle, SplitKSerial>;
};

}  // namespace cutlass::gemm::kernel

namespace semisparse::sparse24::sm80 {

// ------------------------------------------------------------------- configurations
template <typename Element, int TbM, int TbN, int WarpM, int WarpN, int Stages>
struct Config {
  static constexpr int kTileM = TbM;  // GEMM-M tile: weight rows (N)
  static constexpr int kTileN = TbN;  // GEMM-N tile: tokens (M)
  static constexpr int kTileK = 64;   // CUTLASS requires K % kTileK == 0 (SparseGemm::can_implement)
  static constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 8 elements = 16 bytes

  using OutputOp = BiasActivation<Element, kAlignment>;
  using Gemm = cutlass::gemm::device::SparseGemm<
      Element, cutlass::layout::RowMajor,            // A = W values [N, K/2]
      Element, cutlass::layout::ColumnMajor,         // B = x as K x M
      Element, ColumnMajorOutput,                    // C = bias (ldc 0), D = y as N x M
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<TbM, TbN, kTileK>, cutlass::gemm::GemmShape<WarpM, WarpN, kTileK>,
      cutlass::gemm::GemmShape<16, 8, 32>, OutputOp,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, Stages, kAlignment, kAlignment,
      /*SplitKSerial=*/false, cutlass::arch::OpMultiplyAdd>;
  using GemmKernel = typename Gemm::GemmKernel;
  static constexpr int kSharedBytes = int(sizeof(typename GemmKernel::SharedStorage));

  // What the host side of this file assumes about the CUTLASS kernel.
  static_assert(std::is_same_v<typename Gemm::ElementE, uint16_t>, "16-bit A: uint16 metadata words");
  static_assert(std::is_same_v<typename Gemm::LayoutE, cutlass::layout::ColumnMajorInterleaved<2>>,
                "metadata layout = meta_layout.h cutlass_sm80");
  static_assert(Gemm::kSparse == 2 && Gemm::kElementsPerElementE == 8, "one word = 8 values = 16 columns");
  static_assert(GemmKernel::Epilogue::OutputTileIterator::kElementsPerAccess == kAlignment, "D vector width");
};

// Tile table (GEMM-M x GEMM-N x K = weight rows x tokens x K). The three shapes are
// CUTLASS's own sm80 sparse configurations (cutlass_library generator, 16x8x32 sparse MMA,
// 2 x 2 warps = 128 threads). Pick the largest tile whose grid still covers every SM once
// (fewer, larger tiles re-read W and x less); below that, smaller tiles keep more SMs
// streaming W, which is what bounds a GEMM with few tokens:
//   128 x 128 x 64, 3 stages (warp 64x64, 75 KB smem): M > 128 and ceil(N/128)*ceil(M/128) >= #SMs
//   128 x  64 x 64, 3 stages (warp 64x32, 51 KB):      M >  64 and ceil(N/128)*ceil(M/64)  >= #SMs
//    64 x  64 x 64, 4 stages (warp 32x32, 50 KB):      everything else (17 .. ~256 tokens, small N)
// e.g. N = 4096 on 108 SMs: 64x64 up to M = 192, 128x64 for M = 193..384, 128x128 from 385.
// Shared memory stays under the 99 KB per block of sm86 / sm89 (4 stages of 128x128 would
// not); the epilogue's fp32 staging tile (66 / 33 / 17 KB) fits inside the mainloop's.
// M <= 16 goes to the small-M kernel before this one is asked (gemm_small_m).
template <typename Element>
using ConfigLarge = Config<Element, 128, 128, 64, 64, 3>;
template <typename Element>
using ConfigMedium = Config<Element, 128, 64, 64, 32, 3>;
template <typename Element>
using ConfigSmall = Config<Element, 64, 64, 32, 32, 4>;

enum class Tile { kLarge, kMedium, kSmall };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Tile choose_tile(int64_t m, int64_t n, int sms) {
  if (m > 128 && ceil_div(n, 128) * ceil_div(m, 128) >= sms) return Tile::kLarge;
  if (m > 64 && ceil_div(n, 128) * ceil_div(m, 64) >= sms) return Tile::kMedium;
  return Tile::kSmall;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Shape / pointer checks shared by every configuration (static reasons, nothing launched).
inline const char* check_args(const GemmArgs& a) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (a.m < 1) return "sm80 sparse GEMM: needs M >= 1";
  if (a.n < 1 || a.n % kSm80RowMultiple != 0) return "sm80 sparse GEMM: N must be a positive multiple of 32";
  if (a.k < 1 || a.k % 64 != 0) return "sm80 sparse GEMM: K must be a positive multiple of 64 (CUTLASS tile K)";
  if (a.m > kIntMax || a.n > kIntMax || a.k > kIntMax) return "sm80 sparse GEMM: M, N, K must fit in int32";
  if (ceil_div(a.m, 64) > 65535) return "sm80 sparse GEMM: M too large for the grid (> 65535 tiles of 64 tokens)";
  if (a.x == nullptr || a.values == nullptr || a.meta == nullptr || a.y == nullptr)
    return "sm80 sparse GEMM: null x / values / meta / y";
  if (!aligned16(a.x) || !aligned16(a.values) || !aligned16(a.meta) || !aligned16(a.y) ||
      (a.bias != nullptr && !aligned16(a.bias)))
    return "sm80 sparse GEMM: x, values, meta, y and bias must be 16-byte aligned";
  if (a.act != Activation::kNone && a.act != Activation::kRelu && a.act != Activation::kGelu &&
      a.act != Activation::kSilu)
    return "sm80 sparse GEMM: unknown activation";
  return nullptr;
}

template <typename Cfg>
typename Cfg::Gemm::Arguments make_arguments(const GemmArgs& a, int64_t gemm_n) {
  using Gemm = typename Cfg::Gemm;
  using Element = typename Gemm::ElementA;
  using ElementE = typename Gemm::ElementE;
  auto* values = static_cast<Element const*>(a.values);
  auto* x = static_cast<Element const*>(a.x);
  auto* bias = static_cast<Element const*>(a.bias);
  auto* y = static_cast<Element*>(a.y);
  auto* meta = static_cast<ElementE*>(const_cast<void*>(a.meta));  // read only (CUTLASS wants non-const here)
  typename Cfg::OutputOp::Params epilogue(1.f, bias != nullptr ? 1.f : 0.f, a.act);
  return typename Gemm::Arguments(
      cutlass::gemm::GemmCoord(int(a.n), int(gemm_n), int(a.k)),
      {values, cutlass::layout::RowMajor(a.k / 2)},
      {x, cutlass::layout::ColumnMajor(a.k)},
      {bias, ColumnMajorOutput(0)},  // broadcast along tokens; null with beta = 0
      {y, ColumnMajorOutput(a.n)},
      {meta, cutlass::layout::ColumnMajorInterleaved<2>(2 * a.n)},
      epilogue, /*split_k_slices=*/1);
}

template <typename Cfg>
const char* run_config(const GemmArgs& a, int smem_optin) {
  using Gemm = typename Cfg::Gemm;
  if (Cfg::kSharedBytes > smem_optin) return "sm80 sparse GEMM: not enough shared memory per block on this GPU";

  // CUTLASS's can_implement also wants the token count (GEMM-N) to be a multiple of the
  // B / D vector width. That is only conservative here: B is read through predicated
  // accesses along K (K % 64 == 0) with one predicate per token column, and D goes
  // through ColumnMajorEpilogue, which guards every token column. So ask CUTLASS about
  // the token count rounded up to a multiple of 8 (everything else it checks is
  // unchanged) and run the exact one.
  int64_t const m_rounded = ceil_div(a.m, Cfg::kAlignment) * Cfg::kAlignment;
  if (Gemm::can_implement(make_arguments<Cfg>(a, m_rounded)) != cutlass::Status::kSuccess)
    return "sm80 sparse GEMM: CUTLASS SparseGemm::can_implement rejected the problem";

  typename Gemm::Arguments const args = make_arguments<Cfg>(a, a.m);
  size_t const workspace = Gemm::get_workspace_size(args);
  STD_TORCH_CHECK(workspace <= a.workspace_bytes && (workspace == 0 || a.workspace != nullptr),
                  "semisparse: sm80 sparse GEMM needs ", workspace, " bytes of workspace, got ", a.workspace_bytes);

  Gemm gemm;
  cutlass::Status status = gemm.initialize(args, a.workspace, a.stream);
  STD_TORCH_CHECK(status == cutlass::Status::kSuccess, "semisparse: CUTLASS sm80 SparseGemm initialize failed: ",
                  cutlassGetStatusString(status));
  status = gemm.run(a.stream);  // launches on a.stream; checks cudaGetLastError itself
  STD_TORCH_CHECK(status == cutlass::Status::kSuccess,
                  "semisparse: CUTLASS sm80 SparseGemm kernel launch failed: ", cutlassGetStatusString(status));
  return nullptr;
}

// Entry point body for one dtype: checks, device facts, tile choice, launch on a.stream.
template <typename Element>
const char* run(const GemmArgs& a) {
  if (const char* why = check_args(a)) return why;

  int current = -1;
  STD_TORCH_CHECK(cudaGetDevice(&current) == cudaSuccess, "semisparse: cudaGetDevice failed");
  STD_TORCH_CHECK(current == a.device, "semisparse: sm80 sparse GEMM called for device ", a.device,
                  " while the current device is ", current);
  int major = 0, sms = 0, smem_optin = 0;
  STD_TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.device) == cudaSuccess &&
                      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device) == cudaSuccess &&
                      cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.device) ==
                          cudaSuccess,
                  "semisparse: could not read the attributes of CUDA device ", a.device);
  if (major < 8) return "sm80 sparse GEMM: needs compute capability >= 8.0 (sparse tensor cores)";

  switch (choose_tile(a.m, a.n, sms)) {
    case Tile::kLarge: return run_config<ConfigLarge<Element>>(a, smem_optin);
    case Tile::kMedium: return run_config<ConfigMedium<Element>>(a, smem_optin);
    default: return run_config<ConfigSmall<Element>>(a, smem_optin);
  }
}

// Workspace of the configuration run() would pick (no device query: every configuration
// here runs without split-K and needs none; computed through CUTLASS all the same).
template <typename Element>
size_t workspace(const GemmArgs& a) {
  if (check_args(a) != nullptr) return 0;
  size_t bytes = 0;
  auto take = [&](size_t b) { bytes = b > bytes ? b : bytes; };
  take(ConfigLarge<Element>::Gemm::get_workspace_size(make_arguments<ConfigLarge<Element>>(a, a.m)));
  take(ConfigMedium<Element>::Gemm::get_workspace_size(make_arguments<ConfigMedium<Element>>(a, a.m)));
  take(ConfigSmall<Element>::Gemm::get_workspace_size(make_arguments<ConfigSmall<Element>>(a, a.m)));
  return bytes;
}

}  // namespace semisparse::sparse24::sm80

#endif  // SEMISPARSE_HAVE_CUTLASS
