// Block-sparse attention on the CPU: the problem description shared by the op front end
// (block_attention_cpu.cpp) and the kernels (generic, AVX2+FMA, AVX-512 TUs, one source:
// block_attention_kernel.h). The math is defined in python/semisparse/ops/block_attention.py.
#pragma once

#include <cstdint>

#include "common/isa_dispatch.h"
#include "sparse24/sparse24_cpu.h"  // DType, bf16/fp16 <-> fp32 helpers

namespace semisparse::blockattn {

using sparse24::DType;

struct Problem {
  // inputs, all contiguous: q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv],
  // mask bool [mB,mH,nqb,nkb]; backward also go/o [B,Hq,Lq,Dv], lse [B,Hq,Lq]
  const void *q, *k, *v, *go, *o, *lse_in;
  const bool* mask;
  // outputs (contiguous): forward out, lse; backward dq, dk, dv
  void *out, *lse, *dq, *dk, *dv;
  DType dt;  // dtype of q/k/v/out/go/grads; lse is fp32 (fp64 when dt is F64)
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk, nqb, nkb, mB, mH;
  double scale;
  bool causal;
};

void forward(const Problem& p);   // dispatches on dtype and active_cpu_isa()
void backward(const Problem& p);

// forward_generic_f32/_f64, backward_generic_f32/_f64 and (x86) forward_avx2/_avx512,
// backward_avx2/_avx512
SEMISPARSE_DECLARE_ISA_KERNELS(forward, Problem);
SEMISPARSE_DECLARE_ISA_KERNELS(backward, Problem);

}  // namespace semisparse::blockattn
