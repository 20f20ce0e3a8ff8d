// AVX-512 block-sparse attention kernels (this TU alone gets the AVX-512 flags; entered only when active_cpu_isa() is Avx512Bf16).
#define BA_KERNEL_NS k_avx512
#define BA_RM 4
#define BA_NV 4
#include "blocksparse/block_attention_kernel.h"

namespace semisparse::blockattn {
void forward_avx512(const Problem& p) { k_avx512::forward_impl<float>(p); }
void backward_avx512(const Problem& p) { k_avx512::backward_impl<float>(p); }
}  // namespace semisparse::blockattn
