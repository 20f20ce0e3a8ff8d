// The fp32 Gumbel N:M kernel, written once over a small SIMD traits class V and included
// by each ISA's translation unit (generic scalar, AVX2+FMA, AVX-512), each compiled with
// its own flags. Not a public header: include it from exactly those TUs.
//
// Vectorisation: structure of arrays across groups. One vector holds W consecutive groups;
// candidate c of those groups is one vector y[c]. Philox runs on W counters at once (lane
// i = group g0+i, block b), and output word k of block b is directly candidate 4b+k of all
// W groups, so the noise needs no shuffles. log/exp are polynomial (Cephes-style, fp32,
// ~1-2 ulp). The logits, weights and gradients are loaded as contiguous runs converted to
// fp32 into small stack buffers and transposed to/from SoA there (L1-resident).
// The AVX2 / AVX-512 TUs run X2<X2<V>>: four independent vectors per step (32 / 64 groups),
// which hides the latency of the Philox and polynomial chains (1.4-1.9x over one vector).
// Threads: semisparse::parallel_for over tiles of W groups.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/parallel.h"
#include "gumbel/gumbel_cpu.h"

// GCC 12 reports false stringop-overflows on the staging loops (their bounds are <= W * m)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"

namespace semisparse::gumbel {
namespace GUMBEL_KERNEL_NS {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// -log(x) for normal positive x (Cephes logf, range reduced to [sqrt(.5), sqrt(2))).
template <class V>
inline typename V::F neg_log(typename V::F x) {
  using F = typename V::F;
  using I = typename V::I;
  const I bits = V::f2bits(x);
  const I ex = V::subi(V::srli23(bits), V::set1i(0x7e));  // exponent + 1 (m in [0.5, 1))
  F m = V::bits2f(V::ori(V::andi(bits, V::set1i(0x007fffffu)), V::set1i(0x3f000000u)));
  F e = V::i2f(ex);
  const auto small = V::lt(m, V::set1(0.707106781186547524f));
  const F tmp = V::blend(small, V::set1(0.f), m);
  m = V::sub(m, V::set1(1.f));
  e = V::sub(e, V::blend(small, V::set1(0.f), V::set1(1.f)));
  m = V::add(m, tmp);
  const F z = V::mul(m, m);
  F y = V::set1(7.0376836292E-2f);
  y = V::fmadd(y, m, V::set1(-1.1514610310E-1f));
  y = V::fmadd(y, m, V::set1(1.1676998740E-1f));
  y = V::fmadd(y, m, V::set1(-1.2420140846E-1f));
  y = V::fmadd(y, m, V::set1(1.4249322787E-1f));
  y = V::fmadd(y, m, V::set1(-1.6668057665E-1f));
  y = V::fmadd(y, m, V::set1(2.0000714765E-1f));
  y = V::fmadd(y, m, V::set1(-2.4999993993E-1f));
  y = V::fmadd(y, m, V::set1(3.3333331174E-1f));
  y = V::mul(V::mul(y, m), z);
  y = V::fmadd(e, V::set1(-2.12194440e-4f), y);
  y = V::fmadd(z, V::set1(-0.5f), y);
  F r = V::add(m, y);
  r = V::fmadd(e, V::set1(0.693359375f), r);
  return V::sub(V::set1(0.f), r);
}

// exp(x) for x <= 0 (any magnitude, -inf included): 0 below about -87.7, never NaN/Inf.
template <class V>
inline typename V::F exp_nonpos(typename V::F x) {
  using F = typename V::F;
  using I = typename V::I;
  x = V::max(x, V::set1(-88.0f));
  x = V::min(x, V::set1(0.0f));
  const I n = V::round2i(V::mul(x, V::set1(1.44269504088896341f)));  // in [-127, 0]
  const F nf = V::i2f(n);
  x = V::fmadd(nf, V::set1(-0.693359375f), x);
  x = V::fmadd(nf, V::set1(2.12194440e-4f), x);
  const F z = V::mul(x, x);
  F y = V::set1(1.9875691500E-4f);
  y = V::fmadd(y, x, V::set1(1.3981999507E-3f));
  y = V::fmadd(y, x, V::set1(8.3334519073E-3f));
  y = V::fmadd(y, x, V::set1(4.1665795894E-2f));
  y = V::fmadd(y, x, V::set1(1.6666665459E-1f));
  y = V::fmadd(y, x, V::set1(5.0000001201E-1f));
  y = V::fmadd(y, z, V::add(x, V::set1(1.f)));
  // 2^n; n = -127 gives the bit pattern 0 -> exactly 0
  const F scale = V::bits2f(V::slli23(V::addi(n, V::set1i(127))));
  return V::mul(y, scale);
}

// Gumbel noise from Philox words: u = min(((w >> 8) + 0.5) * 2^-24, 1 - 2^-24) (the fp32
// sum rounds as in the reference), g = -log(-log(u)).
template <class V>
inline typename V::F gumbel_from_word(typename V::I w) {
  using F = typename V::F;
  F u = V::add(V::i2f(V::srli8(w)), V::set1(0.5f));
  u = V::mul(u, V::set1(5.9604644775390625e-08f));
  u = V::min(u, V::set1(0.99999994039535522f));
  return neg_log<V>(neg_log<V>(u));
}

// f32 <-> storage conversions of a contiguous run
template <class V>
inline void load_run(const void* src, int64_t start, int cnt, DType t, float* dst) {
  switch (t) {
    case DType::F32: std::memcpy(dst, static_cast<const float*>(src) + start, size_t(cnt) * 4); break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + start;
      for (int i = 0; i < cnt; ++i) {
        const uint32_t u = uint32_t(s[i]) << 16;
        std::memcpy(dst + i, &u, 4);
      }
      break;
    }
    case DType::F16: V::f16_run_to_f32(static_cast<const uint16_t*>(src) + start, dst, cnt); break;
    default: {  // F64 is not served here; kept for safety
      const double* s = static_cast<const double*>(src) + start;
      for (int i = 0; i < cnt; ++i) dst[i] = float(s[i]);
    }
  }
}

template <class V>
inline void store_run(void* dst, int64_t start, int cnt, DType t, const float* src) {
  switch (t) {
    case DType::F32: std::memcpy(static_cast<float*>(dst) + start, src, size_t(cnt) * 4); break;
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst) + start;
      for (int i = 0; i < cnt; ++i) d[i] = sparse24::f32_to_bf16(src[i]);
      break;
    }
    case DType::F16: V::f32_run_to_f16(src, static_cast<uint16_t*>(dst) + start, cnt); break;
    default: {
      double* d = static_cast<double*>(dst) + start;
      for (int i = 0; i < cnt; ++i) d[i] = src[i];
    }
  }
}

// Two vectors of V per "vector": W doubles and every operation is issued twice on
// independent data, which gives the out-of-order core two interleaved dependency chains
// (Philox rounds, the log/exp polynomials) instead of one.
template <class V>
struct X2 {
  static constexpr int W = 2 * V::W;
  using VF = typename V::F;
  using VI = typename V::I;
  using VM = decltype(V::lt(VF(), VF()));
  struct F { VF a, b; };
  struct I { VI a, b; };
  struct M { VM a, b; };
  static F set1(float x) { return {V::set1(x), V::set1(x)}; }
  static I set1i(uint32_t x) { return {V::set1i(x), V::set1i(x)}; }
  static F load(const float* p) { return {V::load(p), V::load(p + V::W)}; }
  static void store(float* p, F x) { V::store(p, x.a); V::store(p + V::W, x.b); }
  static I loadi(const uint32_t* p) { return {V::loadi(p), V::loadi(p + V::W)}; }
#define GUMBEL_X2_F2(name) static F name(F x, F y) { return {V::name(x.a, y.a), V::name(x.b, y.b)}; }
#define GUMBEL_X2_I2(name) static I name(I x, I y) { return {V::name(x.a, y.a), V::name(x.b, y.b)}; }
  GUMBEL_X2_F2(add) GUMBEL_X2_F2(sub) GUMBEL_X2_F2(mul) GUMBEL_X2_F2(div) GUMBEL_X2_F2(max) GUMBEL_X2_F2(min)
  GUMBEL_X2_I2(addi) GUMBEL_X2_I2(subi) GUMBEL_X2_I2(andi) GUMBEL_X2_I2(ori) GUMBEL_X2_I2(xori)
#undef GUMBEL_X2_F2
#undef GUMBEL_X2_I2
  static F fmadd(F x, F y, F z) { return {V::fmadd(x.a, y.a, z.a), V::fmadd(x.b, y.b, z.b)}; }
  static M lt(F x, F y) { return {V::lt(x.a, y.a), V::lt(x.b, y.b)}; }
  static M gt(F x, F y) { return {V::gt(x.a, y.a), V::gt(x.b, y.b)}; }
  static F blend(M k, F x, F y) { return {V::blend(k.a, x.a, y.a), V::blend(k.b, x.b, y.b)}; }
  static I blendi(M k, I x, I y) { return {V::blendi(k.a, x.a, y.a), V::blendi(k.b, x.b, y.b)}; }
  static I f2bits(F x) { return {V::f2bits(x.a), V::f2bits(x.b)}; }
  static F bits2f(I x) { return {V::bits2f(x.a), V::bits2f(x.b)}; }
  static I srli8(I x) { return {V::srli8(x.a), V::srli8(x.b)}; }
  static I srli23(I x) { return {V::srli23(x.a), V::srli23(x.b)}; }
  static I slli23(I x) { return {V::slli23(x.a), V::slli23(x.b)}; }
  static I srli(I x, int s) { return {V::srli(x.a, s), V::srli(x.b, s)}; }
  static F i2f(I x) { return {V::i2f(x.a), V::i2f(x.b)}; }
  static I round2i(F x) { return {V::round2i(x.a), V::round2i(x.b)}; }
  static void mulhilo(I x, I mc, I& hi, I& lo) {
    V::mulhilo(x.a, mc.a, hi.a, lo.a);
    V::mulhilo(x.b, mc.b, hi.b, lo.b);
  }
  static void f16_run_to_f32(const uint16_t* s, float* d, int n) { V::f16_run_to_f32(s, d, n); }
  static void f32_run_to_f16(const float* s, uint16_t* d, int n) { V::f32_run_to_f16(s, d, n); }
};

struct Consts {
  uint32_t rk0[10], rk1[10];  // round keys
  uint32_t off_lo, off_hi;
  float kappa, tau, kdt;
  int B;  // Philox blocks per group
};

// One tile: groups [g0, g0 + cnt), cnt <= W. CT / MT: compile-time C and m (0: runtime);
// FULL: cnt == W (constant trip counts for the staging loops).
template <class V, int CT, int MT, bool FULL>
inline void tile(const Problem& p, const Consts& k, int64_t g0, int cnt_) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int W = V::W;
  const int cnt = FULL ? W : cnt_;
  const int C = CT ? CT : p.C;
  const int m = MT ? MT : p.m;
  constexpr int CMAX = CT ? CT : 70;
  constexpr int MMAX = MT ? MT : 8;

  alignas(64) float aos[CMAX * W];  // AoS staging (C or m per group)
  alignas(64) float soa[CMAX * W];  // SoA staging
  F y[CMAX];

  // logits -> y (SoA)
  load_run<V>(p.logits, g0 * C, cnt * C, p.lt, aos);
  if (cnt < W) std::memset(aos + cnt * C, 0, size_t(W - cnt) * C * 4);
  for (int i = 0; i < W; ++i)
    for (int c = 0; c < C; ++c) soa[c * W + i] = aos[i * C + c];

  // noise, y = (kappa * l + g) / tau
  const F kap = V::set1(k.kappa), tau = V::set1(k.tau);
  for (int b = 0; b < k.B; ++b) {
    alignas(64) uint32_t lo[W], hi[W];
    for (int i = 0; i < W; ++i) {
      const uint64_t idx = uint64_t(g0 + i) * uint64_t(k.B) + uint64_t(b);
      lo[i] = uint32_t(idx);
      hi[i] = uint32_t(idx >> 32);
    }
    I c0 = V::loadi(lo), c1 = V::loadi(hi), c2 = V::set1i(k.off_lo), c3 = V::set1i(k.off_hi);
    const I m0 = V::set1i(kM0), m1 = V::set1i(kM1);
    for (int r = 0; r < 10; ++r) {
      I hi0, lo0, hi1, lo1;
      V::mulhilo(c0, m0, hi0, lo0);
      V::mulhilo(c2, m1, hi1, lo1);
      c0 = V::xori(V::xori(hi1, c1), V::set1i(k.rk0[r]));
      c1 = lo1;
      c2 = V::xori(V::xori(hi0, c3), V::set1i(k.rk1[r]));
      c3 = lo0;
    }
    const I words[4] = {c0, c1, c2, c3};
    for (int q = 0; q < 4; ++q) {
      const int c = 4 * b + q;
      if (c >= C) break;
      const F g = gumbel_from_word<V>(words[q]);
      y[c] = V::div(V::add(V::mul(kap, V::load(soa + c * W)), g), tau);
    }
  }

  const bool fwd = p.op == Op::Mask || p.op == Op::MaskedWeight;
  if (fwd && p.hard) {
    // argmax (first max wins) -> pattern bits
    F best = y[0];
    I pat = V::set1i(p.pattern[0]);
    for (int c = 1; c < C; ++c) {
      const auto gt = V::gt(y[c], best);
      best = V::blend(gt, best, y[c]);
      pat = V::blendi(gt, pat, V::set1i(p.pattern[c]));
    }
    for (int j = 0; j < m; ++j)
      V::store(soa + j * W, V::i2f(V::andi(V::srli(pat, j), V::set1i(1))));
  } else {
    // softmax
    F mx = y[0];
    for (int c = 1; c < C; ++c) mx = V::max(mx, y[c]);
    F sum = V::set1(0.f);
    for (int c = 0; c < C; ++c) {
      y[c] = exp_nonpos<V>(V::sub(y[c], mx));
      sum = V::add(sum, y[c]);
    }
    const F inv = V::div(V::set1(1.f), sum);
    for (int c = 0; c < C; ++c) y[c] = V::mul(y[c], inv);  // y now holds p
    if (fwd) {
      if constexpr (CT == 6 && MT == 4) {
        // 2:4: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
        V::store(soa + 0 * W, V::add(V::add(y[0], y[1]), y[2]));
        V::store(soa + 1 * W, V::add(V::add(y[0], y[3]), y[4]));
        V::store(soa + 2 * W, V::add(V::add(y[1], y[3]), y[5]));
        V::store(soa + 3 * W, V::add(V::add(y[2], y[4]), y[5]));
      } else {
        F acc[MMAX];
        for (int j = 0; j < m; ++j) acc[j] = V::set1(0.f);
        for (int c = 0; c < C; ++c)
          for (unsigned bits = p.pattern[c]; bits; bits &= bits - 1)
            acc[__builtin_ctz(bits)] = V::add(acc[__builtin_ctz(bits)], y[c]);
        for (int j = 0; j < m; ++j) V::store(soa + j * W, acc[j]);
      }
    }
  }

  if (fwd) {
    // soa[j * W + i] = mask of group i, element j -> AoS
    for (int i = 0; i < cnt; ++i)
      for (int j = 0; j < m; ++j) aos[i * m + j] = soa[j * W + i];
    if (p.op == Op::MaskedWeight) {
      alignas(64) float w[MMAX * W];
      load_run<V>(p.weight, g0 * m, cnt * m, p.wt, w);
      for (int i = 0; i < cnt * m; ++i) aos[i] = w[i] * aos[i];
    }
    store_run<V>(p.out, g0 * m, cnt * m, p.ot, aos);
    return;
  }

  // backward: gmask (AoS) -> SoA
  load_run<V>(p.grad, g0 * m, cnt * m, p.gt, aos);
  if (p.op == Op::MaskedWeightBackward) {
    alignas(64) float w[MMAX * W];
    load_run<V>(p.weight, g0 * m, cnt * m, p.wt, w);
    for (int i = 0; i < cnt * m; ++i) aos[i] = aos[i] * w[i];
  }
  if (cnt < W) std::memset(aos + cnt * m, 0, size_t(W - cnt) * m * 4);
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < m; ++j) soa[j * W + i] = aos[i * m + j];
  F gm[MMAX];
  for (int j = 0; j < m; ++j) gm[j] = V::load(soa + j * W);
  F dp[CMAX];
  if constexpr (CT == 6 && MT == 4) {
    dp[0] = V::add(gm[0], gm[1]);
    dp[1] = V::add(gm[0], gm[2]);
    dp[2] = V::add(gm[0], gm[3]);
    dp[3] = V::add(gm[1], gm[2]);
    dp[4] = V::add(gm[1], gm[3]);
    dp[5] = V::add(gm[2], gm[3]);
  } else {
    for (int c = 0; c < C; ++c) {
      F a = V::set1(0.f);
      for (unsigned bits = p.pattern[c]; bits; bits &= bits - 1) a = V::add(a, gm[__builtin_ctz(bits)]);
      dp[c] = a;
    }
  }
  F s = V::set1(0.f);
  for (int c = 0; c < C; ++c) s = V::add(s, V::mul(y[c], dp[c]));
  const F kdt = V::set1(k.kdt);
  for (int c = 0; c < C; ++c)
    V::store(soa + c * W, V::mul(V::mul(y[c], V::sub(dp[c], s)), kdt));
  for (int i = 0; i < cnt; ++i)
    for (int c = 0; c < C; ++c) aos[i * C + c] = soa[c * W + i];
  store_run<V>(p.out, g0 * C, cnt * C, p.ot, aos);
}

template <class V, int CT, int MT>
void run_tiles(const Problem& p, const Consts& k) {
  constexpr int W = V::W;
  const int64_t tiles = (p.G + W - 1) / W;
  const int64_t grain = W >= 8 ? 256 : 2048;
  parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g0 = t * W;
      if (p.G - g0 >= W)
        tile<V, CT, MT, true>(p, k, g0, W);
      else
        tile<V, CT, MT, false>(p, k, g0, int(p.G - g0));
    }
  });
}

template <class V>
void run_f32(const Problem& p) {
  if (p.G == 0) return;
  Consts k;
  uint32_t k0 = uint32_t(p.seed), k1 = uint32_t(p.seed >> 32);
  for (int r = 0; r < 10; ++r) {
    k.rk0[r] = k0;
    k.rk1[r] = k1;
    k0 += kW0;
    k1 += kW1;
  }
  k.off_lo = uint32_t(p.offset);
  k.off_hi = uint32_t(p.offset >> 32);
  k.kappa = float(p.kappa);
  k.tau = float(p.tau);
  k.kdt = float(p.kappa / p.tau);
  k.B = (p.C + 3) / 4;
  if (p.n == 2 && p.m == 4)
    run_tiles<V, 6, 4>(p, k);
  else
    run_tiles<V, 0, 0>(p, k);
}

}  // namespace GUMBEL_KERNEL_NS
}  // namespace semisparse::gumbel

#pragma GCC diagnostic pop
