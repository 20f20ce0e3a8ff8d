// Run-time choice of the CPU SIMD path. The kernels are compiled for every path the
// target architecture can have; which one runs is decided here, once, from cpuid
// (x86) or the architecture baseline (aarch64), and can be overridden with the
// environment variable SEMISPARSE_CPU_ISA=scalar|avx2_fma|avx512_bf16|neon|auto or, for tests,
// through semisparse_set_cpu_isa() (exported with C linkage, reached with ctypes).
#pragma once

namespace semisparse {

// x86 paths nest: Avx512Bf16 is Avx2Fma plus the AVX-512 BF16 kernels for bfloat16
// (other dtypes run the AVX2 kernels).
enum class CpuIsa : int { Scalar = 0, Avx2Fma = 1, Neon = 2, Avx512Bf16 = 3 };

// The path the kernels use now.
CpuIsa active_cpu_isa();
// The best path this CPU and this build support.
CpuIsa best_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace semisparse

extern "C" {
// Name of the active path: "avx512_bf16", "avx2_fma", "neon" or "scalar".
__attribute__((visibility("default"))) const char* semisparse_cpu_isa();
// Name of the best path this machine supports.
__attribute__((visibility("default"))) const char* semisparse_cpu_isa_best();
// Force a path ("auto" restores the best). Returns 0 on success, -1 if the name is
// unknown, -2 if this CPU or build cannot run it.
__attribute__((visibility("default"))) int semisparse_set_cpu_isa(const char* name);
}
