// Host-only check: semisparse's sm80_meta_word() (csrc/sparse24/meta_layout.h) against
// CUTLASS's reference reorder (tools/util host_reorder.h reorder_meta) into the
// ColumnMajorInterleaved<2> layout that the CUTLASS 2.x SparseGemm reads for 16-bit A,
// and the meaning of each word against CUTLASS's host uncompress().
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <random>
#include "cutlass/cutlass.h"
#include "cutlass/layout/matrix.h"
#include "cutlass/tensor_ref.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/util/host_reorder.h"
#include "cutlass/util/host_uncompress.h"
#include "sparse24/meta_layout.h"

using semisparse::sparse24::sm80_meta_word;

static int check_layout(int rows, int kcols /* K/16 */) {
  std::vector<uint16_t> src(size_t(rows) * kcols), dst(size_t(rows) * kcols, 0xFFFF);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kcols; ++c) src[size_t(r) * kcols + c] = uint16_t(r * kcols + c);
  cutlass::TensorRef<uint16_t, cutlass::layout::RowMajor> s(src.data(), cutlass::layout::RowMajor(kcols));
  cutlass::TensorRef<uint16_t, cutlass::layout::ColumnMajorInterleaved<2>> d(
      dst.data(), cutlass::layout::ColumnMajorInterleaved<2>(2 * rows));
  cutlass::reorder_meta(d, s, cutlass::gemm::GemmCoord(rows, 0, kcols));
  int bad = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kcols; ++c) {
      int64_t w = sm80_meta_word(r, c, rows);
      if (w < 0 || w >= int64_t(dst.size()) || dst[w] != src[size_t(r) * kcols + c]) ++bad;
    }
  std::printf("layout %4d x %4d words (N=%d, K=%d): %s (%d mismatches)\n", rows, kcols, rows, kcols * 16,
              bad ? "MISMATCH" : "identical", bad);
  return bad;
}

// Random 2:4 W [N,K]: values + "cpu" codes (idx0 | idx1 << 2, group j of a word in bits 4j),
// packed into int16 words (r, c); CUTLASS's uncompress() must give W back.
static int check_meaning(int N, int K, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<float> W(size_t(N) * K, 0.f), vals(size_t(N) * K / 2), back(size_t(N) * K, -1.f);
  std::vector<uint16_t> meta(size_t(N) * K / 16, 0);
  for (int r = 0; r < N; ++r)
    for (int g = 0; g < K / 4; ++g) {
      int i0 = rng() % 4, i1 = rng() % 4;
      while (i1 == i0) i1 = rng() % 4;
      if (i0 > i1) std::swap(i0, i1);
      float a = float(int(rng() % 200) + 1), b = float(int(rng() % 200) + 1);
      W[size_t(r) * K + 4 * g + i0] = a;
      W[size_t(r) * K + 4 * g + i1] = b;
      vals[size_t(r) * K / 2 + 2 * g] = a;
      vals[size_t(r) * K / 2 + 2 * g + 1] = b;
      meta[size_t(r) * (K / 16) + g / 4] |= uint16_t((i0 | (i1 << 2)) << (4 * (g % 4)));
    }
  cutlass::TensorRef<float, cutlass::layout::RowMajor> tw(back.data(), cutlass::layout::RowMajor(K));
  cutlass::TensorRef<float, cutlass::layout::RowMajor> tv(vals.data(), cutlass::layout::RowMajor(K / 2));
  cutlass::TensorRef<uint16_t, cutlass::layout::RowMajor> te(meta.data(), cutlass::layout::RowMajor(K / 16));
  // uncompress() picks its group width from sizeof_bits<ElementA>: use a 16-bit type.
  std::vector<cutlass::half_t> vh(vals.size()), bh(back.size());
  for (size_t i = 0; i < vals.size(); ++i) vh[i] = cutlass::half_t(vals[i]);
  cutlass::TensorRef<cutlass::half_t, cutlass::layout::RowMajor> th(vh.data(), cutlass::layout::RowMajor(K / 2));
  cutlass::TensorRef<cutlass::half_t, cutlass::layout::RowMajor> tb(bh.data(), cutlass::layout::RowMajor(K));
  cutlass::uncompress(tb, th, te, N, K);
  int bad = 0;
  for (size_t i = 0; i < W.size(); ++i) bad += float(bh[i]) != W[i];
  std::printf("meaning N=%d K=%d: uncompress(values, words) %s W (%d mismatches)\n", N, K, bad ? "!=" : "==", bad);
  (void)tw; (void)tv;
  return bad;
}

int main() {
  int bad = 0;
  bad += check_layout(64, 64 / 16);
  bad += check_layout(96, 128 / 16);
  bad += check_layout(32, 32 / 16);
  bad += check_layout(256, 4096 / 16);
  bad += check_layout(160, 96 / 16);
  bad += check_meaning(64, 64, 1);
  bad += check_meaning(96, 128, 2);
  std::printf(bad ? "FAILED\n" : "ALL OK\n");
  return bad != 0;
}
