// Threads come from torch's intra-op pool (torch.set_num_threads applies), through
// the stable ABI's torch_parallel_for.
#pragma once

#include <cstdint>
#include <torch/csrc/stable/ops.h>

namespace semisparse {

template <class F>
inline void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain < 1 ? 1 : grain, f);
}

inline int num_threads() { return static_cast<int>(torch::stable::get_num_threads()); }

}  // namespace semisparse
