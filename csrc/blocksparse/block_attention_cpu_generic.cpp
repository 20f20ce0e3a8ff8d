// Generic (baseline ISA) block-sparse attention kernels; also the fp64 path (gradcheck).
#define BA_KERNEL_NS k_generic
#define BA_RM 2
#define BA_NV 1
#include "blocksparse/block_attention_kernel.h"

namespace semisparse::blockattn {
void forward_generic_f32(const Problem& p) { k_generic::forward_impl<float>(p); }
void backward_generic_f32(const Problem& p) { k_generic::backward_impl<float>(p); }
void forward_generic_f64(const Problem& p) { k_generic::forward_impl<double>(p); }
void backward_generic_f64(const Problem& p) { k_generic::backward_impl<double>(p); }
}  // namespace semisparse::blockattn
