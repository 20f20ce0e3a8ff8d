// AVX2+FMA block-sparse attention kernels (this TU alone gets the AVX2 flags).
#define BA_KERNEL_NS k_avx2
#define BA_RM 6
#define BA_NV 1
#include "blocksparse/block_attention_kernel.h"

namespace semisparse::blockattn {
void forward_avx2(const Problem& p) { k_avx2::forward_impl<float>(p); }
void backward_avx2(const Problem& p) { k_avx2::backward_impl<float>(p); }
}  // namespace semisparse::blockattn
