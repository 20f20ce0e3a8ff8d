// gemm_sm80_bf16: the CUTLASS 2.x 2:4 sparse GEMM (sm80 / sm86 / sm89, sm90 fallback) for
// bf16, y = act(x @ W^T + bias) with W in the cutlass_sm80 metadata layout, plus
// gemm_sm80_workspace (the same for both dtypes: no configuration here splits K). All of
// the work is in gemm_sm80.cuh (shared with gemm_sm80_f16.cu); this file only
// instantiates it for cutlass::bfloat16_t. Without CUTLASS headers it still builds and
// reports why it cannot run.
#include "sparse24/gemm_sm80.cuh"
#include "sparse24/sparse24_gemm.h"

namespace semisparse::sparse24 {

const char* gemm_sm80_bf16(const GemmArgs& a) {
#if defined(SEMISPARSE_HAVE_CUTLASS)
  if (a.dtype != GemmDType::kBF16) return "gemm_sm80_bf16: dtype is not bf16";
  return sm80::run<cutlass::bfloat16_t>(a);
#else
  (void)a;
  return "built without CUTLASS";
#endif
}

size_t gemm_sm80_workspace(const GemmArgs& a) {
#if defined(SEMISPARSE_HAVE_CUTLASS)
  // Workspace depends on the tile grid and split-K only, not on the dtype.
  return sm80::workspace<cutlass::bfloat16_t>(a);
#else
  (void)a;
  return 0;
#endif
}

}  // namespace semisparse::sparse24
