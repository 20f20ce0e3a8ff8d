// CPU implementations of semisparse::block_sparse_attention{,_backward} (schemas, fakes,
// autograd and the pure-torch references live in python/semisparse/ops/block_attention.py).
// LibTorch stable ABI only. Every argument is validated here too, so a direct call into the
// kernel cannot crash.
#include <cstdint>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "blocksparse/block_attention_checks.h"
#include "blocksparse/block_attention_cpu.h"
#include "common/isa_dispatch.h"
#include "common/stable_tensor.h"

namespace semisparse::blockattn {

void forward(const Problem& p) { SEMISPARSE_RUN_ON_ACTIVE_ISA(forward, p, p.dt == DType::F64); }
void backward(const Problem& p) { SEMISPARSE_RUN_ON_ACTIVE_ISA(backward, p, p.dt == DType::F64); }

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using common::contig;

// The shared checks of block_attention_checks.h, for CPU tensors.
Problem check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask,
              int64_t block_q, int64_t block_k, double scale, bool causal) {
  Problem p{};
  checks::check_shapes(p, op, q, k, v, mask, block_q, block_k, scale, causal, [&] {
    STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && mask.is_cpu(), op,
                    ": all tensors must be CPU tensors for this kernel");
  });
  return p;
}

std::tuple<Tensor, Tensor> forward_cpu(Tensor q, Tensor k, Tensor v, Tensor block_mask, int64_t block_q,
                                       int64_t block_k, double scale, bool causal) {
  const char* op = "block_sparse_attention";
  Problem p = check(op, q, k, v, block_mask, block_q, block_k, scale, causal);
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), mc = contig(block_mask);
  Tensor out = torch::stable::new_empty(qc, {p.B, p.Hq, p.Lq, p.Dv});
  Tensor lse = torch::stable::new_empty(qc, {p.B, p.Hq, p.Lq}, checks::lse_type(p));
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.mask = static_cast<const bool*>(mc.const_data_ptr());
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  if (p.B * p.Hq * p.Lq > 0) forward(p);  // (Dv == 0 still needs lse)
  return {out, lse};
}

void check_same(const char* op, const char* what, const Tensor& t, const std::vector<int64_t>& shape) {
  checks::check_same(op, what, t, shape);
  STD_TORCH_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor for this kernel");
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out,
                                                Tensor lse, Tensor block_mask, int64_t block_q, int64_t block_k,
                                                double scale, bool causal) {
  const char* op = "block_sparse_attention_backward";
  Problem p = check(op, q, k, v, block_mask, block_q, block_k, scale, causal);
  check_same(op, "grad_out", grad_out, {p.B, p.Hq, p.Lq, p.Dv});
  check_same(op, "out", out, {p.B, p.Hq, p.Lq, p.Dv});
  check_same(op, "lse", lse, {p.B, p.Hq, p.Lq});
  checks::check_backward_dtypes(p, op, q, grad_out, out, lse);
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), mc = contig(block_mask);
  Tensor gc = contig(grad_out), oc = contig(out), lc = contig(lse);
  Tensor dq = torch::stable::new_empty(qc, {p.B, p.Hq, p.Lq, p.D});
  Tensor dk = torch::stable::new_empty(qc, {p.B, p.Hkv, p.Lk, p.D});
  Tensor dv = torch::stable::new_empty(qc, {p.B, p.Hkv, p.Lk, p.Dv});
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.go = gc.const_data_ptr();
  p.o = oc.const_data_ptr();
  p.lse_in = lc.const_data_ptr();
  p.mask = static_cast<const bool*>(mc.const_data_ptr());
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  if (p.B * p.Hq * p.Lq * p.Lk == 0 || p.D == 0 || p.Dv == 0) {
    torch::stable::zero_(dq);
    torch::stable::zero_(dk);
    torch::stable::zero_(dv);
  } else {
    backward(p);
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace semisparse::blockattn

STABLE_TORCH_LIBRARY_IMPL(semisparse, CPU, m) {
  m.impl("block_sparse_attention", TORCH_BOX(&semisparse::blockattn::forward_cpu));
  m.impl("block_sparse_attention_backward", TORCH_BOX(&semisparse::blockattn::backward_cpu));
}
