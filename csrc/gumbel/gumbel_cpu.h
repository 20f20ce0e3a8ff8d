// Fused Gumbel N:M mask sampler (MaskLLM) on the CPU: the kernel entry points shared by the
// op front end (gumbel_cpu.cpp) and the kernels (generic, AVX2+FMA, AVX-512 TUs); the
// problem description is gumbel_problem.h. The math and the noise are defined in
// python/semisparse/ops/gumbel.py.
#pragma once

#include <cstdint>

#include "common/isa_dispatch.h"
#include "gumbel/gumbel_problem.h"  // Op, Problem, fill_patterns

namespace semisparse::gumbel {

// Runs p on the path active_cpu_isa() selects (fp64 anywhere -> generic fp64 kernel).
void run(const Problem& p);

// run_generic_f32, run_generic_f64 and (x86) run_avx2, run_avx512
SEMISPARSE_DECLARE_ISA_KERNELS(run, Problem);

}  // namespace semisparse::gumbel
