// Generic (portable C++) BSR linear kernels: fp32 and fp64 on a scalar "vector" of width 1
// (used when no SIMD path is active, and for fp64 always), and the run-time dispatch.
#include "blocksparse/bsr_linear_cpu.h"
#include "common/isa_dispatch.h"

#define BSR_KERNEL_NS k_generic
#include "blocksparse/bsr_linear_kernel.h"

namespace semisparse::bsr {
namespace {

template <class TT>
struct VScalar {
  using T = TT;
  using F = TT;
  static constexpr int W = 1;
  static F zero() { return T(0); }
  static F set1(T a) { return a; }
  static F loadu(const T* p) { return *p; }
  static void storeu(T* p, F a) { *p = a; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static T hsum(F a) { return a; }
};

}  // namespace

void run_generic_f32(const Problem& p) { k_generic::run<VScalar<float>>(p); }
void run_generic_f64(const Problem& p) { k_generic::run<VScalar<double>>(p); }

void run(const Problem& p) { SEMISPARSE_RUN_ON_ACTIVE_ISA(run, p, p.f64); }

}  // namespace semisparse::bsr
