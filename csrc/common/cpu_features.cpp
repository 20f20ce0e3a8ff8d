#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace semisparse {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) && defined(SEMISPARSE_HAVE_AVX2_TU)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512bf16"))
      return CpuIsa::Avx512Bf16;
    return CpuIsa::Avx2Fma;
  }
  return CpuIsa::Scalar;
#elif defined(__aarch64__)
  // Advanced SIMD is part of the AArch64 baseline: the generic C++ kernels run, compiled
  // for it (auto-vectorized). There is no hand-written NEON kernel yet, and no ARM
  // machine has run this build.
  return CpuIsa::Neon;
#else
  return CpuIsa::Scalar;
#endif
}

bool parse(const char* name, CpuIsa* out) {
  if (std::strcmp(name, "scalar") == 0) { *out = CpuIsa::Scalar; return true; }
  if (std::strcmp(name, "avx2_fma") == 0) { *out = CpuIsa::Avx2Fma; return true; }
  if (std::strcmp(name, "avx512_bf16") == 0) { *out = CpuIsa::Avx512Bf16; return true; }
  if (std::strcmp(name, "neon") == 0) { *out = CpuIsa::Neon; return true; }
  if (std::strcmp(name, "auto") == 0) { *out = best_cpu_isa(); return true; }
  return false;
}

bool runnable(CpuIsa isa) {
  if (isa == CpuIsa::Scalar) return true;
  const CpuIsa best = best_cpu_isa();
  return isa == best || (isa == CpuIsa::Avx2Fma && best == CpuIsa::Avx512Bf16);
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{[] {
    CpuIsa isa = best_cpu_isa();
    if (const char* env = std::getenv("SEMISPARSE_CPU_ISA")) {
      CpuIsa forced;
      if (parse(env, &forced) && runnable(forced)) isa = forced;
    }
    return static_cast<int>(isa);
  }()};
  return slot;
}

}  // namespace

CpuIsa best_cpu_isa() {
  static const CpuIsa best = detect();
  return best;
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(active_slot().load(std::memory_order_relaxed)); }

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx2Fma: return "avx2_fma";
    case CpuIsa::Avx512Bf16: return "avx512_bf16";
    case CpuIsa::Neon: return "neon";
    default: return "scalar";
  }
}

}  // namespace semisparse

extern "C" {
const char* semisparse_cpu_isa() { return semisparse::cpu_isa_name(semisparse::active_cpu_isa()); }
const char* semisparse_cpu_isa_best() { return semisparse::cpu_isa_name(semisparse::best_cpu_isa()); }
int semisparse_set_cpu_isa(const char* name) {
  semisparse::CpuIsa isa;
  if (name == nullptr || !semisparse::parse(name, &isa)) return -1;
  if (!semisparse::runnable(isa)) return -2;
  semisparse::active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return 0;
}
}
