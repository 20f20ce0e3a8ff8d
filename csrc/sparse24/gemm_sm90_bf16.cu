// bf16 entry point of the Hopper (sm90a) 2:4 sparse GEMM: gemm_sm90_bf16 (its workspace
// size is sm90::workspace_bf16, called from gemm_sm90_workspace in gemm_sm90_f16.cu).
// The kernels themselves are CUTLASS 3.x warp-specialized sparse GEMMs configured in
// gemm_sm90.cuh; this TU instantiates them for cutlass::bfloat16_t and the epilogue
// activations none, relu, gelu (erf) and silu: 2 tile shapes x 4 activations = 8 kernels.
// Compiled for sm_80 and sm_90a; the kernel bodies only exist in the sm_90a pass.
#include "sparse24/gemm_sm90.cuh"

namespace semisparse::sparse24 {

#if defined(SEMISPARSE_HAVE_CUTLASS)

namespace sm90 {
template const char* run<cutlass::bfloat16_t, Activation::kNone>(const GemmArgs&, int);
template const char* run<cutlass::bfloat16_t, Activation::kRelu>(const GemmArgs&, int);
template const char* run<cutlass::bfloat16_t, Activation::kGelu>(const GemmArgs&, int);
template const char* run<cutlass::bfloat16_t, Activation::kSilu>(const GemmArgs&, int);

size_t workspace_bf16(const GemmArgs& a) { return workspace<cutlass::bfloat16_t>(a); }
}  // namespace sm90

const char* gemm_sm90_bf16(const GemmArgs& a) {
  if (a.dtype != GemmDType::kBF16) return "sm90 sparse GEMM: gemm_sm90_bf16 called with a non-bf16 problem";
  return sm90::dispatch<cutlass::bfloat16_t>(a);
}

#else  // !SEMISPARSE_HAVE_CUTLASS

namespace sm90 {
size_t workspace_bf16(const GemmArgs&) { return 0; }
}  // namespace sm90

const char* gemm_sm90_bf16(const GemmArgs&) { return "sm90 sparse GEMM: semisparse was built without CUTLASS"; }

#endif

}  // namespace semisparse::sparse24
