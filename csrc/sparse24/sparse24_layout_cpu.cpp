// CPU kernels of the layout-aware 2:4 ops (schemas in python/semisparse/ops/sparse24.py):
//   sparse24_pack   dense -> values + meta in any layout ("cpu", "cutlass_sm80",
//                   "cutlass_sm90"), optionally pruning to the 2 largest magnitudes of
//                   each group of 4 on the fly;
//   sparse24_unpack values + meta in any layout -> dense;
//   sparse24_mm     act(x @ W^T + bias) for W in any layout.
// The GPU layouts are reorderings of the "cpu" codes (meta_layout.h, the same index math
// the CUDA kernels use), so each op compresses / multiplies through the "cpu" layout
// kernels of sparse24_cpu.h and moves the metadata words with sm80_meta_word /
// sm90_meta_byte. That makes these kernels the host-side check of meta_layout.h: the
// tests compare them with PyTorch's CUTLASS sm80 conversion and the Python references.
//
// sparse24_mm on the CPU rounds x @ W^T + bias to the output dtype before the activation
// (the GPU kernels activate the fp32 accumulator): at most one extra rounding for
// float16 / bfloat16 when an activation is fused; float32 / float64 are unaffected.
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "sparse24/layout_checks.h"
#include "sparse24/meta_layout.h"
#include "sparse24/sparse24_checks.h"
#include "sparse24/sparse24_cpu.h"

namespace semisparse::sparse24 {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
using common::contig;

void check_cpu(const Tensor& t, const char* op, const char* what) {
  STD_TORCH_CHECK(t.is_cpu(), op, ": ", what, " must be a CPU tensor for this kernel");
}

// ------------------------------------------------------------- meta reordering
// cpu meta [N, K/8] (K % 16 == 0 for sm80, % 64 for sm90) -> layout l (out: its storage)
void meta_from_cpu(const uint8_t* cpu, int64_t mcols, void* out, MetaLayout l, int64_t N, int64_t K) {
  if (l == MetaLayout::kSm80) {
    auto* w = static_cast<uint16_t*>(out);
    const int64_t ncols = K / 16;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < ncols; ++c) {
        const uint8_t* b = cpu + r * mcols + 2 * c;
        w[sm80_meta_word(r, c, N)] = static_cast<uint16_t>(b[0] | (b[1] << 8));
      }
  } else {
    auto* o = static_cast<uint8_t*>(out);
    const int64_t nb = K / 8;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < nb; ++j) o[sm90_meta_byte(r, j, N)] = cpu[r * mcols + j];
  }
}

// layout l (in) -> cpu meta [N, K/8]
void meta_to_cpu(const void* in, MetaLayout l, uint8_t* cpu, int64_t mcols, int64_t N, int64_t K) {
  if (l == MetaLayout::kSm80) {
    const auto* w = static_cast<const uint16_t*>(in);
    const int64_t ncols = K / 16;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t c = 0; c < ncols; ++c) {
        const uint16_t v = w[sm80_meta_word(r, c, N)];
        cpu[r * mcols + 2 * c] = static_cast<uint8_t>(v & 0xff);
        cpu[r * mcols + 2 * c + 1] = static_cast<uint8_t>(v >> 8);
      }
  } else {
    const auto* b = static_cast<const uint8_t*>(in);
    const int64_t nb = K / 8;
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < nb; ++j) cpu[r * mcols + j] = b[sm90_meta_byte(r, j, N)];
  }
}

Tensor meta_tensor_like(const Tensor& like, MetaLayout l, int64_t N, int64_t K) {
  if (l == MetaLayout::kCpu) return torch::stable::new_empty(like, {N, meta_cols_for(K)}, ScalarType::Byte);
  if (l == MetaLayout::kSm80) return torch::stable::new_empty(like, {N, K / 16}, ScalarType::Short);
  return torch::stable::new_empty(like, {K / 64, N / 64, 512}, ScalarType::Byte);
}

// "cpu" meta of (values, meta in layout l): meta itself for l == cpu, else a reordered copy
Tensor cpu_meta_of(const Tensor& meta, MetaLayout l, int64_t N, int64_t K) {
  Tensor mc = contig(meta);
  if (l == MetaLayout::kCpu) return mc;
  Tensor out = meta_tensor_like(mc, MetaLayout::kCpu, N, K);
  if (N > 0 && K > 0)
    meta_to_cpu(mc.const_data_ptr(), l, static_cast<uint8_t*>(out.mutable_data_ptr()), out.size(1), N, K);
  return out;
}

// ------------------------------------------------------------- prune by magnitude
double abs_at(const void* p, int64_t i, DType t) {
  if (t == DType::F64) return std::fabs(static_cast<const double*>(p)[i]);
  return std::fabs(static_cast<double>(load_as_f32(p, i, t)));
}

// Keep the 2 largest |v| of each group of 4 (ties: lower index; NaN ranks lowest, as in
// semisparse.formats.nm_mask); pruned entries become +0.0 (all bits zero).
void prune_groups(const void* src, void* dst, int64_t N, int64_t K, DType t) {
  const int es = dtype_size(t);
  const auto* s = static_cast<const unsigned char*>(src);
  auto* d = static_cast<unsigned char*>(dst);
  std::memset(d, 0, static_cast<size_t>(N * K * es));
  const int64_t groups = N * K / 4;
  for (int64_t g = 0; g < groups; ++g) {
    double a[4];
    bool nan[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = abs_at(src, 4 * g + i, t);
      nan[i] = std::isnan(a[i]);
    }
    // rank: i beats j when (not NaN, j NaN), or both (not) NaN and |v_i| > |v_j|, or equal and i < j
    auto beats = [&](int i, int j) {
      if (nan[i] != nan[j]) return !nan[i];
      if (!nan[i] && a[i] != a[j]) return a[i] > a[j];
      return i < j;
    };
    for (int i = 0; i < 4; ++i) {
      int better = 0;
      for (int j = 0; j < 4; ++j)
        if (j != i && beats(j, i)) ++better;
      if (better < 2) std::memcpy(d + (4 * g + i) * es, s + (4 * g + i) * es, es);
    }
  }
}

// ------------------------------------------------------------------------ ops
std::tuple<Tensor, Tensor> pack_cpu(Tensor dense, std::string layout, bool prune) {
  const char* op = "sparse24_pack";
  check_cpu(dense, op, "dense");
  const MetaLayout l = parse_layout(layout, op);
  STD_TORCH_CHECK(dense.dim() == 2, op, ": dense must be 2-D [N, K], got ", dense.dim(), " dims");
  const DType t = to_dtype(dense, "dense");
  const int64_t N = dense.size(0), K = dense.size(1);
  check_layout_shape(l, N, K, dense.scalar_type(), op);
  Tensor dc = contig(dense);
  if (prune && N > 0 && K > 0) {
    Tensor pruned = torch::stable::new_empty(dc, {N, K});
    prune_groups(dc.const_data_ptr(), pruned.mutable_data_ptr(), N, K, t);
    dc = pruned;
  }
  Tensor values = torch::stable::new_empty(dc, {N, K / 2});
  Tensor cpu = meta_tensor_like(dc, MetaLayout::kCpu, N, K);
  if (N > 0 && K > 0)
    compress(dc.const_data_ptr(), values.mutable_data_ptr(), static_cast<uint8_t*>(cpu.mutable_data_ptr()), N, K,
             cpu.size(1), t);
  else if (cpu.numel() > 0)
    torch::stable::zero_(cpu);
  if (l == MetaLayout::kCpu) return std::make_tuple(values, cpu);
  Tensor meta = meta_tensor_like(dc, l, N, K);
  if (N > 0 && K > 0)
    meta_from_cpu(static_cast<const uint8_t*>(cpu.const_data_ptr()), cpu.size(1), meta.mutable_data_ptr(), l, N, K);
  return std::make_tuple(values, meta);
}

void check_values(const Tensor& values, const Tensor& meta, MetaLayout l, const char* op) {
  STD_TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, K/2], got ", values.dim(), " dims");
  const int64_t N = values.size(0), K = 2 * values.size(1);
  check_layout_shape(l, N, K, values.scalar_type(), op);
  check_layout_meta(l, meta, N, K, op);
}

Tensor unpack_cpu(Tensor values, Tensor meta, std::string layout) {
  const char* op = "sparse24_unpack";
  check_cpu(values, op, "values");
  check_cpu(meta, op, "meta");
  const MetaLayout l = parse_layout(layout, op);
  const DType t = to_dtype(values, "values");
  check_values(values, meta, l, op);
  const int64_t N = values.size(0), K = 2 * values.size(1);
  Tensor vc = contig(values);
  Tensor mc = cpu_meta_of(meta, l, N, K);
  Tensor dense = torch::stable::new_empty(vc, {N, K});
  if (N > 0 && K > 0)
    decompress(vc.const_data_ptr(), static_cast<const uint8_t*>(mc.const_data_ptr()), dense.mutable_data_ptr(), N, K,
               mc.size(1), t);
  return dense;
}

template <class T>
T activate(T z, Activation a) {
  switch (a) {
    case Activation::kRelu: return z > T(0) ? z : T(0);
    case Activation::kGelu: return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Activation::kSilu: return z / (T(1) + std::exp(-z));
    default: return z;
  }
}

Tensor mm_cpu(Tensor x, Tensor values, Tensor meta, std::string layout, std::optional<Tensor> bias,
              std::string activation) {
  const char* op = "sparse24_mm";
  check_cpu(x, op, "x");
  check_cpu(values, op, "values");
  check_cpu(meta, op, "meta");
  const MetaLayout l = parse_layout(layout, op);
  const Activation act = parse_activation(activation, op);
  const DType t = to_dtype(values, "values");
  check_values(values, meta, l, op);
  const int64_t N = values.size(0), K = 2 * values.size(1);
  STD_TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": x has dtype ", torch::headeronly::toString(x.scalar_type()),
                  " but the sparse weight has ", torch::headeronly::toString(values.scalar_type()));
  STD_TORCH_CHECK(x.dim() >= 1 && x.size(x.dim() - 1) == K, op, ": x must end in K=", K, " features, got ",
                  x.dim() >= 1 ? x.size(x.dim() - 1) : 0);
  std::optional<Tensor> bc;
  if (bias.has_value()) {
    check_cpu(*bias, op, "bias");
    STD_TORCH_CHECK(bias->scalar_type() == values.scalar_type(), op, ": bias has dtype ",
                    torch::headeronly::toString(bias->scalar_type()), ", expected ",
                    torch::headeronly::toString(values.scalar_type()));
    STD_TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",)");
    bc = contig(*bias);
  }
  Tensor xc = contig(x);
  Tensor vc = contig(values);
  Tensor mc = cpu_meta_of(meta, l, N, K);
  int64_t M = 1;
  std::vector<int64_t> out_sizes;
  for (int64_t d = 0; d + 1 < xc.dim(); ++d) {
    out_sizes.push_back(xc.size(d));
    M *= xc.size(d);
  }
  out_sizes.push_back(N);
  Tensor y = torch::stable::new_empty(xc, out_sizes);
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    // y = act(bias) (or act(0))
    torch::stable::zero_(y);
    if (!bc && act == Activation::kNone) return y;
  } else {
    LinearProblem p{xc.const_data_ptr(), vc.const_data_ptr(), static_cast<const uint8_t*>(mc.const_data_ptr()),
                    bc ? bc->const_data_ptr() : nullptr, y.mutable_data_ptr(), M, N, K, mc.size(1), t};
    linear(p);
    if (act == Activation::kNone) return y;
  }
  void* py = y.mutable_data_ptr();
  const void* pb = bc ? bc->const_data_ptr() : nullptr;
  const bool add_bias = K == 0 && pb != nullptr;  // (linear() added it otherwise)
  const int64_t total = M * N;
  if (t == DType::F64) {
    auto* yd = static_cast<double*>(py);
    for (int64_t i = 0; i < total; ++i) {
      double z = yd[i] + (add_bias ? static_cast<const double*>(pb)[i % N] : 0.0);
      yd[i] = activate(z, act);
    }
  } else {
    for (int64_t i = 0; i < total; ++i) {
      float z = load_as_f32(py, i, t) + (add_bias ? load_as_f32(pb, i % N, t) : 0.0f);
      store_from_f32(py, i, t, activate(z, act));
    }
  }
  return y;
}

}  // namespace
}  // namespace semisparse::sparse24

STABLE_TORCH_LIBRARY_IMPL(semisparse, CPU, m) {
  m.impl("sparse24_pack", TORCH_BOX(&semisparse::sparse24::pack_cpu));
  m.impl("sparse24_unpack", TORCH_BOX(&semisparse::sparse24::unpack_cpu));
  m.impl("sparse24_mm", TORCH_BOX(&semisparse::sparse24::mm_cpu));
}
