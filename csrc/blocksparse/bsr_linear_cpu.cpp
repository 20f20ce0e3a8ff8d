// CPU implementations of the semisparse::bsr_linear* ops (schemas are defined once, in
// python/semisparse/ops/bsr.py): argument and index checks (shared with the CUDA front
// end: bsr_linear_checks.h), bf16/fp16 <-> fp32 staging, the block-row list and the CSC
// lists, then the kernels (bsr_linear_kernel.h) on the path active_cpu_isa() selects.
// LibTorch stable ABI only.
#include <cstring>
#include <optional>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "blocksparse/bsr_linear_checks.h"
#include "blocksparse/bsr_linear_cpu.h"
#include "common/parallel.h"
#include "common/stable_tensor.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::bsr {
namespace {

using sparse24::DType;
using torch::stable::Tensor;

using checks::check_index_values;
using checks::sizes_with_last;
using common::contig;

// The CPU side of the shared checks (bsr_linear_checks.h): every operand a CPU tensor.
struct OnCpu {
  void on(const Tensor& t, const char* op, const char* what) const {
    STD_TORCH_CHECK(t.is_cpu(), "semisparse::", op, ": ", what, " must be a CPU tensor for this kernel");
  }
  void same(const Tensor&, const char*, const char*) const {}
};

// A contiguous fp32/fp64 view of t's data: the pointer itself, or a converted copy in buf.
const void* as_compute(const Tensor& t, DType dt, std::vector<float>& buf) {
  if (dt == DType::F32 || dt == DType::F64) return t.const_data_ptr();
  const int64_t n = t.numel();
  buf.resize(static_cast<size_t>(n));
  const void* src = t.const_data_ptr();
  float* dst = buf.data();
  parallel_for(0, n, 1 << 14, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) dst[i] = sparse24::load_as_f32(src, i, dt);
  });
  return buf.data();
}

void store_out(const std::vector<float>& buf, Tensor& out, DType dt) {
  void* dst = out.mutable_data_ptr();
  const float* src = buf.data();
  parallel_for(0, out.numel(), 1 << 14, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) sparse24::store_from_f32(dst, i, dt, src[i]);
  });
}

std::vector<int64_t> block_rows(const int64_t* crow, int64_t nbr, int64_t nnz) {
  std::vector<int64_t> rows(static_cast<size_t>(nnz));
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) rows[b] = r;
  return rows;
}

// A problem of op on the block index (crow, col) and the given sizes; the caller sets its
// operands (a, b, bias, rows, ccol, cblk) and run_into() its output.
Problem make_problem(Op op, DType dt, const int64_t* crow, const int64_t* col, int64_t M, int64_t N, int64_t K,
                     int64_t nnz, int64_t bh, int64_t bw) {
  Problem p{};
  p.op = op;
  p.crow = crow;
  p.col = col;
  p.M = M; p.N = N; p.K = K; p.nnz = nnz; p.bh = bh; p.bw = bw;
  p.f64 = dt == DType::F64;
  return p;
}

// Runs p with out either written directly (fp32/fp64) or staged through fp32.
void run_into(Problem& p, Tensor& out, DType dt) {
  if (dt == DType::F32 || dt == DType::F64) {
    p.out = out.mutable_data_ptr();
    run(p);
    return;
  }
  std::vector<float> obuf(static_cast<size_t>(out.numel()));
  p.out = obuf.data();
  run(p);
  store_out(obuf, out, dt);
}

Tensor linear_cpu(Tensor x, Tensor values, Tensor crow, Tensor col, int64_t N, std::optional<Tensor> bias) {
  const char* op = "bsr_linear";
  const auto [dt, nnz, bh, bw] = checks::check_values<DType>(x, values, op, "x", OnCpu{});
  const int64_t K = checks::linear_in_features(x, N, bh, bw, op);
  const int64_t nbr = N / bh, nbc = K / bw;
  checks::check_index(crow, col, nbr, nnz, op, OnCpu{});
  if (bias.has_value()) checks::check_bias(*bias, values, N, op, OnCpu{});
  Tensor xc = contig(x), vc = contig(values), cc = contig(crow), lc = contig(col);
  std::optional<Tensor> bc;
  if (bias.has_value()) bc = contig(*bias);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());
  check_index_values(crp, clp, nbr, nbc, nnz, op);
  Tensor y = torch::stable::new_empty(xc, sizes_with_last(xc, N));
  if (y.numel() == 0) return y;
  const int64_t M = y.numel() / N;  // (not x.numel() / K: K may be 0)
  std::vector<float> xb, vb, bb;
  Problem p = make_problem(Op::Forward, dt, crp, clp, M, N, K, nnz, bh, bw);
  p.a = as_compute(xc, dt, xb);
  p.b = as_compute(vc, dt, vb);
  p.bias = bc ? as_compute(*bc, dt, bb) : nullptr;
  run_into(p, y, dt);
  return y;
}

Tensor grad_input_cpu(Tensor gy, Tensor values, Tensor crow, Tensor col, int64_t K) {
  const char* op = "bsr_linear_grad_input";
  const auto [dt, nnz, bh, bw] = checks::check_values<DType>(gy, values, op, "grad_y", OnCpu{});
  const int64_t N = checks::grad_input_out_features(gy, K, bh, bw, op);
  const int64_t nbr = N / bh, nbc = K / bw;
  checks::check_index(crow, col, nbr, nnz, op, OnCpu{});
  Tensor gc = contig(gy), vc = contig(values), cc = contig(crow), lc = contig(col);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());
  check_index_values(crp, clp, nbr, nbc, nnz, op);
  Tensor gx = torch::stable::new_empty(gc, sizes_with_last(gc, K));
  if (gx.numel() == 0) return gx;
  const int64_t M = gx.numel() / K;
  // CSC lists: the blocks of every block column, in block-row order
  std::vector<int64_t> rows = block_rows(crp, nbr, nnz);
  std::vector<int64_t> ccol(static_cast<size_t>(nbc + 1), 0), cblk(static_cast<size_t>(nnz));
  for (int64_t b = 0; b < nnz; ++b) ++ccol[clp[b] + 1];
  for (int64_t c = 0; c < nbc; ++c) ccol[c + 1] += ccol[c];
  {
    std::vector<int64_t> fill(ccol.begin(), ccol.end() - 1);
    for (int64_t b = 0; b < nnz; ++b) cblk[fill[clp[b]]++] = b;
  }
  std::vector<float> gb, vb;
  Problem p = make_problem(Op::GradInput, dt, crp, clp, M, N, K, nnz, bh, bw);
  p.a = as_compute(gc, dt, gb);
  p.b = as_compute(vc, dt, vb);
  p.rows = rows.data();
  p.ccol = ccol.data();
  p.cblk = cblk.data();
  run_into(p, gx, dt);
  return gx;
}

Tensor grad_values_cpu(Tensor gy, Tensor x, Tensor crow, Tensor col, int64_t bh, int64_t bw) {
  const char* op = "bsr_linear_grad_values";
  const auto [dt, N, K, nbr, nbc, nnz] = checks::check_grad_values<DType>(gy, x, col, bh, bw, op, OnCpu{});
  checks::check_index(crow, col, nbr, nnz, op, OnCpu{});
  Tensor gc = contig(gy), xc = contig(x), cc = contig(crow), lc = contig(col);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());
  check_index_values(crp, clp, nbr, nbc, nnz, op);
  Tensor gv = torch::stable::new_empty(xc, {nnz, bh, bw});
  if (nnz == 0) return gv;
  const int64_t M = checks::leading(xc);
  if (M == 0) {
    torch::stable::zero_(gv);
    return gv;
  }
  std::vector<int64_t> rows = block_rows(crp, nbr, nnz);
  std::vector<float> gb, xb;
  Problem p = make_problem(Op::GradValues, dt, crp, clp, M, N, K, nnz, bh, bw);
  p.a = as_compute(gc, dt, gb);
  p.b = as_compute(xc, dt, xb);
  p.rows = rows.data();
  run_into(p, gv, dt);
  return gv;
}

}  // namespace
}  // namespace semisparse::bsr

STABLE_TORCH_LIBRARY_IMPL(semisparse, CPU, m) {
  m.impl("bsr_linear", TORCH_BOX(&semisparse::bsr::linear_cpu));
  m.impl("bsr_linear_grad_input", TORCH_BOX(&semisparse::bsr::grad_input_cpu));
  m.impl("bsr_linear_grad_values", TORCH_BOX(&semisparse::bsr::grad_values_cpu));
}
