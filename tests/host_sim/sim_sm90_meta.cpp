// Host-only check: CUTLASS 3.x sm90 sparse metadata layout (as derived by the
// CollectiveBuilder the semisparse kernel uses) vs semisparse::sparse24::sm90_meta_byte.
#include <cstdio>
#include <cstdint>
#include <vector>
#include <typeinfo>
#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "sparse24/meta_layout.h"

using namespace cute;

template <class T, class Tile, class Sched>
using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
    T, cutlass::layout::RowMajor, 8,
    T, cutlass::layout::ColumnMajor, 8,
    float, Tile, Shape<_1,_1,_1>,
    cutlass::gemm::collective::StageCountAutoCarveout<32768>, Sched>::CollectiveOp;

template <class ML>
int check(const char* name) {
  using SC = typename ML::SparseConfig;
  using EMma = typename ML::ElementEMma;
  using AMma = typename ML::ElementAMma;
  static_assert(std::is_same_v<EMma, cute::sparse_elem<8, uint8_t>>);
  static_assert(std::is_same_v<typename SC::ElementEMma, EMma>);
  printf("%s: MinTileShapeK-derived atom K = %d, atom M = %d, BlockK=%d NumK=%d, Stages=%d\n", name,
         int(typename SC::TensorEAtomK{}), int(typename SC::TensorEAtomM{}), int(typename SC::BlockK{}),
         int(typename SC::NumK{}), ML::DispatchPolicy::Stages);
  printf("  TensorEAtom = "); print(typename SC::TensorEAtom{}); printf("\n");
  int bad = 0;
  long checked = 0;
  for (int M : {64, 128, 192, 256}) {
    for (int K : {64, 128, 256, 320}) {
      auto prob = make_shape(M, 7, K, 1);
      auto lE = SC::fill_layoutE(prob);
      // layout_E in the kernel must equal fill_layoutE (can_implement checks this)
      // 1) byte address the way cute's sparse_ptr computes it: get() + i / 8
      std::vector<uint8_t> buf(size_t(M) * K / 8, 0);
      auto gE_sparse = make_tensor(make_gmem_ptr(recast_ptr<EMma>(buf.data())), lE);
      auto gE = recast<uint8_t>(gE_sparse);  // as the CUTLASS compressor writes it
      for (int m = 0; m < M; ++m) {
        for (int k = 0; k < K; k += 8) {
          int64_t li = lE(m, k, 0);
          int64_t byte_ptr = li / 8;
          int64_t want = semisparse::sparse24::sm90_meta_byte(m, k / 8, M);
          // the 8 logical columns k..k+7 are bits 0..7 of that byte: contiguous, aligned
          bool contig = (li % 8 == 0);
          for (int d = 0; d < 8; ++d) contig = contig && (lE(m, k + d, 0) == li + d);
          // compressor view: gE(m, j) byte tensor
          int64_t byte_recast = &gE(m, k / 8, 0) - buf.data();
          ++checked;
          if (byte_ptr != want || byte_recast != want || !contig) {
            if (bad < 10) printf("  MISMATCH M=%d K=%d m=%d k=%d: cute %lld recast %lld formula %lld contig %d\n",
                                 M, K, m, k, (long long)byte_ptr, (long long)byte_recast, (long long)want, int(contig));
            ++bad;
          }
        }
      }
      // the byte layout must be a bijection onto [0, M*K/8)
      std::vector<int> hit(size_t(M) * K / 8, 0);
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < K / 8; ++j) hit[semisparse::sparse24::sm90_meta_byte(m, j, M)]++;
      for (int h : hit) if (h != 1) { ++bad; printf("  not a bijection M=%d K=%d\n", M, K); break; }
      // sizes: cosize in bytes
      if (size_t(cosize(lE)) / 8 != size_t(M) * K / 8) { ++bad; printf("  cosize mismatch\n"); }
    }
  }
  // 2) nibble order, as the CUTLASS sm90 compressor stores chunk codes: a row-major
  //    (64, K/8) byte tile viewed as uint4_t chunks (64, K/4): chunk c -> byte c/2, nibble c%2.
  {
    uint8_t tile[64 * 8] = {};
    auto cEsE = make_tensor(make_smem_ptr(tile), make_layout(make_shape(_64{}, _8{}), LayoutRight{}));
    auto chunks = recast<cute::uint4_t>(cEsE);
    chunks(5, 6) = cute::uint4_t(0x9);  // chunk 6 = columns 24..27 of row 5
    chunks(5, 7) = cute::uint4_t(0xE);  // chunk 7 = columns 28..31
    printf("  nibble check: byte(5,3) = 0x%02x (expect 0xe9: lower group in the low nibble)\n", tile[5 * 8 + 3]);
    if (tile[5 * 8 + 3] != 0xE9) ++bad;
  }
  // 3) compressed A: K-major layout must be plain row-major [M, K/2] in physical units
  for (int M : {64, 192}) for (int K : {64, 128, 320}) {
    auto lA = SC::fill_layoutA(make_shape(M, 7, K, 1));
    for (int m = 0; m < M; ++m) for (int k = 0; k < K; ++k) {
      int64_t phys = lA(m, k, 0) / 2;  // sparse_ptr<2>: get() + i / 2
      if (phys != int64_t(m) * (K / 2) + k / 2) { if (bad < 20) printf("  A mismatch M=%d K=%d m=%d k=%d\n", M, K, m, k); ++bad; }
    }
  }
  printf("  %s: checked %ld (m,k) pairs, %d mismatches\n", name, checked, bad);
  return bad;
}

int main() {
  using namespace cutlass::gemm;
  int bad = 0;
  bad += check<Mainloop<cutlass::half_t, Shape<_128,_128,_64>, KernelTmaWarpSpecializedCooperative>>("f16 128x128x64 coop");
  bad += check<Mainloop<cutlass::half_t, Shape<_128,_256,_64>, KernelTmaWarpSpecializedCooperative>>("f16 128x256x64 coop");
  bad += check<Mainloop<cutlass::bfloat16_t, Shape<_128,_128,_64>, KernelTmaWarpSpecializedCooperative>>("bf16 128x128x64 coop");
  bad += check<Mainloop<cutlass::bfloat16_t, Shape<_64,_128,_64>, KernelTmaWarpSpecializedPingpong>>("bf16 64x128x64 pingpong");
  bad += check<Mainloop<cutlass::half_t, Shape<_128,_64,_64>, KernelTmaWarpSpecializedPingpong>>("f16 128x64x64 pingpong");
  // what tile K = 128 would give (a different layout): show it differs
  {
    using SC128 = typename Mainloop<cutlass::half_t, Shape<_128,_128,_128>, KernelTmaWarpSpecializedCooperative>::SparseConfig;
    printf("tile K 128 atom: "); print(typename SC128::TensorEAtom{}); printf("\n");
  }
  printf(bad ? "FAIL\n" : "ALL OK\n");
  return bad != 0;
}
