// gemm_sm80_f16: the CUTLASS 2.x 2:4 sparse GEMM (sm80 / sm86 / sm89, sm90 fallback) for
// fp16, y = act(x @ W^T + bias) with W in the cutlass_sm80 metadata layout. All of the
// work is in gemm_sm80.cuh (shared with the bf16 translation unit, gemm_sm80_bf16.cu);
// this file only instantiates it for cutlass::half_t. Without CUTLASS headers it still
// builds and reports why it cannot run.
#include "sparse24/gemm_sm80.cuh"
#include "sparse24/sparse24_gemm.h"

namespace semisparse::sparse24 {

const char* gemm_sm80_f16(const GemmArgs& a) {
#if defined(SEMISPARSE_HAVE_CUTLASS)
  if (a.dtype != GemmDType::kF16) return "gemm_sm80_f16: dtype is not fp16";
  return sm80::run<cutlass::half_t>(a);
#else
  (void)a;
  return "built without CUTLASS";
#endif
}

}  // namespace semisparse::sparse24
