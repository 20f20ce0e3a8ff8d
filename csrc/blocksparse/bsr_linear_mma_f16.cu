// float16 instances of the BSR linear tensor-core kernels (bsr_linear_mma.cuh): forward and
// grad_input for bh / bw in {16, 32, 64}, grad_values for every (bh, bw) pair of them.
// One translation unit per dtype keeps each nvcc run short (bf16: bsr_linear_mma_bf16.cu).
#define SEMISPARSE_BSR_MMA_IMPL 1
#include "blocksparse/bsr_linear_mma.cuh"

namespace semisparse::bsr::cuda {

const char* run_mma_f16(const MmaArgs& a) { return run_mma<__half>(a); }
int ctas_per_sm_f16(Mode mode, int bh, int bw, int device) { return ctas_per_sm<__half>(mode, bh, bw, device); }

}  // namespace semisparse::bsr::cuda
