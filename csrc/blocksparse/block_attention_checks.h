// Argument checks shared by the CPU (block_attention_cpu.cpp) and CUDA
// (block_attention_cuda.cu) front ends of semisparse::block_sparse_attention{,_backward}.
// Each front end keeps only its device checks (is_cpu / is_cuda, one device) and passes
// them in; the wording of every message is the same on both sides. LibTorch stable ABI
// only and header-only, so g++ and nvcc both compile it.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/stable_tensor.h"

namespace semisparse::blockattn::checks {

// Validates q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], the bool block_mask
// [B or 1, Hq or 1, ceil(Lq/block_q), ceil(Lk/block_k)], the block sizes and the scale,
// and fills the shape fields of p (dt, B, Hq, Hkv, Lq, Lk, D, Dv, bq, bk, nqb, nkb, mB, mH,
// scale, causal) -- P is the front end's own struct, dt its DType enum (F32, BF16, F16,
// F64). device_check() runs right after the rank checks, before anything else.
template <class P, class DeviceCheck>
void check_shapes(P& p, const char* op, const torch::stable::Tensor& q, const torch::stable::Tensor& k,
                  const torch::stable::Tensor& v, const torch::stable::Tensor& mask, int64_t block_q,
                  int64_t block_k, double scale, bool causal, DeviceCheck&& device_check) {
  using common::shape_str;
  using torch::headeronly::ScalarType;
  using torch::headeronly::toString;
  STD_TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D [B, Hq, Lq, D], got shape ", shape_str(q));
  STD_TORCH_CHECK(k.dim() == 4, op, ": k must be 4-D [B, Hkv, Lk, D], got shape ", shape_str(k));
  STD_TORCH_CHECK(v.dim() == 4, op, ": v must be 4-D [B, Hkv, Lk, Dv], got shape ", shape_str(v));
  device_check();
  p.dt = common::dtype_of<decltype(p.dt)>(q, op, ": q must be float32/bfloat16/float16/float64, got ");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                  ": q, k and v must have the same dtype, got ", toString(q.scalar_type()), ", ",
                  toString(k.scalar_type()), ", ", toString(v.scalar_type()));
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
  STD_TORCH_CHECK(mask.scalar_type() == ScalarType::Bool, op, ": block_mask must be bool, got ",
                  toString(mask.scalar_type()));
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
}

// t must have exactly this shape (the device is the front end's to check).
inline void check_same(const char* op, const char* what, const torch::stable::Tensor& t,
                       const std::vector<int64_t>& shape) {
  bool ok = t.dim() == int64_t(shape.size());
  for (size_t d = 0; ok && d < shape.size(); ++d) ok = t.size(int64_t(d)) == shape[d];
  std::string want = "(";
  for (size_t d = 0; d < shape.size(); ++d) want += (d ? ", " : "") + std::to_string(shape[d]);
  want += shape.size() == 1 ? ",)" : ")";
  STD_TORCH_CHECK(ok, op, ": ", what, " must have shape ", want, ", got ", common::shape_str(t));
}

// The dtype of the lse: fp32, fp64 for fp64 inputs.
template <class P>
torch::headeronly::ScalarType lse_type(const P& p) {
  using torch::headeronly::ScalarType;
  return p.dt == decltype(p.dt)::F64 ? ScalarType::Double : ScalarType::Float;
}

// The backward's dtype checks: grad_out and out have q's dtype, lse has lse_type(p).
template <class P>
void check_backward_dtypes(const P& p, const char* op, const torch::stable::Tensor& q,
                           const torch::stable::Tensor& grad_out, const torch::stable::Tensor& out,
                           const torch::stable::Tensor& lse) {
  using torch::headeronly::toString;
  STD_TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                  ": grad_out and out must have q's dtype ", toString(q.scalar_type()), ", got ",
                  toString(grad_out.scalar_type()), ", ", toString(out.scalar_type()));
  STD_TORCH_CHECK(lse.scalar_type() == lse_type(p), op, ": lse must be ",
                  p.dt == decltype(p.dt)::F64 ? "float64" : "float32", ", got ", toString(lse.scalar_type()));
}

}  // namespace semisparse::blockattn::checks
