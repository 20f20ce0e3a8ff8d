// The run-time choice among a kernel family's builds (generic fp32/fp64, AVX2+FMA,
// AVX-512): one copy of the rule, for every family whose paths follow it.
#pragma once

#include <type_traits>

#include "common/cpu_features.h"

// Declares the four builds of kernel entry point NAME taking const PROBLEM&:
// NAME_generic_f32, NAME_generic_f64 and, where the AVX2/AVX-512 TUs are compiled
// (SEMISPARSE_HAVE_AVX2_TU), NAME_avx2 and NAME_avx512.
#if defined(SEMISPARSE_HAVE_AVX2_TU)
#define SEMISPARSE_DECLARE_ISA_KERNELS(NAME, PROBLEM) \
  void NAME##_generic_f32(const PROBLEM& p);          \
  void NAME##_generic_f64(const PROBLEM& p);          \
  void NAME##_avx2(const PROBLEM& p);                 \
  void NAME##_avx512(const PROBLEM& p)
#else
#define SEMISPARSE_DECLARE_ISA_KERNELS(NAME, PROBLEM) \
  void NAME##_generic_f32(const PROBLEM& p);          \
  void NAME##_generic_f64(const PROBLEM& p)
#endif

// Runs the build of NAME that the dtype (f64: always generic) and active_cpu_isa() select.
#if defined(SEMISPARSE_HAVE_AVX2_TU)
#define SEMISPARSE_RUN_ON_ACTIVE_ISA(NAME, p, f64) \
  ::semisparse::common::run_on_active_isa(p, f64, NAME##_generic_f64, NAME##_generic_f32, NAME##_avx2, NAME##_avx512)
#else
#define SEMISPARSE_RUN_ON_ACTIVE_ISA(NAME, p, f64) \
  ::semisparse::common::run_on_active_isa(p, f64, NAME##_generic_f64, NAME##_generic_f32, nullptr, nullptr)
#endif

namespace semisparse::common {

// (P is deduced from the problem alone, so a kernel may be given as nullptr.)
template <class P>
using KernelFn = std::type_identity_t<void (*)(const P&)>;

// f64 -> generic_f64; else avx512 on Avx512Bf16, avx2 on Avx2Fma (both only where the
// AVX2/AVX-512 TUs are compiled), generic_f32 otherwise.
template <class P>
inline void run_on_active_isa(const P& p, bool f64, KernelFn<P> generic_f64, KernelFn<P> generic_f32,
                              KernelFn<P> avx2, KernelFn<P> avx512) {
  if (f64) return generic_f64(p);
#if defined(SEMISPARSE_HAVE_AVX2_TU)
  const CpuIsa isa = active_cpu_isa();
  if (isa == CpuIsa::Avx512Bf16) return avx512(p);
  if (isa == CpuIsa::Avx2Fma) return avx2(p);
#else
  (void)avx2;
  (void)avx512;
#endif
  generic_f32(p);
}

}  // namespace semisparse::common
