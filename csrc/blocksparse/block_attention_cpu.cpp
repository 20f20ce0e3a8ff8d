// CPU implementations of semisparse::block_sparse_attention{,_backward} (schemas, fakes,
// autograd and the pure-torch references live in python/semisparse/ops/block_attention.py).
// LibTorch stable ABI only. Every argument is validated here too, so a direct call into the
// kernel cannot crash.
#include <cmath>
#include <cstdint>
#include <string>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

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
using common::shape_str;

Problem check(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask,
              int64_t block_q, int64_t block_k, double scale, bool causal) {
  STD_TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, Hq, Lq, D], got shape ", shape_str(q));
  STD_TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D [B, Hkv, Lk, D], got shape ", shape_str(k));
  STD_TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D [B, Hkv, Lk, Dv], got shape ", shape_str(v));
  STD_TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && mask.is_cpu(), op,
                  ": all tensors must be CPU tensors for this kernel");
  Problem p{};
  p.dt = common::dtype_of<DType>(q, op, ": q must be float32/bfloat16/float16/float64, got ");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                  ": q, k and v must have the same dtype");
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.Lq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Lk = k.size(2);
  p.Dv = v.size(3);
  STD_TORCH_CHECK(k.size(0) == p.B && v.size(0) == p.B, op, ": batch sizes differ: q ", shape_str(q), ", k ",
                  shape_str(k), ", v ", shape_str(v));
  STD_TORCH_CHECK(k.size(3) == p.D, op, ": q and k head dims differ: q ", shape_str(q), ", k ", shape_str(k));
  STD_TORCH_CHECK(v.size(1) == p.Hkv && v.size(2) == p.Lk, op, ": k and v must have the same [B, Hkv, Lk], got k ",
                  shape_str(k), ", v ", shape_str(v));
  STD_TORCH_CHECK(p.Hkv >= 1 && p.Hq % p.Hkv == 0, op, ": the number of query heads (", p.Hq,
                  ") must be a multiple of the key/value heads (", p.Hkv, ")");
  STD_TORCH_CHECK(block_q >= 1 && block_k >= 1, op, ": block sizes must be >= 1, got block_q=", block_q,
                  ", block_k=", block_k);
  STD_TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  STD_TORCH_CHECK(mask.scalar_type() == ScalarType::Bool, op, ": block_mask must be bool");
  p.bq = block_q;
  p.bk = block_k;
  p.nqb = (p.Lq + block_q - 1) / block_q;
  p.nkb = (p.Lk + block_k - 1) / block_k;
  STD_TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == p.B) &&
                      (mask.size(1) == 1 || mask.size(1) == p.Hq) && mask.size(2) == p.nqb && mask.size(3) == p.nkb,
                  op, ": block_mask must have shape [", p.B, " or 1, ", p.Hq, " or 1, ceil(Lq/block_q) = ", p.nqb,
                  ", ceil(Lk/block_k) = ", p.nkb, "], got ", shape_str(mask));
  p.mB = mask.size(0);
  p.mH = mask.size(1);
  p.scale = scale;
  p.causal = causal;
  return p;
}

ScalarType lse_type(const Problem& p) { return p.dt == DType::F64 ? ScalarType::Double : ScalarType::Float; }

std::tuple<Tensor, Tensor> forward_cpu(Tensor q, Tensor k, Tensor v, Tensor block_mask, int64_t block_q,
                                       int64_t block_k, double scale, bool causal) {
  const char* op = "block_sparse_attention";
  Problem p = check(op, q, k, v, block_mask, block_q, block_k, scale, causal);
  Tensor qc = contig(q), kc = contig(k), vc = contig(v), mc = contig(block_mask);
  Tensor out = torch::stable::new_empty(qc, {p.B, p.Hq, p.Lq, p.Dv});
  Tensor lse = torch::stable::new_empty(qc, {p.B, p.Hq, p.Lq}, lse_type(p));
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
  bool ok = t.dim() == int64_t(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = t.size(int64_t(d)) == shape[d];
  std::string want = "(";
  for (size_t d = 0; d < shape.size(); ++d) want += (d ? ", " : "") + std::to_string(shape[d]);
  want += ")";
  STD_TORCH_CHECK(ok, op, ": ", what, " must have shape ", want, ", got ", shape_str(t));
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
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                  ": grad_out and out must have q's dtype");
  STD_TORCH_CHECK(lse.scalar_type() == lse_type(p), op, ": lse must be ",
                  p.dt == DType::F64 ? "float64" : "float32");
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
