// The block-sparse attention kernels (forward and backward), written once with GCC/Clang
// vector extensions and included by each ISA's translation unit (generic, AVX2+FMA,
// AVX-512), each compiled with its own flags. Not a public header.
//
// Forward (FlashAttention-2 style): one task per (batch, query head, query block) runs an
// online softmax over the active key blocks only; the scores of one block [bq, bk] are the
// only score storage. K is packed once per (batch, kv head) as fp32 K^T blocks [D][bkp]
// (bkp = bk rounded up to 16) and V as rows [Lk_pad][Dvp], zero padded.
// Backward: recomputes the probabilities of each active block from q, k and lse; dq in one
// pass over (batch, head, query block), dk/dv in a second pass over (batch, kv head, key
// block) that visits the query blocks of the transposed mask (all query heads of the GQA
// group): every output row is written by exactly one task, no races, no atomics.
// All products go through one register-tiled micro kernel C (+)= A B.
#pragma once
// 64-byte vector extension types in non-AVX-512 TUs: internal functions only, ABI note irrelevant
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <type_traits>

#include "blocksparse/block_attention_cpu.h"
#include "common/parallel.h"

namespace semisparse::blockattn {
namespace BA_KERNEL_NS {

constexpr int64_t kPad = 16;  // padding of the vectorised dims (elements)
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// A plain buffer (no std::vector / std::fill: their out-of-line instantiations could be
// shared with, and taken from, a TU compiled for another ISA).
template <class E>
struct Buf {
  std::unique_ptr<E[]> d;
  Buf() = default;
  explicit Buf(int64_t n) : d(new E[size_t(n)]) {}
  void assign(int64_t n, E v) {
    d.reset(new E[size_t(n)]);
    for (int64_t i = 0; i < n; ++i) d[i] = v;
  }
  E* data() { return d.get(); }
  const E* data() const { return d.get(); }
  E& operator[](int64_t i) { return d[i]; }
  const E& operator[](int64_t i) const { return d[i]; }
};
// Per-calling-thread, grow-only workspace for the packed operands: a fresh buffer of tens
// of MiB costs a page fault per 4 KiB on every call (as long as the kernel itself at
// L = 4096). Kept up to kKeepBytes (larger ones are freed after the call). Bump allocated;
// release() at the end of each op.
struct Arena {
  static constexpr size_t kKeepBytes = size_t(256) << 20;
  std::unique_ptr<char[]> mem;
  size_t cap = 0, used = 0;
  void reserve(size_t bytes) {  // starts a new op: all earlier takes are dropped
    used = 0;
    if (bytes <= cap) return;
    mem.reset();
    mem.reset(new char[bytes + 64]);
    cap = bytes;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(1) << 21;
    const uintptr_t a = reinterpret_cast<uintptr_t>(mem.get());
    const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advisory
#endif
  }
  template <class E>
  E* take(int64_t n) {
    char* base = mem.get();
    uintptr_t a = (reinterpret_cast<uintptr_t>(base) + used + 63) & ~uintptr_t(63);
    used = size_t(a - reinterpret_cast<uintptr_t>(base)) + size_t(n) * sizeof(E);
    return reinterpret_cast<E*>(a);
  }
  void release() {
    used = 0;
    if (cap > kKeepBytes) {
      mem.reset();
      cap = 0;
    }
  }
};
inline Arena& arena() {
  static thread_local Arena a;
  return a;
}

template <class E>
inline void fill_n(E* p, int64_t n, E v) {
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

template <class E>
struct VT {
  static constexpr int W = 64 / int(sizeof(E));  // 16 floats / 8 doubles (one zmm)
  typedef E V __attribute__((vector_size(64)));
};

template <class E>
inline typename VT<E>::V vload(const E* p) {
  typename VT<E>::V r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
template <class E>
inline void vstore(E* p, typename VT<E>::V a) {
  std::memcpy(p, &a, sizeof(a));
}

// C[RM x NV*W] (+)= A[RM x K] B[K x NV*W]; A(m, k) = A[m*sam + k*sak]
template <class E, int RM, int NV>
inline void tile(int64_t K, const E* __restrict A, int64_t sam, int64_t sak, const E* __restrict B, int64_t ldb,
                 E* __restrict C, int64_t ldc, bool acc) {
  using V = typename VT<E>::V;
  constexpr int W = VT<E>::W;
  V c[RM][NV];
  for (int r = 0; r < RM; ++r)
    for (int n = 0; n < NV; ++n) c[r][n] = acc ? vload<E>(C + r * ldc + n * W) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int n = 0; n < NV; ++n) b[n] = vload<E>(B + k * ldb + n * W);
    for (int r = 0; r < RM; ++r) {
      const E a = A[r * sam + k * sak];
      for (int n = 0; n < NV; ++n) c[r][n] += a * b[n];
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int n = 0; n < NV; ++n) vstore<E>(C + r * ldc + n * W, c[r][n]);
}

// C[M x N] (+)= A[M x K] B[K x N]; N a multiple of W, B and C rows contiguous.
template <class E>
void mm(int64_t M, int64_t N, int64_t K, const E* A, int64_t sam, int64_t sak, const E* B, int64_t ldb, E* C,
        int64_t ldc, bool acc) {
  constexpr int W = VT<E>::W;
  constexpr int RM = BA_RM;
  constexpr int NV = BA_NV;
  int64_t n = 0;
  for (; n + NV * W <= N; n += NV * W) {
    int64_t m = 0;
    for (; m + RM <= M; m += RM) tile<E, RM, NV>(K, A + m * sam, sam, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    for (; m < M; ++m) tile<E, 1, NV>(K, A + m * sam, sam, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
  }
  for (; n < N; n += W) {
    int64_t m = 0;
    for (; m + RM <= M; m += RM) tile<E, RM, 1>(K, A + m * sam, sam, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
    for (; m < M; ++m) tile<E, 1, 1>(K, A + m * sam, sam, sak, B + n, ldb, C + m * ldc + n, ldc, acc);
  }
}

// row[c] = exp(row[c] - sub) for c < n (n a multiple of W); -inf -> 0.
inline void exp_row(float* row, int64_t n, float sub) {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  for (int64_t c = 0; c < n; c += 16) {
    V x = vload<float>(row + c) - sub;
    const I dead = x < -87.3f;
    x = x < -87.3f ? V{} - 87.3f : x;
    x = x > 88.3f ? V{} + 88.3f : x;
    const V t = x * 1.44269504088896341f + 0.5f;
    I ni = __builtin_convertvector(t, I);
    ni = __builtin_convertvector(ni, V) > t ? ni - 1 : ni;  // floor
    const V fn = __builtin_convertvector(ni, V);
    V r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    V y = 1.9875691500E-4f + V{};
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * (r * r) + r + 1.0f;
    const I bits = (ni + 127) << 23;
    V res = y * (V)bits;
    res = (V)((I)res & ~dead);
    vstore<float>(row + c, res);
  }
}
inline void exp_row(double* row, int64_t n, double sub) {
  for (int64_t c = 0; c < n; ++c) row[c] = std::exp(row[c] - sub);
}

// Horizontal max / sum of one vector: tree of shuffles for fp32 (the serial lane loop is a
// dependency chain), plain loop for fp64.
inline float hmax(VT<float>::V a) {
  typedef int32_t I __attribute__((vector_size(64)));
  VT<float>::V b = __builtin_shuffle(a, I{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a = a > b ? a : b;
  b = __builtin_shuffle(a, I{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  a = a > b ? a : b;
  b = __builtin_shuffle(a, I{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  a = a > b ? a : b;
  return std::max(float(a[0]), float(a[1]));
}
inline float hsum(VT<float>::V a) {
  typedef int32_t I __attribute__((vector_size(64)));
  a += __builtin_shuffle(a, I{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  a += __builtin_shuffle(a, I{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  a += __builtin_shuffle(a, I{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return a[0] + a[1];
}
inline double hmax(VT<double>::V a) {
  double r = a[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, double(a[i]));
  return r;
}
inline double hsum(VT<double>::V a) {
  double r = 0;
  for (int i = 0; i < 8; ++i) r += a[i];
  return r;
}

// max / sum of row[0, n), n a multiple of W
template <class E>
inline E row_max(const E* row, int64_t n) {
  using V = typename VT<E>::V;
  constexpr int W = VT<E>::W;
  V m = vload<E>(row);
  for (int64_t c = W; c < n; c += W) {
    const V x = vload<E>(row + c);
    m = x > m ? x : m;
  }
  return hmax(m);
}
template <class E>
inline E row_sum(const E* row, int64_t n) {
  using V = typename VT<E>::V;
  constexpr int W = VT<E>::W;
  V a = V{};
  for (int64_t c = 0; c < n; c += W) a += vload<E>(row + c);
  return hsum(a);
}

// Conversions local to this namespace (no inline function shared across ISA TUs: the
// linker could otherwise pick another TU's copy compiled with wider instructions).
template <class E>
inline E ld(const void* p, int64_t i, DType t) {
  if constexpr (std::is_same_v<E, double>) {
    (void)t;
    return static_cast<const double*>(p)[i];
  } else {
    switch (t) {
      case DType::F32: return static_cast<const float*>(p)[i];
      case DType::BF16: {
        const uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
      }
      case DType::F64: return float(static_cast<const double*>(p)[i]);
      default: return sparse24::f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    }
  }
}
template <class E>
inline void st(void* p, int64_t i, DType t, E v) {
  if constexpr (std::is_same_v<E, double>) {
    (void)t;
    static_cast<double*>(p)[i] = v;
  } else {
    switch (t) {
      case DType::F32: static_cast<float*>(p)[i] = v; break;
      case DType::BF16: {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
          u = (u >> 16) | 0x40;
        } else {
          u += 0x7fffu + ((u >> 16) & 1u);
          u >>= 16;
        }
        static_cast<uint16_t*>(p)[i] = uint16_t(u);
        break;
      }
      case DType::F64: static_cast<double*>(p)[i] = v; break;
      default: static_cast<uint16_t*>(p)[i] = sparse24::f32_to_f16(v); break;
    }
  }
}

// dst[0, n) = src[off, off + n) * mul, converted (the dtype switch outside the loop)
template <class E>
inline void load_row(const void* src, int64_t off, int64_t n, DType t, E* __restrict dst, E mul = E(1)) {
  if (t == DType::F32) {
    const float* s = static_cast<const float*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = E(s[i]) * mul;
  } else if (t == DType::F64) {
    const double* s = static_cast<const double*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = E(s[i]) * mul;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = ld<E>(src, off + i, t) * mul;
  }
}
template <class E>
inline void store_row(void* dst, int64_t off, int64_t n, DType t, const E* __restrict src, E mul = E(1)) {
  if (t == DType::F32) {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = float(src[i] * mul);
  } else if (t == DType::F64) {
    double* d = static_cast<double*>(dst) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = double(src[i] * mul);
  } else {
    for (int64_t i = 0; i < n; ++i) st<E>(dst, off + i, t, src[i] * mul);
  }
}

template <class E>
struct Ctx {
  const Problem& p;
  int64_t bkp, Dp, Dvp, Lkp, Lqp, group;
  E *KT = nullptr, *Vr = nullptr, *Kr = nullptr, *VTb = nullptr;  // packed per (b, hkv): K^T blocks, V rows,
                                                                  // K rows, V^T blocks (in arena())
  explicit Ctx(const Problem& pp) : p(pp) {
    bkp = round_up(p.bk, kPad);
    Dp = round_up(p.D, kPad);
    Dvp = round_up(p.Dv, kPad);
    Lkp = p.nkb * p.bk;
    Lqp = p.nqb * p.bq;
    group = p.Hq / p.Hkv;
  }
  const E* kt(int64_t bh, int64_t kb) const { return KT + (bh * p.nkb + kb) * p.D * bkp; }
  const E* vt(int64_t bh, int64_t kb) const { return VTb + (bh * p.nkb + kb) * p.Dv * bkp; }
  const E* vr(int64_t bh, int64_t j) const { return vrow_base + (bh * ldv + j) * Dvp; }
  const E* kr(int64_t bh, int64_t j) const { return krow_base + (bh * ldk + j) * Dp; }

  // V (and K) rows are read in place when they are fp32 with a padded-free row length.
  const E* vrow_base = nullptr;
  const E* krow_base = nullptr;
  int64_t ldv = 0, ldk = 0;

  void pack(bool backward) {
    const int64_t BH = p.B * p.Hkv;
    const bool direct_v = std::is_same_v<E, float> && p.dt == DType::F32 && p.Dv == Dvp;
    const bool direct_k = std::is_same_v<E, float> && p.dt == DType::F32 && p.D == Dp;
    const bool pad_k = bkp != p.bk || Lkp != p.Lk;
    Arena& ar = arena();
    ar.reserve(sizeof(E) * size_t(BH * (p.nkb * p.D * bkp + Lkp * Dvp + (backward ? Lkp * Dp + p.nkb * p.Dv * bkp : 0)) +
                                   (backward ? p.B * p.Hq * (Lqp * (Dp + Dvp) + 2 * p.Lq) : 0)) +
               64 * 8);
    KT = ar.take<E>(BH * p.nkb * p.D * bkp);
    if (pad_k) fill_n(KT, BH * p.nkb * p.D * bkp, E(0));
    if (direct_v) {
      vrow_base = static_cast<const E*>(p.v);
      ldv = p.Lk;
    } else {
      Vr = ar.take<E>(BH * Lkp * Dvp);
      if (Dvp != p.Dv || Lkp != p.Lk) fill_n(Vr, BH * Lkp * Dvp, E(0));
      vrow_base = Vr;
      ldv = Lkp;
    }
    if (backward) {
      if (direct_k) {
        krow_base = static_cast<const E*>(p.k);
        ldk = p.Lk;
      } else {
        Kr = ar.take<E>(BH * Lkp * Dp);
        if (Dp != p.D || Lkp != p.Lk) fill_n(Kr, BH * Lkp * Dp, E(0));
        krow_base = Kr;
        ldk = Lkp;
      }
      VTb = ar.take<E>(BH * p.nkb * p.Dv * bkp);
      if (pad_k) fill_n(VTb, BH * p.nkb * p.Dv * bkp, E(0));
    }
    parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
      Buf<E> kt(p.D), vt(p.Dv);
      for (int64_t bh = b0; bh < b1; ++bh)
        for (int64_t j = 0; j < p.Lk; ++j) {
          const int64_t kb = j / p.bk, c = j % p.bk;
          const int64_t ko = (bh * p.Lk + j) * p.D, vo = (bh * p.Lk + j) * p.Dv;
          load_row<E>(p.k, ko, p.D, p.dt, kt.data());
          E* ktb = KT + (bh * p.nkb + kb) * p.D * bkp;
          for (int64_t d = 0; d < p.D; ++d) ktb[d * bkp + c] = kt[d];
          if (backward && !direct_k) std::memcpy(Kr + (bh * Lkp + j) * Dp, kt.data(), sizeof(E) * p.D);
          if (!direct_v || backward) load_row<E>(p.v, vo, p.Dv, p.dt, vt.data());
          if (!direct_v) std::memcpy(Vr + (bh * Lkp + j) * Dvp, vt.data(), sizeof(E) * p.Dv);
          if (backward) {
            E* vtb = VTb + (bh * p.nkb + kb) * p.Dv * bkp;
            for (int64_t d = 0; d < p.Dv; ++d) vtb[d * bkp + c] = vt[d];
          }
        }
    });
  }

  bool active(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    const int64_t mb = p.mB == 1 ? 0 : b, mh = p.mH == 1 ? 0 : h;
    if (!p.mask[((mb * p.mH + mh) * p.nqb + qb) * p.nkb + kb]) return false;
    // causal: skip blocks whose first key is after the block's last query
    if (p.causal && kb * p.bk > std::min(qb * p.bq + p.bq, p.Lq) - 1) return false;
    return true;
  }
  // number of allowed keys (prefix) of query i in key block kb
  int64_t allowed(int64_t i, int64_t kb) const {
    const int64_t j0 = kb * p.bk;
    int64_t n = std::min(p.bk, p.Lk - j0);
    if (p.causal) n = std::min(n, i - j0 + 1);
    return std::max<int64_t>(n, 0);
  }
};

template <class E>
void forward_impl(const Problem& p) {
  Ctx<E> cx(p);
  cx.pack(false);
  const int64_t ntask = p.B * p.Hq * p.nqb;
  const E ninf = -std::numeric_limits<E>::infinity();
  parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    Buf<E> qbuf(p.bq * p.D), S(p.bq * cx.bkp), acc(p.bq * cx.Dvp),
        mrow(p.bq), lrow(p.bq);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % p.nqb, bh = t / p.nqb, h = bh % p.Hq, b = bh / p.Hq;
      const int64_t bkv = b * p.Hkv + h / cx.group;
      const int64_t i0 = qb * p.bq, M = std::min(p.bq, p.Lq - i0);
      const E sc = E(p.scale);
      load_row<E>(p.q, (bh * p.Lq + i0) * p.D, M * p.D, p.dt, qbuf.data(), sc);
      fill_n(acc.data(), p.bq * cx.Dvp, E(0));
      fill_n(mrow.data(), p.bq, ninf);
      fill_n(lrow.data(), p.bq, E(0));
      for (int64_t kb = 0; kb < p.nkb; ++kb) {
        if (!cx.active(b, h, qb, kb)) continue;
        mm<E>(M, cx.bkp, p.D, qbuf.data(), p.D, 1, cx.kt(bkv, kb), cx.bkp, S.data(), cx.bkp, false);
        for (int64_t r = 0; r < M; ++r) {
          E* row = S.data() + r * cx.bkp;
          const int64_t n = cx.allowed(i0 + r, kb);
          if (n == 0) {
            fill_n(row, cx.bkp, E(0));
            continue;
          }
          for (int64_t c = n; c < cx.bkp; ++c) row[c] = ninf;
          const E mnew = std::max(mrow[r], row_max(row, cx.bkp));
          exp_row(row, cx.bkp, mnew);
          const E s = row_sum(row, cx.bkp);
          const E alpha = mnew == mrow[r] ? E(1) : std::exp(mrow[r] - mnew);
          if (alpha != E(1)) {
            E* a = acc.data() + r * cx.Dvp;
            for (int64_t d = 0; d < cx.Dvp; ++d) a[d] *= alpha;
          }
          lrow[r] = lrow[r] * alpha + s;
          mrow[r] = mnew;
        }
        const int64_t nk = std::min(p.bk, p.Lk - kb * p.bk);
        mm<E>(M, cx.Dvp, nk, S.data(), cx.bkp, 1, cx.vr(bkv, kb * p.bk), cx.Dvp, acc.data(), cx.Dvp, true);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t row = bh * p.Lq + i0 + r;
        const bool live = lrow[r] > E(0);
        const E inv = live ? E(1) / lrow[r] : E(0);
        store_row<E>(p.out, row * p.Dv, p.Dv, p.dt, acc.data() + r * cx.Dvp, inv);
        static_cast<E*>(p.lse)[row] = live ? mrow[r] + std::log(lrow[r]) : ninf;
      }
    }
  });
  arena().release();
}

// Backward helpers: per (b, h) packed scaled q rows [Lqp][Dp], dO rows [Lqp][Dvp], delta, lse.
template <class E>
struct Bwd {
  Ctx<E>& cx;
  const Problem& p;
  E *Qs, *dO, *delta, *lse;  // in arena(), after the Ctx's buffers
  Bwd(Ctx<E>& c) : cx(c), p(c.p) {
    const int64_t BH = p.B * p.Hq;
    Arena& ar = arena();
    Qs = ar.take<E>(BH * cx.Lqp * cx.Dp);
    if (cx.Dp != p.D) fill_n(Qs, BH * cx.Lqp * cx.Dp, E(0));
    dO = ar.take<E>(BH * cx.Lqp * cx.Dvp);
    if (cx.Dvp != p.Dv) fill_n(dO, BH * cx.Lqp * cx.Dvp, E(0));
    delta = ar.take<E>(BH * p.Lq);
    lse = ar.take<E>(BH * p.Lq);
    const E sc = E(p.scale);
    parallel_for(0, BH, 1, [&](int64_t b0, int64_t b1) {
      Buf<E> orow(p.Dv);
      for (int64_t bh = b0; bh < b1; ++bh)
        for (int64_t i = 0; i < p.Lq; ++i) {
          const int64_t row = bh * p.Lq + i;
          load_row<E>(p.q, row * p.D, p.D, p.dt, Qs + (bh * cx.Lqp + i) * cx.Dp, sc);
          E* g = dO + (bh * cx.Lqp + i) * cx.Dvp;
          load_row<E>(p.go, row * p.Dv, p.Dv, p.dt, g);
          load_row<E>(p.o, row * p.Dv, p.Dv, p.dt, orow.data());
          E s = 0;
          for (int64_t d = 0; d < p.Dv; ++d) s += g[d] * orow[d];
          delta[row] = s;
          lse[row] = static_cast<const E*>(p.lse_in)[row];
        }
    });
  }
  const E* qs(int64_t bh, int64_t i) const { return Qs + (bh * cx.Lqp + i) * cx.Dp; }
  const E* dob(int64_t bh, int64_t i) const { return dO + (bh * cx.Lqp + i) * cx.Dvp; }

  // P (into S) and dS (into dP) of block (bh, qb) x kb; M query rows.
  void block(int64_t bh, int64_t bkv, int64_t qb, int64_t kb, int64_t M, E* S, E* dP) const {
    const int64_t i0 = qb * p.bq;
    mm<E>(M, cx.bkp, p.D, qs(bh, i0), cx.Dp, 1, cx.kt(bkv, kb), cx.bkp, S, cx.bkp, false);
    mm<E>(M, cx.bkp, p.Dv, dob(bh, i0), cx.Dvp, 1, cx.vt(bkv, kb), cx.bkp, dP, cx.bkp, false);
    for (int64_t r = 0; r < M; ++r) {
      E* row = S + r * cx.bkp;
      E* drow = dP + r * cx.bkp;
      const int64_t n = cx.allowed(i0 + r, kb);
      const E l = lse[bh * p.Lq + i0 + r];
      if (n == 0 || std::isinf(l)) {
        fill_n(row, cx.bkp, E(0));
        fill_n(drow, cx.bkp, E(0));
        continue;
      }
      for (int64_t c = n; c < cx.bkp; ++c) row[c] = -std::numeric_limits<E>::infinity();
      exp_row(row, cx.bkp, l);
      const E dl = delta[bh * p.Lq + i0 + r];
      for (int64_t c = 0; c < cx.bkp; ++c) drow[c] = row[c] * (drow[c] - dl);
    }
  }
};

template <class E>
void backward_impl(const Problem& p) {
  Ctx<E> cx(p);
  cx.pack(true);
  Bwd<E> bw(cx);
  const E sc = E(p.scale);
  // pass 1: dq per (b, h, query block)
  parallel_for(0, p.B * p.Hq * p.nqb, 1, [&](int64_t t0, int64_t t1) {
    Buf<E> S(p.bq * cx.bkp), dP(p.bq * cx.bkp), dq(p.bq * cx.Dp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % p.nqb, bh = t / p.nqb, h = bh % p.Hq, b = bh / p.Hq;
      const int64_t bkv = b * p.Hkv + h / cx.group;
      const int64_t i0 = qb * p.bq, M = std::min(p.bq, p.Lq - i0);
      fill_n(dq.data(), p.bq * cx.Dp, E(0));
      for (int64_t kb = 0; kb < p.nkb; ++kb) {
        if (!cx.active(b, h, qb, kb)) continue;
        bw.block(bh, bkv, qb, kb, M, S.data(), dP.data());
        const int64_t nk = std::min(p.bk, p.Lk - kb * p.bk);
        mm<E>(M, cx.Dp, nk, dP.data(), cx.bkp, 1, cx.kr(bkv, kb * p.bk), cx.Dp, dq.data(), cx.Dp, true);
      }
      for (int64_t r = 0; r < M; ++r) store_row<E>(p.dq, (bh * p.Lq + i0 + r) * p.D, p.D, p.dt, dq.data() + r * cx.Dp, sc);
    }
  });
  // pass 2: dk, dv per (b, kv head, key block) over the query blocks of the transposed mask
  parallel_for(0, p.B * p.Hkv * p.nkb, 1, [&](int64_t t0, int64_t t1) {
    Buf<E> S(p.bq * cx.bkp), dP(p.bq * cx.bkp), dk(p.bk * cx.Dp),
        dv(p.bk * cx.Dvp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t kb = t % p.nkb, bkv = t / p.nkb, hk = bkv % p.Hkv, b = bkv / p.Hkv;
      const int64_t j0 = kb * p.bk, nk = std::min(p.bk, p.Lk - j0);
      fill_n(dk.data(), p.bk * cx.Dp, E(0));
      fill_n(dv.data(), p.bk * cx.Dvp, E(0));
      for (int64_t h = hk * cx.group; h < (hk + 1) * cx.group; ++h) {
        const int64_t bh = b * p.Hq + h;
        for (int64_t qb = 0; qb < p.nqb; ++qb) {
          if (!cx.active(b, h, qb, kb)) continue;
          const int64_t i0 = qb * p.bq, M = std::min(p.bq, p.Lq - i0);
          bw.block(bh, bkv, qb, kb, M, S.data(), dP.data());
          mm<E>(nk, cx.Dvp, M, S.data(), 1, cx.bkp, bw.dob(bh, i0), cx.Dvp, dv.data(), cx.Dvp, true);
          mm<E>(nk, cx.Dp, M, dP.data(), 1, cx.bkp, bw.qs(bh, i0), cx.Dp, dk.data(), cx.Dp, true);
        }
      }
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t row = bkv * p.Lk + j0 + c;
        store_row<E>(p.dk, row * p.D, p.D, p.dt, dk.data() + c * cx.Dp);
        store_row<E>(p.dv, row * p.Dv, p.Dv, p.dt, dv.data() + c * cx.Dvp);
      }
    }
  });
  arena().release();
}

}  // namespace BA_KERNEL_NS
}  // namespace semisparse::blockattn
