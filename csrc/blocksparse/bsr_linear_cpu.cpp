// CPU implementations of the semisparse::bsr_linear* ops (schemas are defined once, in
// python/semisparse/ops/bsr.py): argument and index checks, bf16/fp16 <-> fp32 staging,
// the block-row list and the CSC lists, then the kernels (bsr_linear_kernel.h) on the
// path active_cpu_isa() selects. LibTorch stable ABI only.
#include <cstring>
#include <optional>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "blocksparse/bsr_linear_cpu.h"
#include "common/parallel.h"
#include "common/stable_tensor.h"
#include "sparse24/sparse24_checks.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::bsr {
namespace {

using sparse24::DType;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

using common::contig;

void check_cpu(const Tensor& t, const char* op, const char* what) {
  STD_TORCH_CHECK(t.is_cpu(), "semisparse::", op, ": ", what, " must be a CPU tensor for this kernel");
}

void check_same_dtype(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), "semisparse::", op, ": ", an, " has dtype ",
                  torch::headeronly::toString(a.scalar_type()), " but ", bn, " has ",
                  torch::headeronly::toString(b.scalar_type()));
}

// The dense operand a (named an) and the block values [nnz, bh, bw] of linear / grad_input:
// both CPU tensors of one dtype, values 3-D with a non-empty block shape.
struct Blocks {
  DType dt;
  int64_t nnz, bh, bw;
};

Blocks check_values(const Tensor& a, const Tensor& values, const char* op, const char* an) {
  check_cpu(a, op, an);
  check_cpu(values, op, "values");
  STD_TORCH_CHECK(values.dim() == 3, "semisparse::", op, ": values must be 3-D [nnz, bh, bw], got ",
                  values.dim(), " dims");
  const DType dt = sparse24::to_dtype(values, "values");
  check_same_dtype(a, values, op, an, "values");
  const Blocks b{dt, values.size(0), values.size(1), values.size(2)};
  STD_TORCH_CHECK(b.bh > 0 && b.bw > 0, "semisparse::", op, ": empty block shape");
  return b;
}

// t's sizes with the last one replaced by last.
std::vector<int64_t> sizes_with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) s.push_back(t.size(d));
  s.push_back(last);
  return s;
}

// crow [nbr + 1], col [nnz]: int64, 1-D; crow from 0 to nnz, non-decreasing; col in [0, nbc).
// (Sortedness within a row is not needed by the kernels; the format checks it.)
void check_index(const Tensor& crow, const Tensor& col, int64_t nbr, int64_t nbc, int64_t nnz, const char* op) {
  check_cpu(crow, op, "crow_indices");
  check_cpu(col, op, "col_indices");
  STD_TORCH_CHECK(crow.dim() == 1 && crow.scalar_type() == ScalarType::Long, "semisparse::", op,
                  ": crow_indices must be a 1-D int64 tensor");
  STD_TORCH_CHECK(col.dim() == 1 && col.scalar_type() == ScalarType::Long, "semisparse::", op,
                  ": col_indices must be a 1-D int64 tensor");
  STD_TORCH_CHECK(crow.size(0) == nbr + 1, "semisparse::", op, ": crow_indices must have ", nbr + 1,
                  " entries (block rows + 1), got ", crow.size(0));
  STD_TORCH_CHECK(col.size(0) == nnz, "semisparse::", op, ": col_indices has ", col.size(0),
                  " entries but there are ", nnz, " blocks");
}

void check_index_values(const int64_t* crow, const int64_t* col, int64_t nbr, int64_t nbc, int64_t nnz,
                        const char* op) {
  STD_TORCH_CHECK(crow[0] == 0 && crow[nbr] == nnz, "semisparse::", op,
                  ": crow_indices must start at 0 and end at nnz=", nnz, ", got ", crow[0], " .. ", crow[nbr]);
  for (int64_t r = 0; r < nbr; ++r)
    STD_TORCH_CHECK(crow[r] <= crow[r + 1], "semisparse::", op,
                    ": crow_indices must be non-decreasing (block row ", r, ")");
  for (int64_t b = 0; b < nnz; ++b)
    STD_TORCH_CHECK(col[b] >= 0 && col[b] < nbc, "semisparse::", op, ": col_indices[", b, "] = ", col[b],
                    " is out of range [0, ", nbc, ")");
}

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
  const auto [dt, nnz, bh, bw] = check_values(x, values, op, "x");
  STD_TORCH_CHECK(N >= 0 && N % bh == 0, "semisparse::", op, ": out_features=", N,
                  " is not a multiple of the block height ", bh);
  STD_TORCH_CHECK(x.dim() >= 1, "semisparse::", op, ": x must have at least 1 dim");
  const int64_t K = x.size(x.dim() - 1);
  STD_TORCH_CHECK(K % bw == 0, "semisparse::", op, ": x must end in K features, a multiple of the block width ",
                  bw, ", got ", K);
  const int64_t nbr = N / bh, nbc = K / bw;
  check_index(crow, col, nbr, nbc, nnz, op);
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    check_same_dtype(*bias, values, op, "bias", "values");
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "semisparse::", op, ": bias must have shape [", N, "]");
  }
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
  const auto [dt, nnz, bh, bw] = check_values(gy, values, op, "grad_y");
  STD_TORCH_CHECK(gy.dim() >= 1, "semisparse::", op, ": grad_y must have at least 1 dim");
  const int64_t N = gy.size(gy.dim() - 1);
  STD_TORCH_CHECK(N % bh == 0, "semisparse::", op, ": grad_y must end in N features, a multiple of the block height ",
                  bh, ", got ", N);
  STD_TORCH_CHECK(K >= 0 && K % bw == 0, "semisparse::", op, ": in_features=", K,
                  " is not a multiple of the block width ", bw);
  const int64_t nbr = N / bh, nbc = K / bw;
  check_index(crow, col, nbr, nbc, nnz, op);
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
  check_cpu(gy, op, "grad_y");
  check_cpu(x, op, "x");
  STD_TORCH_CHECK(bh > 0 && bw > 0, "semisparse::", op, ": block shape must be positive, got (", bh, ", ", bw, ")");
  const DType dt = sparse24::to_dtype(x, "x");
  check_same_dtype(gy, x, op, "grad_y", "x");
  STD_TORCH_CHECK(gy.dim() >= 1 && x.dim() == gy.dim(), "semisparse::", op,
                  ": grad_y and x must have the same number of dims (>= 1)");
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    STD_TORCH_CHECK(x.size(d) == gy.size(d), "semisparse::", op, ": grad_y and x differ in leading dim ", d);
  const int64_t N = gy.size(gy.dim() - 1), K = x.size(x.dim() - 1);
  STD_TORCH_CHECK(N % bh == 0, "semisparse::", op, ": N=", N, " is not a multiple of the block height ", bh);
  STD_TORCH_CHECK(K % bw == 0, "semisparse::", op, ": K=", K, " is not a multiple of the block width ", bw);
  const int64_t nbr = N / bh, nbc = K / bw;
  STD_TORCH_CHECK(col.dim() == 1, "semisparse::", op, ": col_indices must be 1-D");
  const int64_t nnz = col.size(0);
  check_index(crow, col, nbr, nbc, nnz, op);
  Tensor gc = contig(gy), xc = contig(x), cc = contig(crow), lc = contig(col);
  const int64_t* crp = static_cast<const int64_t*>(cc.const_data_ptr());
  const int64_t* clp = static_cast<const int64_t*>(lc.const_data_ptr());
  check_index_values(crp, clp, nbr, nbc, nnz, op);
  Tensor gv = torch::stable::new_empty(xc, {nnz, bh, bw});
  if (nnz == 0) return gv;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < xc.dim(); ++d) M *= xc.size(d);
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
