// Argument checks shared by the CPU and CUDA front ends of the semisparse::bsr_linear* ops
// (bsr_linear_cpu.cpp, bsr_linear_cuda.cu). Header-only, LibTorch stable ABI only, so nvcc
// compiles it too. Each front end brings its device-specific part as a Place:
//   place.on(t, op, what)    t is a tensor of the front end's device type (is_cpu / is_cuda)
//   place.same(t, op, what)  t is on the device of the reference operand (CPU: nothing to do)
// and its own kernel dtype enum DT (one with F32, BF16, F16 and F64). The checks run in the
// order, and fail with the messages, the ops have always had.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "common/stable_tensor.h"

namespace semisparse::bsr::checks {

using torch::stable::Tensor;

template <class DT>
DT to_dtype(const Tensor& t, const char* what) {
  return common::dtype_of<DT>(t, "semisparse: ", what, " must be float32, bfloat16, float16 (or float64), got ");
}

inline void check_same_dtype(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  STD_TORCH_CHECK(a.scalar_type() == b.scalar_type(), "semisparse::", op, ": ", an, " has dtype ",
                  torch::headeronly::toString(a.scalar_type()), " but ", bn, " has ",
                  torch::headeronly::toString(b.scalar_type()));
}

// t's sizes with the last one replaced by last.
inline std::vector<int64_t> sizes_with_last(const Tensor& t, int64_t last) {
  std::vector<int64_t> s;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) s.push_back(t.size(d));
  s.push_back(last);
  return s;
}

// The product of all but the last size (the token count M).
inline int64_t leading(const Tensor& t) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) m *= t.size(d);
  return m;
}

// The dense operand a (named an) and the block values [nnz, bh, bw] of linear / grad_input:
// both on the place (the reference device: values'), of one dtype, values 3-D with a
// non-empty block shape.
template <class DT>
struct Blocks {
  DT dt;
  int64_t nnz, bh, bw;
};

template <class DT, class Place>
Blocks<DT> check_values(const Tensor& a, const Tensor& values, const char* op, const char* an, const Place& place) {
  place.on(a, op, an);
  place.on(values, op, "values");
  STD_TORCH_CHECK(values.dim() == 3, "semisparse::", op, ": values must be 3-D [nnz, bh, bw], got ", values.dim(),
                  " dims");
  const DT dt = to_dtype<DT>(values, "values");
  check_same_dtype(a, values, op, an, "values");
  place.same(a, op, an);
  const Blocks<DT> b{dt, values.size(0), values.size(1), values.size(2)};
  STD_TORCH_CHECK(b.bh > 0 && b.bw > 0, "semisparse::", op, ": empty block shape");
  return b;
}

// bsr_linear: out_features N and the input x [..., K]; returns K.
inline int64_t linear_in_features(const Tensor& x, int64_t N, int64_t bh, int64_t bw, const char* op) {
  STD_TORCH_CHECK(N >= 0 && N % bh == 0, "semisparse::", op, ": out_features=", N,
                  " is not a multiple of the block height ", bh);
  STD_TORCH_CHECK(x.dim() >= 1, "semisparse::", op, ": x must have at least 1 dim");
  const int64_t K = x.size(x.dim() - 1);
  STD_TORCH_CHECK(K % bw == 0, "semisparse::", op, ": x must end in K features, a multiple of the block width ", bw,
                  ", got ", K);
  return K;
}

// bsr_linear_grad_input: grad_y [..., N] and in_features K; returns N.
inline int64_t grad_input_out_features(const Tensor& gy, int64_t K, int64_t bh, int64_t bw, const char* op) {
  STD_TORCH_CHECK(gy.dim() >= 1, "semisparse::", op, ": grad_y must have at least 1 dim");
  const int64_t N = gy.size(gy.dim() - 1);
  STD_TORCH_CHECK(N % bh == 0, "semisparse::", op, ": grad_y must end in N features, a multiple of the block height ",
                  bh, ", got ", N);
  STD_TORCH_CHECK(K >= 0 && K % bw == 0, "semisparse::", op, ": in_features=", K,
                  " is not a multiple of the block width ", bw);
  return N;
}

// bsr_linear_grad_values: grad_y [..., N] and x [..., K] on the place (the reference device:
// x's), of one dtype and the same leading sizes; N, K multiples of the positive block shape;
// col_indices 1-D (its length is nnz).
template <class DT>
struct GradValuesShape {
  DT dt;
  int64_t N, K, nbr, nbc, nnz;
};

template <class DT, class Place>
GradValuesShape<DT> check_grad_values(const Tensor& gy, const Tensor& x, const Tensor& col, int64_t bh, int64_t bw,
                                      const char* op, const Place& place) {
  place.on(gy, op, "grad_y");
  place.on(x, op, "x");
  STD_TORCH_CHECK(bh > 0 && bw > 0, "semisparse::", op, ": block shape must be positive, got (", bh, ", ", bw, ")");
  const DT dt = to_dtype<DT>(x, "x");
  check_same_dtype(gy, x, op, "grad_y", "x");
  place.same(gy, op, "grad_y");
  STD_TORCH_CHECK(gy.dim() >= 1 && x.dim() == gy.dim(), "semisparse::", op,
                  ": grad_y and x must have the same number of dims (>= 1)");
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    STD_TORCH_CHECK(x.size(d) == gy.size(d), "semisparse::", op, ": grad_y and x differ in leading dim ", d);
  const int64_t N = gy.size(gy.dim() - 1), K = x.size(x.dim() - 1);
  STD_TORCH_CHECK(N % bh == 0, "semisparse::", op, ": N=", N, " is not a multiple of the block height ", bh);
  STD_TORCH_CHECK(K % bw == 0, "semisparse::", op, ": K=", K, " is not a multiple of the block width ", bw);
  STD_TORCH_CHECK(col.dim() == 1, "semisparse::", op, ": col_indices must be 1-D");
  return {dt, N, K, N / bh, K / bw, col.size(0)};
}

// The optional bias [N] of bsr_linear: on the place, of values' dtype.
template <class Place>
void check_bias(const Tensor& bias, const Tensor& values, int64_t N, const char* op, const Place& place) {
  place.on(bias, op, "bias");
  check_same_dtype(bias, values, op, "bias", "values");
  place.same(bias, op, "bias");
  STD_TORCH_CHECK(bias.dim() == 1 && bias.size(0) == N, "semisparse::", op, ": bias must have shape [", N, "]");
}

// crow [nbr + 1], col [nnz]: int64, 1-D, on the place. (Their values: check_index_values.)
template <class Place>
void check_index(const Tensor& crow, const Tensor& col, int64_t nbr, int64_t nnz, const char* op,
                 const Place& place) {
  place.on(crow, op, "crow_indices");
  place.on(col, op, "col_indices");
  STD_TORCH_CHECK(crow.dim() == 1 && crow.scalar_type() == torch::headeronly::ScalarType::Long, "semisparse::", op,
                  ": crow_indices must be a 1-D int64 tensor");
  STD_TORCH_CHECK(col.dim() == 1 && col.scalar_type() == torch::headeronly::ScalarType::Long, "semisparse::", op,
                  ": col_indices must be a 1-D int64 tensor");
  STD_TORCH_CHECK(crow.size(0) == nbr + 1, "semisparse::", op, ": crow_indices must have ", nbr + 1,
                  " entries (block rows + 1), got ", crow.size(0));
  STD_TORCH_CHECK(col.size(0) == nnz, "semisparse::", op, ": col_indices has ", col.size(0), " entries but there are ",
                  nnz, " blocks");
  place.same(crow, op, "crow_indices");
  place.same(col, op, "col_indices");
}

// The index values, on host memory: crow from 0 to nnz, non-decreasing; col in [0, nbc).
// (Sortedness within a row is not needed by the kernels; the format checks it.)
inline void check_index_values(const int64_t* crow, const int64_t* col, int64_t nbr, int64_t nbc, int64_t nnz,
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

}  // namespace semisparse::bsr::checks
