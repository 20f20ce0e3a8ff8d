// Generic (portable C++) Gumbel N:M kernels: the fp32 kernel on a scalar "vector" of width
// 1 (used when no SIMD path is active), the fp64 kernel (used whenever an input is fp64),
// and the run-time dispatch.
#include <cmath>
#include <vector>

#include "common/isa_dispatch.h"
#include "common/parallel.h"
#include "gumbel/gumbel_cpu.h"

#define GUMBEL_KERNEL_NS k_generic
#include "gumbel/gumbel_kernel.h"

namespace semisparse::gumbel {
namespace {

struct VScalar {
  static constexpr int W = 1;
  using F = float;
  using I = uint32_t;
  static F set1(float a) { return a; }
  static I set1i(uint32_t a) { return a; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F a) { *p = a; }
  static I loadi(const uint32_t* p) { return *p; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F min(F a, F b) { return a < b ? a : b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static bool lt(F a, F b) { return a < b; }
  static bool gt(F a, F b) { return a > b; }
  static F blend(bool mk, F a, F b) { return mk ? b : a; }
  static I blendi(bool mk, I a, I b) { return mk ? b : a; }
  static I f2bits(F a) { I r; std::memcpy(&r, &a, 4); return r; }
  static F bits2f(I a) { F r; std::memcpy(&r, &a, 4); return r; }
  static I addi(I a, I b) { return a + b; }
  static I subi(I a, I b) { return a - b; }
  static I andi(I a, I b) { return a & b; }
  static I ori(I a, I b) { return a | b; }
  static I xori(I a, I b) { return a ^ b; }
  static I srli8(I a) { return a >> 8; }
  static I srli23(I a) { return a >> 23; }
  static I slli23(I a) { return a << 23; }
  static I srli(I a, int s) { return a >> s; }
  static F i2f(I a) { return float(int32_t(a)); }
  static I round2i(F a) { return uint32_t(int32_t(std::lrintf(a))); }
  static void mulhilo(I a, I mconst, I& hi, I& lo) {
    const uint64_t p = uint64_t(a) * mconst;
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
  }
  static void f16_run_to_f32(const uint16_t* s, float* d, int n) {
    for (int i = 0; i < n; ++i) d[i] = sparse24::f16_to_f32(s[i]);
  }
  static void f32_run_to_f16(const float* s, uint16_t* d, int n) {
    for (int i = 0; i < n; ++i) d[i] = sparse24::f32_to_f16(s[i]);
  }
};

inline double load_d(const void* p, int64_t i, DType t) {
  if (t == DType::F64) return static_cast<const double*>(p)[i];
  return sparse24::load_as_f32(p, i, t);
}

inline void store_d(void* p, int64_t i, DType t, double v) {
  if (t == DType::F64)
    static_cast<double*>(p)[i] = v;
  else
    sparse24::store_from_f32(p, i, t, static_cast<float>(v));
}

}  // namespace

void run_generic_f32(const Problem& p) { k_generic::run_f32<VScalar>(p); }

// fp64: one group at a time, libm log/exp.
void run_generic_f64(const Problem& p) {
  if (p.G == 0) return;
  const int C = p.C, m = p.m, B = (C + 3) / 4;
  const uint32_t k0 = uint32_t(p.seed), k1 = uint32_t(p.seed >> 32);
  const uint32_t olo = uint32_t(p.offset), ohi = uint32_t(p.offset >> 32);
  const bool fwd = p.op == Op::Mask || p.op == Op::MaskedWeight;
  parallel_for(0, p.G, 1024, [&](int64_t ga, int64_t gb) {
    double y[70], dp[70], mask[8];
    for (int64_t g = ga; g < gb; ++g) {
      for (int b = 0; b < B; ++b) {
        const uint64_t id = uint64_t(g) * uint64_t(B) + uint64_t(b);
        const uint32_t ctr[4] = {uint32_t(id), uint32_t(id >> 32), olo, ohi};
        uint32_t w[4];
        philox4x32_10(ctr, k0, k1, w);
        for (int q = 0; q < 4 && 4 * b + q < C; ++q) {
          const int c = 4 * b + q;
          const double u = (double(w[q] >> 8) + 0.5) * 0x1p-24;
          const double gn = -std::log(-std::log(u));
          y[c] = (p.kappa * load_d(p.logits, g * C + c, p.lt) + gn) / p.tau;
        }
      }
      if (fwd && p.hard) {
        int best = 0;
        for (int c = 1; c < C; ++c)
          if (y[c] > y[best]) best = c;
        for (int j = 0; j < m; ++j) mask[j] = (p.pattern[best] >> j) & 1;
      } else {
        double mx = y[0];
        for (int c = 1; c < C; ++c) mx = y[c] > mx ? y[c] : mx;
        double s = 0;
        for (int c = 0; c < C; ++c) {
          y[c] = std::exp(y[c] - mx);
          s += y[c];
        }
        for (int c = 0; c < C; ++c) y[c] /= s;
        if (fwd) {
          for (int j = 0; j < m; ++j) mask[j] = 0;
          for (int c = 0; c < C; ++c)
            for (int j = 0; j < m; ++j)
              if ((p.pattern[c] >> j) & 1) mask[j] += y[c];
        }
      }
      if (fwd) {
        for (int j = 0; j < m; ++j) {
          const int64_t e = g * m + j;
          const double v = p.op == Op::MaskedWeight ? load_d(p.weight, e, p.wt) * mask[j] : mask[j];
          store_d(p.out, e, p.ot, v);
        }
        continue;
      }
      double gm[8];
      for (int j = 0; j < m; ++j) {
        const int64_t e = g * m + j;
        gm[j] = load_d(p.grad, e, p.gt);
        if (p.op == Op::MaskedWeightBackward) gm[j] *= load_d(p.weight, e, p.wt);
      }
      double s = 0;
      for (int c = 0; c < C; ++c) {
        double a = 0;
        for (int j = 0; j < m; ++j)
          if ((p.pattern[c] >> j) & 1) a += gm[j];
        dp[c] = a;
        s += y[c] * a;
      }
      const double kdt = p.kappa / p.tau;
      for (int c = 0; c < C; ++c) store_d(p.out, g * C + c, p.ot, y[c] * (dp[c] - s) * kdt);
    }
  });
}

void run(const Problem& p) {
  SEMISPARSE_RUN_ON_ACTIVE_ISA(run, p, any_f64(p));
}

}  // namespace semisparse::gumbel
