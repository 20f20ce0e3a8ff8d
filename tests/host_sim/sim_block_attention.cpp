// Host simulation of the tensor-core block-sparse attention kernels
// (csrc/blocksparse/block_attention_flash.cuh, included with SEMISPARSE_BLOCK_ATTN_HOST_SIM:
// only its host + device index math is compiled here). Replays, for every CTA / warp /
// lane, what the kernels do:
//  * the work-list builder (pair_info + ballot compaction) against a brute-force
//    enumeration of every element of every tile (active / partial flags exact);
//  * cp.async tile loads into an emulated shared memory (every element written once per
//    load, 16-byte aligned, conflict-free phases, zero fill past the lengths; each cell
//    tagged with the tile it holds, so a read of a stale or wrong stage is caught);
//  * ldmatrix (plain and .trans) emulated from the PTX definition, from the lane addresses
//    the kernels compute (also checked equal to the swizzle formula, conflict-free);
//  * mma.m16n8k16 emulated from the PTX fragment layouts; the score tiles S = Q K^T and
//    dP = dO V^T checked exactly against integer-valued references (inputs are multiples of
//    1/2 in [-1, 1]: every sum is exact in fp32);
//  * the element masks (relative 32-bit form == absolute form == block_mask semantics; a
//    tile without the partial flag holds only allowed elements), the online softmax, the
//    re-packing of P / dS into A fragments (rounded like the device), the epilogues (every
//    output element written exactly once);
//  * forward out / lse and backward dq / dk / dv compared with a float64 reference of
//    python/semisparse/ops/block_attention.py's formulas (rows without allowed keys:
//    out == 0, lse == -inf, zero gradients).
// Shapes cover D 64 / 128, fp16 / bf16, GQA, mask broadcast, causal, lengths that are not
// multiples of the tiles, block sizes 16 .. 128 (smaller and larger than the tiles, not
// aligned to them), empty masks and rows without any active block.
#define SEMISPARSE_BLOCK_ATTN_HOST_SIM 1
#include "blocksparse/block_attention_flash.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace semisparse::blockattn::flash;

#include "sim_check.h"

// ------------------------------------------------------------ 16-bit float formats
enum class Fmt { F16, BF16 };
static float bits_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static uint32_t f_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float h2f(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const int e = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ffu;
  if (e == 0) return (sign ? -1.f : 1.f) * std::ldexp(float(man), -24);
  if (e == 31) return bits_f(sign | 0x7f800000u | (man << 13));
  return bits_f(sign | uint32_t(e - 15 + 127) << 23 | man << 13);
}
static uint16_t f2h(float f) {  // round to nearest even, subnormals, overflow to inf
  const uint32_t u = f_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return 0x7e00;
  if (a >= 65520.f) return uint16_t(sign | 0x7c00u);
  if (a < std::ldexp(1.f, -14)) {  // subnormal: multiples of 2^-24
    const float m = std::nearbyint(a * std::ldexp(1.f, 24));  // FE_TONEAREST: ties to even
    return uint16_t(sign | uint16_t(m));
  }
  int e;
  const float fr = std::frexp(a, &e);  // a = fr * 2^e, fr in [0.5, 1)
  float m = std::nearbyint(fr * 2048.f);  // 11 significant bits
  if (m == 2048.f) {
    m = 1024.f;
    ++e;
  }
  const int he = e - 1 + 15;
  if (he >= 31) return uint16_t(sign | 0x7c00u);
  return uint16_t(sign | uint16_t(he << 10) | uint16_t(uint32_t(m) - 1024u));
}
static float b2f(uint16_t b) { return bits_f(uint32_t(b) << 16); }
static uint16_t f2b(float f) {
  uint32_t u = f_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
struct Codec {
  Fmt fmt;
  float dec(uint16_t x) const { return fmt == Fmt::F16 ? h2f(x) : b2f(x); }
  uint16_t enc(float x) const { return fmt == Fmt::F16 ? f2h(x) : f2b(x); }
  uint32_t pack2(float lo, float hi) const { return uint32_t(enc(lo)) | uint32_t(enc(hi)) << 16; }
};
static float ex2(float x) { return std::exp2(x); }

// ------------------------------------------------------------ emulated shared memory
struct Smem {
  std::vector<uint16_t> cell;
  std::vector<int64_t> tag;  // which tile a cell holds (-1: never written)
  explicit Smem(size_t elems) : cell(elems, 0xdead), tag(elems, -1) {}
};

// load_tile: rows [r0, r0 + R) of a [L][D] matrix (src + off) into the tile at byte base.
static void sim_load_tile(Smem& sm, uint32_t base, const std::vector<uint16_t>& src, int64_t off, int64_t r0,
                          int64_t L, int R, int D, int nthreads, int64_t tag) {
  const int chunks = R * (D / 8);
  CHECK(chunks % nthreads == 0, "tile chunks %d not divisible by %d threads", chunks, nthreads);
  std::vector<int> seen(size_t(R) * D, 0);
  for (int warp = 0; warp < nthreads / 32; ++warp)
    for (int it = 0; it < chunks / nthreads; ++it) {
      std::set<int> banks[4];
      for (int lane = 0; lane < 32; ++lane) {
        const int tid = warp * 32 + lane;
        const RC rc = load_rc(tid + it * nthreads, D);
        CHECK(rc.row >= 0 && rc.row < R && rc.chunk >= 0 && rc.chunk < D / 8, "load_rc out of tile");
        const int64_t r = r0 + rc.row;
        const bool ok = r < L;
        const int e0 = swz(rc.row, rc.chunk, D);
        CHECK(e0 % 8 == 0 && e0 >= 0 && e0 + 8 <= R * D, "smem chunk offset %d", e0);
        banks[lane / 8].insert((int(base) / 2 + e0) / 8 % 8);
        for (int e = 0; e < 8; ++e) {
          seen[size_t(e0 + e)]++;
          sm.cell[base / 2 + e0 + e] = ok ? src[size_t(off + r * D + rc.chunk * 8 + e)] : 0;
          sm.tag[base / 2 + e0 + e] = tag;
        }
      }
      for (auto& b : banks) CHECK(b.size() == 8, "cp.async store phase with a bank conflict");
    }
  for (int i = 0; i < R * D; ++i) CHECK(seen[size_t(i)] == 1, "tile element %d written %d times", i, seen[size_t(i)]);
}

// ldmatrix .x4 (trans or not): lanes 8m..8m+7 give the rows of matrix m.
static void sim_ldsm(const Smem& sm, const uint32_t (&addr)[32], bool trans, int64_t want_tag, uint32_t (&out)[32][4]) {
  uint16_t e[4][8][8];
  for (int m = 0; m < 4; ++m) {
    std::set<int> banks;
    for (int r = 0; r < 8; ++r) {
      const uint32_t a = addr[8 * m + r];
      CHECK(a % 16 == 0, "ldmatrix row address %u not 16-byte aligned", a);
      banks.insert(int(a / 16) % 8);
      for (int c = 0; c < 8; ++c) {
        const size_t i = a / 2 + c;
        CHECK(i < sm.cell.size(), "ldmatrix out of shared memory");
        CHECK(sm.tag[i] == want_tag, "ldmatrix reads a cell of tile %lld, wants %lld", (long long)sm.tag[i],
              (long long)want_tag);
        e[m][r][c] = sm.cell[i];
      }
    }
    CHECK(banks.size() == 8, "ldmatrix matrix %d has a bank conflict", m);
  }
  for (int l = 0; l < 32; ++l)
    for (int m = 0; m < 4; ++m) {
      const int g = l / 4, t = l % 4;
      out[l][m] = trans ? uint32_t(e[m][2 * t][g]) | uint32_t(e[m][2 * t + 1][g]) << 16
                        : uint32_t(e[m][g][2 * t]) | uint32_t(e[m][g][2 * t + 1]) << 16;
    }
}

// per-lane accumulators of NT n-tiles
struct Frag {
  int nt;
  std::vector<float> v;
  explicit Frag(int n) : nt(n), v(size_t(32) * n * 4, 0.f) {}
  float& at(int lane, int n, int i) { return v[(size_t(lane) * nt + n) * 4 + i]; }
};

// mma.m16n8k16 (PTX fragment layouts) on n-tile n of acc
static void sim_mma(const Codec& cd, Frag& acc, int n, const uint32_t (&a)[32][4], const uint32_t (&b)[32][4], int b0,
                    int b1) {
  auto half = [&](uint32_t reg, int hi) { return cd.dec(uint16_t(hi ? reg >> 16 : reg & 0xffffu)); };
  float A[16][16], Bm[16][8];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) A[i][k] = half(a[4 * (i % 8) + (k % 8) / 2][(i / 8) + 2 * (k / 8)], k % 2);
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < 8; ++c) {
      const int lane = 4 * c + (k % 8) / 2;
      Bm[k][c] = half(b[lane][k / 8 ? b1 : b0], k % 2);
    }
  for (int i = 0; i < 16; ++i)
    for (int c = 0; c < 8; ++c) {
      double s = 0;
      for (int k = 0; k < 16; ++k) s += double(A[i][k]) * double(Bm[k][c]);
      acc.at(4 * (i % 8) + c / 2, n, 2 * (i / 8) + c % 2) += float(s);
    }
}

// gemm_ss: acc[NT] += A (16 x D from tile sA rows arow0..) * B^T (NT*8 rows of tile sB)
static void sim_gemm_ss(const Codec& cd, const Smem& sm, int D, Frag& acc, uint32_t sA, int arow0, int64_t tagA,
                        uint32_t sB, int brow0, int64_t tagB) {
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t addr[32], a[32][4];
    for (int lane = 0; lane < 32; ++lane) {
      addr[lane] = sA + at(lane_off_a(lane, D), arow0, 2 * ks, D);
      const RC rc = ldsm_rc_a(lane, arow0, 2 * ks);
      CHECK(addr[lane] == sA + 2u * uint32_t(swz(rc.row, rc.chunk, D)), "lane_off_a/at != swz");
    }
    sim_ldsm(sm, addr, false, tagA, a);
    for (int p = 0; p < acc.nt / 2; ++p) {
      uint32_t b[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        addr[lane] = sB + at(lane_off_bn(lane, D), brow0 + 16 * p, 2 * ks, D);
        const RC rc = ldsm_rc_bn(lane, brow0 + 16 * p, 2 * ks);
        CHECK(addr[lane] == sB + 2u * uint32_t(swz(rc.row, rc.chunk, D)), "lane_off_bn/at != swz");
      }
      sim_ldsm(sm, addr, false, tagB, b);
      sim_mma(cd, acc, 2 * p, a, b, 0, 1);
      sim_mma(cd, acc, 2 * p + 1, a, b, 2, 3);
    }
  }
}

// gemm_rs: acc[D/8] += P (16 x 16 KS from accumulator fragments p) * B (rows brow0.. of sB)
static void sim_gemm_rs(const Codec& cd, const Smem& sm, int D, Frag& acc, Frag& p, int KS, uint32_t sB, int brow0,
                        int64_t tagB) {
  CHECK(p.nt == 2 * KS && acc.nt == D / 8, "gemm_rs shapes");
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[32][4];
    for (int lane = 0; lane < 32; ++lane)
      for (int r = 0; r < 4; ++r)
        a[lane][r] = cd.pack2(p.at(lane, a_src_nt(ks, r), a_src_i(r)), p.at(lane, a_src_nt(ks, r), a_src_i(r) + 1));
    for (int np = 0; np < D / 16; ++np) {
      uint32_t addr[32], b[32][4];
      for (int lane = 0; lane < 32; ++lane) {
        addr[lane] = sB + at(lane_off_a(lane, D), brow0 + 16 * ks, 2 * np, D);
        const RC rc = ldsm_rc_a(lane, brow0 + 16 * ks, 2 * np);
        CHECK(addr[lane] == sB + 2u * uint32_t(swz(rc.row, rc.chunk, D)), "lane_off_a/at != swz (trans)");
      }
      sim_ldsm(sm, addr, true, tagB, b);
      sim_mma(cd, acc, 2 * np, a, b, 0, 1);
      sim_mma(cd, acc, 2 * np + 1, a, b, 2, 3);
    }
  }
}

// ------------------------------------------------------------ the problem
struct Prob {
  int64_t B, Hq, Hkv, Lq, Lk, D, bq, bk, mB, mH, nqb, nkb;
  bool causal;
  float scale;
  Codec cd;
  std::vector<uint16_t> q, k, v, go;  // 16-bit values
  std::vector<bool> mask_v;
  std::vector<uint8_t> mask;  // bool bytes [mB][mH][nqb][nkb]
  Geometry geo() const { return Geometry{Lq, Lk, bq, bk, nqb, nkb, causal}; }
  const bool* mask_of(int64_t b, int64_t h) const {
    return reinterpret_cast<const bool*>(mask.data()) + ((mB == 1 ? 0 : b) * mH + (mH == 1 ? 0 : h)) * nqb * nkb;
  }
  bool allowed(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return i < Lq && j < Lk && mask_of(b, h)[(i / bq) * nkb + j / bk] && !(causal && j > i);
  }
  float qf(int64_t bh, int64_t i, int64_t d) const { return cd.dec(q[size_t((bh * Lq + i) * D + d)]); }
  float gof(int64_t bh, int64_t i, int64_t d) const { return cd.dec(go[size_t((bh * Lq + i) * D + d)]); }
  float kf(int64_t bkv, int64_t j, int64_t d) const { return cd.dec(k[size_t((bkv * Lk + j) * D + d)]); }
  float vf(int64_t bkv, int64_t j, int64_t d) const { return cd.dec(v[size_t((bkv * Lk + j) * D + d)]); }
};

struct List {
  std::vector<int32_t> cnt;
  std::vector<uint32_t> idx;
  int64_t n_outer, n_inner;
};

// build_list_kernel's warp loop (ballot + popc) over every list row; checked by brute force
static List sim_build_list(const Prob& pr, int64_t TM, int64_t TN, bool transposed) {
  const int64_t nq = cdiv(pr.Lq, TM), nk = cdiv(pr.Lk, TN);
  List L;
  L.n_outer = transposed ? nk : nq;
  L.n_inner = transposed ? nq : nk;
  const int64_t rows = pr.mB * pr.mH * L.n_outer;
  L.cnt.assign(size_t(rows), -1);
  L.idx.assign(size_t(std::max<int64_t>(rows * L.n_inner, 1)), 0xffffffffu);
  const Geometry g = pr.geo();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t mbh = row / L.n_outer, outer = row % L.n_outer;
    const bool* m = reinterpret_cast<const bool*>(pr.mask.data()) + mbh * pr.nqb * pr.nkb;
    int64_t count = 0;
    for (int64_t base = 0; base < L.n_inner; base += 32) {
      uint32_t info[32];
      unsigned bal = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t inner = base + lane;
        info[lane] = 0;
        if (inner < L.n_inner)
          info[lane] = transposed ? pair_info(m, g, TM, TN, inner, outer) : pair_info(m, g, TM, TN, outer, inner);
        if (info[lane] & 1u) bal |= 1u << lane;
      }
      for (int lane = 0; lane < 32; ++lane)
        if (info[lane] & 1u)
          L.idx[size_t(row * L.n_inner + count + __builtin_popcount(bal & ((1u << lane) - 1u)))] =
              list_entry(base + lane, info[lane]);
      count += __builtin_popcount(bal);
    }
    L.cnt[size_t(row)] = int32_t(count);
    // brute force: every element of every tile of this row
    std::vector<uint32_t> want;
    for (int64_t inner = 0; inner < L.n_inner; ++inner) {
      const int64_t qt = transposed ? inner : outer, kt = transposed ? outer : inner;
      bool any = false, part = false;
      for (int64_t i = qt * TM; i < std::min(qt * TM + TM, pr.Lq); ++i)
        for (int64_t j = kt * TN; j < kt * TN + TN; ++j) {
          const bool ok = j < pr.Lk && m[(i / pr.bq) * pr.nkb + j / pr.bk] && !(pr.causal && j > i);
          any = any || ok;
          part = part || !ok;
        }
      const uint32_t info = transposed ? pair_info(m, g, TM, TN, inner, outer) : pair_info(m, g, TM, TN, outer, inner);
      CHECK(info == (any ? 1u | (part ? 2u : 0u) : 0u), "pair_info(qt=%lld, kt=%lld) = %u, brute force any=%d part=%d",
            (long long)qt, (long long)kt, info, any, part);
      if (any) want.push_back(uint32_t(inner) | (part ? kPartial : 0u));
    }
    CHECK(int64_t(want.size()) == count, "list row %lld: %lld entries, want %zu", (long long)row, (long long)count,
          want.size());
    for (size_t n = 0; n < want.size() && int64_t(n) < count; ++n)
      CHECK(L.idx[size_t(row * L.n_inner) + n] == want[n], "list row %lld entry %zu", (long long)row, n);
  }
  return L;
}

// float64 reference: out, lse (forward); dq, dk, dv from the given out / lse (backward)
struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
};
static Ref reference(const Prob& pr, const std::vector<uint16_t>* out_k, const std::vector<float>* lse_k) {
  Ref r;
  const int64_t D = pr.D, G = pr.Hq / pr.Hkv;
  r.out.assign(size_t(pr.B * pr.Hq * pr.Lq * D), 0);
  r.lse.assign(size_t(pr.B * pr.Hq * pr.Lq), -INFINITY);
  r.dq.assign(size_t(pr.B * pr.Hq * pr.Lq * D), 0);
  r.dk.assign(size_t(pr.B * pr.Hkv * pr.Lk * D), 0);
  r.dv.assign(size_t(pr.B * pr.Hkv * pr.Lk * D), 0);
  std::vector<double> s(size_t(pr.Lk));
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t h = 0; h < pr.Hq; ++h) {
      const int64_t bh = b * pr.Hq + h, bkv = b * pr.Hkv + h / G;
      for (int64_t i = 0; i < pr.Lq; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < pr.Lk; ++j) {
          double d = 0;
          for (int64_t c = 0; c < D; ++c) d += double(pr.qf(bh, i, c)) * pr.kf(bkv, j, c);
          s[size_t(j)] = pr.allowed(b, h, i, j) ? d * pr.scale : -INFINITY;
          mx = std::max(mx, s[size_t(j)]);
        }
        if (mx == -INFINITY) continue;
        double l = 0;
        for (int64_t j = 0; j < pr.Lk; ++j) l += std::exp(s[size_t(j)] - mx);
        const double lse = mx + std::log(l);
        r.lse[size_t(bh * pr.Lq + i)] = lse;
        for (int64_t j = 0; j < pr.Lk; ++j) {
          const double p = std::exp(s[size_t(j)] - lse);
          for (int64_t c = 0; c < D; ++c) r.out[size_t((bh * pr.Lq + i) * D + c)] += p * pr.vf(bkv, j, c);
        }
        if (!out_k) continue;
        // backward with the kernel's out and lse
        const double lk = (*lse_k)[size_t(bh * pr.Lq + i)];
        if (std::isinf(lk)) continue;
        double dsum = 0;
        for (int64_t c = 0; c < D; ++c) dsum += double(pr.gof(bh, i, c)) * pr.cd.dec((*out_k)[size_t((bh * pr.Lq + i) * D + c)]);
        for (int64_t j = 0; j < pr.Lk; ++j) {
          if (s[size_t(j)] == -INFINITY) continue;
          const double p = std::exp(s[size_t(j)] - lk);
          double dp = 0;
          for (int64_t c = 0; c < D; ++c) dp += double(pr.gof(bh, i, c)) * pr.vf(bkv, j, c);
          const double ds = p * (dp - dsum);
          for (int64_t c = 0; c < D; ++c) {
            r.dq[size_t((bh * pr.Lq + i) * D + c)] += ds * pr.kf(bkv, j, c) * pr.scale;
            r.dk[size_t((bkv * pr.Lk + j) * D + c)] += ds * pr.qf(bh, i, c) * pr.scale;
            r.dv[size_t((bkv * pr.Lk + j) * D + c)] += p * pr.gof(bh, i, c);
          }
        }
      }
    }
  return r;
}

static Params make_params(const Prob& pr) {
  Params p{};
  p.B = pr.B;
  p.Hq = pr.Hq;
  p.Hkv = pr.Hkv;
  p.Lq = pr.Lq;
  p.Lk = pr.Lk;
  p.Lq_pad = cdiv(pr.Lq, kBwdBM) * kBwdBM;
  p.mB = pr.mB;
  p.mH = pr.mH;
  p.geo = pr.geo();
  p.D = int(pr.D);
  p.scale = pr.scale;
  p.scale_log2 = float(double(pr.scale) * 1.4426950408889634);
  return p;
}

// the warp_bits ballot: lane c < 4 tests group c
static uint32_t sim_warp_bits(const bool* mask, const Geometry& g, int64_t row, int64_t col0, bool transposed) {
  uint32_t bits = 0;
  for (int lane = 0; lane < 4; ++lane) {
    const bool bit = transposed ? group_bit(mask, g, col0 + 16 * lane, row) : group_bit(mask, g, row, col0 + 16 * lane);
    if (bit) bits |= 1u << lane;
  }
  return bits;
}

// ------------------------------------------------------------ forward replay
static void sim_forward(const Prob& pr, const List& L, std::vector<uint16_t>& out, std::vector<float>& lse) {
  const int D = int(pr.D), DT = D / 8, NTH = kFwdWarps * 32;
  const Params p = make_params(pr);
  const int64_t nqt = cdiv(pr.Lq, kFwdBM), nkt = cdiv(pr.Lk, kBN);
  CHECK(L.n_outer == nqt && L.n_inner == nkt, "forward list shape");
  out.assign(size_t(pr.B * pr.Hq * pr.Lq * D), 0xdead);
  lse.assign(size_t(pr.B * pr.Hq * pr.Lq), NAN);
  std::vector<int> wout(out.size(), 0), wlse(lse.size(), 0);
  const uint32_t sQ = 0, sK0 = 2u * kFwdBM * D, sV0 = sK0 + 2u * 2 * kBN * D, kStage = 2u * kBN * D;
  const int64_t tagQ = -2;
  for (int64_t bid = 0; bid < pr.B * pr.Hq * nqt; ++bid) {
    const RowTile bt = q_tile_of_block(bid, nqt);
    const int64_t bh = bt.bh, qt = bt.tile, b = bh / pr.Hq, h = bh % pr.Hq;
    CHECK(qt >= 0 && qt < nqt && bh < pr.B * pr.Hq, "block coords");
    const int64_t bkv = b * pr.Hkv + h / (pr.Hq / pr.Hkv);
    const int64_t mrow = (pr.mB == 1 ? 0 : b) * pr.mH + (pr.mH == 1 ? 0 : h);
    const bool* mask = reinterpret_cast<const bool*>(pr.mask.data()) + mrow * pr.nqb * pr.nkb;
    const int64_t lrow = mrow * nqt + qt;
    const int cnt = L.cnt[size_t(lrow)];
    const uint32_t* list = L.idx.data() + lrow * nkt;
    Smem sm(size_t(kFwdBM + 4 * kBN) * D);
    std::vector<Frag> acc(kFwdWarps, Frag(DT));
    std::vector<float> m_run(kFwdWarps * 32 * 2, -INFINITY), l_run(kFwdWarps * 32 * 2, 0.f);
    if (cnt > 0) {
      sim_load_tile(sm, sQ, pr.q, bh * pr.Lq * D, qt * kFwdBM, pr.Lq, kFwdBM, D, NTH, tagQ);
      uint32_t e = list[0];
      sim_load_tile(sm, sK0, pr.k, bkv * pr.Lk * D, int64_t(e & ~kPartial) * kBN, pr.Lk, kBN, D, NTH, e & ~kPartial);
      sim_load_tile(sm, sV0, pr.v, bkv * pr.Lk * D, int64_t(e & ~kPartial) * kBN, pr.Lk, kBN, D, NTH, e & ~kPartial);
      uint32_t e_next = cnt > 1 ? list[1] : 0u;
      for (int it = 0; it < cnt; ++it) {
        const uint32_t st = uint32_t(it & 1) * kStage;
        const uint32_t e_cur = e;
        const int64_t kt = e_cur & ~kPartial;
        // (the kernel issues the next tile's loads before computing this one: model the
        // stage they land in now -- a wrong stage overwrites this tile and the tags catch it)
        if (it + 1 < cnt) {
          const int64_t r = int64_t(e_next & ~kPartial) * kBN;
          sim_load_tile(sm, sK0 + (kStage - st), pr.k, bkv * pr.Lk * D, r, pr.Lk, kBN, D, NTH, e_next & ~kPartial);
          sim_load_tile(sm, sV0 + (kStage - st), pr.v, bkv * pr.Lk * D, r, pr.Lk, kBN, D, NTH, e_next & ~kPartial);
        }
        e = e_next;
        if (it + 2 < cnt) e_next = list[it + 2];
        for (int w = 0; w < kFwdWarps; ++w) {
          const int64_t row0 = qt * kFwdBM + 16 * w;
          Frag s(8);
          sim_gemm_ss(pr.cd, sm, D, s, sQ, 16 * w, tagQ, sK0 + st, 0, kt);
          for (int lane = 0; lane < 32; ++lane)  // exact scores
            for (int nt = 0; nt < 8; ++nt)
              for (int i = 0; i < 4; ++i) {
                const int64_t qi = row0 + c_row(lane, i), kj = kt * kBN + c_col(lane, nt, i);
                double ref = 0;
                if (qi < pr.Lq && kj < pr.Lk)
                  for (int c = 0; c < D; ++c) ref += double(pr.qf(bh, qi, c)) * pr.kf(bkv, kj, c);
                CHECK(double(s.at(lane, nt, i)) == ref, "fwd S[%lld,%lld] = %g, want %g", (long long)qi,
                      (long long)kj, s.at(lane, nt, i), ref);
                s.at(lane, nt, i) *= p.scale_log2;
              }
          const int64_t col0 = kt * kBN;
          const uint32_t bits = (e_cur & kPartial) ? sim_warp_bits(mask, p.geo, row0, col0, false) : 0xfu;
          const MaskRel mr = mask_rel_q(row0, col0, pr.Lk);
          for (int lane = 0; lane < 32; ++lane)
            for (int nt = 0; nt < 8; ++nt)
              for (int i = 0; i < 4; ++i) {
                const int64_t qi = row0 + c_row(lane, i), kj = col0 + c_col(lane, nt, i);
                const bool truth = pr.allowed(b, h, qi, kj);
                if (e_cur & kPartial) {
                  const bool bit = (bits >> (nt >> 1)) & 1u;
                  const bool ok = elem_ok_q(bit, mr, c_row(lane, i), c_col(lane, nt, i), pr.causal);
                  CHECK(ok == elem_ok(bit, qi, kj, pr.Lk, pr.causal), "elem_ok_q != elem_ok");
                  if (qi < pr.Lq) CHECK(ok == truth, "fwd mask (%lld, %lld): %d want %d", (long long)qi, (long long)kj, ok, truth);
                  if (!ok) s.at(lane, nt, i) = -INFINITY;
                } else if (qi < pr.Lq) {
                  CHECK(truth, "fwd tile without the partial flag has a masked element (%lld, %lld)", (long long)qi,
                        (long long)kj);
                }
              }
          // online softmax, rows g / g + 8: lane maxima, quad max (shfl_xor 1, 2)
          for (int hr = 0; hr < 2; ++hr) {
            float mx[32];
            for (int lane = 0; lane < 32; ++lane) {
              mx[lane] = -INFINITY;
              for (int nt = 0; nt < 8; ++nt)
                for (int j = 0; j < 2; ++j) mx[lane] = std::fmax(mx[lane], s.at(lane, nt, 2 * hr + j));
            }
            float qm[32];
            for (int lane = 0; lane < 32; ++lane) {
              const int q0 = lane & ~3;
              qm[lane] = std::fmax(std::fmax(mx[q0], mx[q0 + 1]), std::fmax(mx[q0 + 2], mx[q0 + 3]));
            }
            for (int lane = 0; lane < 32; ++lane) {
              float& m = m_run[size_t((w * 32 + lane) * 2 + hr)];
              float& l = l_run[size_t((w * 32 + lane) * 2 + hr)];
              const SoftmaxStep ss = softmax_step(m, qm[lane], ex2);
              float sum = 0.f;
              for (int nt = 0; nt < 8; ++nt)
                for (int j = 0; j < 2; ++j) {
                  const float e2 = ex2(s.at(lane, nt, 2 * hr + j) - ss.m_use);
                  CHECK(!std::isnan(e2), "NaN probability");
                  s.at(lane, nt, 2 * hr + j) = e2;
                  sum += e2;
                }
              l = l * ss.alpha + sum;
              m = ss.m_new;
              for (int dt = 0; dt < DT; ++dt) {
                acc[size_t(w)].at(lane, dt, 2 * hr) *= ss.alpha;
                acc[size_t(w)].at(lane, dt, 2 * hr + 1) *= ss.alpha;
              }
            }
          }
          sim_gemm_rs(pr.cd, sm, D, acc[size_t(w)], s, 4, sV0 + st, 0, kt);
        }
      }
    }
    for (int w = 0; w < kFwdWarps; ++w) {
      const int64_t row0 = qt * kFwdBM + 16 * w;
      for (int hr = 0; hr < 2; ++hr)
        for (int lane = 0; lane < 32; ++lane) {
          const int q0 = lane & ~3;
          float lq[4];
          for (int t = 0; t < 4; ++t) lq[t] = l_run[size_t((w * 32 + q0 + t) * 2 + hr)];
          const float l = (lq[0] + lq[1]) + (lq[2] + lq[3]);  // xor 1, then xor 2
          const int64_t qi = row0 + c_row(lane, 2 * hr);
          if (qi >= pr.Lq) continue;
          const float inv = l > 0.f ? 1.f / l : 0.f;
          for (int dt = 0; dt < DT; ++dt) {
            const int c = c_col(lane, dt, 2 * hr);
            const size_t o = size_t((bh * pr.Lq + qi) * D + c);
            out[o] = pr.cd.enc(acc[size_t(w)].at(lane, dt, 2 * hr) * inv);
            out[o + 1] = pr.cd.enc(acc[size_t(w)].at(lane, dt, 2 * hr + 1) * inv);
            wout[o]++;
            wout[o + 1]++;
          }
          if ((lane & 3) == 0) {
            lse[size_t(bh * pr.Lq + qi)] =
                l > 0.f ? (m_run[size_t((w * 32 + lane) * 2 + hr)] + std::log2(l)) * kLn2 : -INFINITY;
            wlse[size_t(bh * pr.Lq + qi)]++;
          }
        }
    }
  }
  for (size_t i = 0; i < wout.size(); ++i) CHECK(wout[i] == 1, "out element %zu written %d times", i, wout[i]);
  for (size_t i = 0; i < wlse.size(); ++i) CHECK(wlse[i] == 1, "lse element %zu written %d times", i, wlse[i]);
}

// ------------------------------------------------------------ backward replay
struct Work {
  std::vector<float> lse2, dsum;
};

static Work sim_prep(const Prob& pr, const std::vector<uint16_t>& out, const std::vector<float>& lse) {
  const Params p = make_params(pr);
  Work w;
  const int64_t rows = pr.B * pr.Hq * p.Lq_pad;
  w.lse2.assign(size_t(rows), NAN);
  w.dsum.assign(size_t(rows), NAN);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t bh = r / p.Lq_pad, i = r % p.Lq_pad;
    float ds = 0.f, l2 = INFINITY;
    if (i < pr.Lq) {
      float part[32];
      for (int lane = 0; lane < 32; ++lane) {
        part[lane] = 0.f;
        for (int d = 2 * lane; d < pr.D; d += 64) {
          const size_t o = size_t((bh * pr.Lq + i) * pr.D + d);
          part[lane] += pr.cd.dec(pr.go[o]) * pr.cd.dec(out[o]) + pr.cd.dec(pr.go[o + 1]) * pr.cd.dec(out[o + 1]);
        }
      }
      for (int o2 = 16; o2 > 0; o2 >>= 1) {
        float nxt[32];
        for (int lane = 0; lane < 32; ++lane) nxt[lane] = part[lane] + part[lane ^ o2];
        std::memcpy(part, nxt, sizeof(part));
      }
      ds = part[0];
      const float l = lse[size_t(bh * pr.Lq + i)];
      if (l != -INFINITY) l2 = l * kLog2e;
    }
    w.dsum[size_t(r)] = ds;
    w.lse2[size_t(r)] = l2;
  }
  return w;
}

// exact check of a score-like fragment: acc(lane, nt, i) == sum_c A(row, c) B(col, c)
template <class FA, class FB>
static void check_exact(Frag& f, int64_t row0, int64_t col0, int64_t rlim, int64_t clim, int D, FA a, FB bfun,
                        const char* what) {
  for (int lane = 0; lane < 32; ++lane)
    for (int nt = 0; nt < f.nt; ++nt)
      for (int i = 0; i < 4; ++i) {
        const int64_t r = row0 + c_row(lane, i), c = col0 + c_col(lane, nt, i);
        double ref = 0;
        if (r < rlim && c < clim)
          for (int d = 0; d < D; ++d) ref += double(a(r, d)) * bfun(c, d);
        CHECK(double(f.at(lane, nt, i)) == ref, "%s[%lld,%lld] = %g, want %g", what, (long long)r, (long long)c,
              f.at(lane, nt, i), ref);
      }
}

static void sim_dq(const Prob& pr, const List& L, const Work& wk, std::vector<uint16_t>& dq) {
  const int D = int(pr.D), DT = D / 8, NTH = kBwdWarps * 32;
  const Params p = make_params(pr);
  const int64_t nqt = cdiv(pr.Lq, kBwdBM), nkt = cdiv(pr.Lk, kBN);
  CHECK(L.n_outer == nqt && L.n_inner == nkt, "dq list shape");
  dq.assign(size_t(pr.B * pr.Hq * pr.Lq * D), 0xdead);
  std::vector<int> wr(dq.size(), 0);
  const uint32_t sQ = 0, sO = 2u * kBwdBM * D, sK0 = sO + 2u * kBwdBM * D, sV0 = sK0 + 2u * 2 * kBN * D,
                 kStage = 2u * kBN * D;
  const int64_t tagQ = -2, tagO = -3;
  for (int64_t bid = 0; bid < pr.B * pr.Hq * nqt; ++bid) {
    const RowTile bt = q_tile_of_block(bid, nqt);
    const int64_t bh = bt.bh, qt = bt.tile, b = bh / pr.Hq, h = bh % pr.Hq;
    const int64_t bkv = b * pr.Hkv + h / (pr.Hq / pr.Hkv);
    const int64_t mrow = (pr.mB == 1 ? 0 : b) * pr.mH + (pr.mH == 1 ? 0 : h);
    const bool* mask = reinterpret_cast<const bool*>(pr.mask.data()) + mrow * pr.nqb * pr.nkb;
    const int64_t lrow = mrow * nqt + qt;
    const int cnt = L.cnt[size_t(lrow)];
    const uint32_t* list = L.idx.data() + lrow * nkt;
    Smem sm(size_t(2 * kBwdBM + 4 * kBN) * D);
    std::vector<Frag> acc(kBwdWarps, Frag(DT));
    if (cnt > 0) {
      sim_load_tile(sm, sQ, pr.q, bh * pr.Lq * D, qt * kBwdBM, pr.Lq, kBwdBM, D, NTH, tagQ);
      sim_load_tile(sm, sO, pr.go, bh * pr.Lq * D, qt * kBwdBM, pr.Lq, kBwdBM, D, NTH, tagO);
      uint32_t e = list[0];
      sim_load_tile(sm, sK0, pr.k, bkv * pr.Lk * D, int64_t(e & ~kPartial) * kBN, pr.Lk, kBN, D, NTH, e & ~kPartial);
      sim_load_tile(sm, sV0, pr.v, bkv * pr.Lk * D, int64_t(e & ~kPartial) * kBN, pr.Lk, kBN, D, NTH, e & ~kPartial);
      uint32_t e_next = cnt > 1 ? list[1] : 0u;
      for (int it = 0; it < cnt; ++it) {
        const uint32_t st = uint32_t(it & 1) * kStage;
        const uint32_t e_cur = e;
        const int64_t kt = e_cur & ~kPartial;
        if (it + 1 < cnt) {
          const int64_t r = int64_t(e_next & ~kPartial) * kBN;
          sim_load_tile(sm, sK0 + (kStage - st), pr.k, bkv * pr.Lk * D, r, pr.Lk, kBN, D, NTH, e_next & ~kPartial);
          sim_load_tile(sm, sV0 + (kStage - st), pr.v, bkv * pr.Lk * D, r, pr.Lk, kBN, D, NTH, e_next & ~kPartial);
        }
        e = e_next;
        if (it + 2 < cnt) e_next = list[it + 2];
        for (int w = 0; w < kBwdWarps; ++w) {
          const int64_t row0 = qt * kBwdBM + 16 * w, col0 = kt * kBN;
          Frag s(8), dp(8);
          sim_gemm_ss(pr.cd, sm, D, s, sQ, 16 * w, tagQ, sK0 + st, 0, kt);
          sim_gemm_ss(pr.cd, sm, D, dp, sO, 16 * w, tagO, sV0 + st, 0, kt);
          check_exact(s, row0, col0, pr.Lq, pr.Lk, D, [&](int64_t r, int64_t d) { return pr.qf(bh, r, d); },
                      [&](int64_t c, int64_t d) { return pr.kf(bkv, c, d); }, "dq S");
          check_exact(dp, row0, col0, pr.Lq, pr.Lk, D, [&](int64_t r, int64_t d) { return pr.gof(bh, r, d); },
                      [&](int64_t c, int64_t d) { return pr.vf(bkv, c, d); }, "dq dP");
          const uint32_t bits = (e_cur & kPartial) ? sim_warp_bits(mask, p.geo, row0, col0, false) : 0xfu;
          const MaskRel mr = mask_rel_q(row0, col0, pr.Lk);
          for (int lane = 0; lane < 32; ++lane) {
            float l2[2], ds[2];
            for (int hr = 0; hr < 2; ++hr) {
              l2[hr] = wk.lse2[size_t(bh * p.Lq_pad + row0 + c_row(lane, 2 * hr))];
              ds[hr] = wk.dsum[size_t(bh * p.Lq_pad + row0 + c_row(lane, 2 * hr))];
            }
            for (int nt = 0; nt < 8; ++nt)
              for (int i = 0; i < 4; ++i) {
                float x = s.at(lane, nt, i) * p.scale_log2;
                const int64_t qi = row0 + c_row(lane, i), kj = col0 + c_col(lane, nt, i);
                const bool truth = pr.allowed(b, h, qi, kj);
                if (e_cur & kPartial) {
                  const bool ok = elem_ok_q((bits >> (nt >> 1)) & 1u, mr, c_row(lane, i), c_col(lane, nt, i), pr.causal);
                  if (qi < pr.Lq) CHECK(ok == truth, "dq mask (%lld, %lld)", (long long)qi, (long long)kj);
                  if (!ok) x = -INFINITY;
                } else if (qi < pr.Lq) {
                  CHECK(truth, "dq tile without the partial flag has a masked element");
                }
                const float prb = ex2(x - l2[i >> 1]);
                CHECK(!std::isnan(prb) && prb <= 1.0001f, "dq P = %g", prb);
                if (!truth) CHECK(prb == 0.f, "dq P of a masked / dead element = %g", prb);
                s.at(lane, nt, i) = prb * (dp.at(lane, nt, i) - ds[i >> 1]);
              }
          }
          sim_gemm_rs(pr.cd, sm, D, acc[size_t(w)], s, 4, sK0 + st, 0, kt);
        }
      }
    }
    for (int w = 0; w < kBwdWarps; ++w)
      for (int lane = 0; lane < 32; ++lane)
        for (int hr = 0; hr < 2; ++hr) {
          const int64_t qi = qt * kBwdBM + 16 * w + c_row(lane, 2 * hr);
          if (qi >= pr.Lq) continue;
          for (int dt = 0; dt < DT; ++dt) {
            const size_t o = size_t((bh * pr.Lq + qi) * D + c_col(lane, dt, 2 * hr));
            dq[o] = pr.cd.enc(acc[size_t(w)].at(lane, dt, 2 * hr) * pr.scale);
            dq[o + 1] = pr.cd.enc(acc[size_t(w)].at(lane, dt, 2 * hr + 1) * pr.scale);
            wr[o]++;
            wr[o + 1]++;
          }
        }
  }
  for (size_t i = 0; i < wr.size(); ++i) CHECK(wr[i] == 1, "dq element %zu written %d times", i, wr[i]);
}

static void sim_dkdv(const Prob& pr, const List& T, const Work& wk, std::vector<uint16_t>& dk, std::vector<uint16_t>& dv) {
  const int D = int(pr.D), DT = D / 8, NTH = kBwdWarps * 32, QS = dkdv_qs(D), QNT = QS / 8;
  Params p = make_params(pr);
  p.tcnt = T.cnt.data();
  p.tidx = T.idx.data();
  const int64_t nqt = cdiv(pr.Lq, kBwdBM), nkt = cdiv(pr.Lk, kBN);
  CHECK(T.n_outer == nkt && T.n_inner == nqt, "dkdv list shape");
  dk.assign(size_t(pr.B * pr.Hkv * pr.Lk * D), 0xdead);
  dv.assign(dk.size(), 0xdead);
  std::vector<int> wr(dk.size(), 0);
  const uint32_t sK = 0, sV = 2u * kBN * D, sQ0 = sV + 2u * kBN * D, sO0 = sQ0 + 2u * 2 * kBwdBM * D,
                 kStage = 2u * kBwdBM * D;
  const int64_t tagK = -4, tagV = -5;
  const int G = int(pr.Hq / pr.Hkv);
  for (int64_t bid = 0; bid < pr.B * pr.Hkv * nkt; ++bid) {
    const RowTile bt = k_tile_of_block(bid, nkt);
    const int64_t bkv = bt.bh, kt = bt.tile, b = bkv / pr.Hkv, hkv = bkv % pr.Hkv;
    Smem sm(size_t(2 * kBN + 4 * kBwdBM) * D);
    std::vector<float> stats(size_t(4 * kBwdBM), NAN);
    std::vector<int64_t> stag(stats.size(), -1);
    std::vector<Frag> adk(kBwdWarps, Frag(DT)), adv(kBwdWarps, Frag(DT));
    // expected steps, for checking the cursor walk
    std::vector<std::pair<int, uint32_t>> want;
    for (int hh = 0; hh < G; ++hh) {
      const int64_t h = hkv * G + hh;
      const int64_t lrow = ((pr.mB == 1 ? 0 : b) * pr.mH + (pr.mH == 1 ? 0 : h)) * nkt + kt;
      for (int n = 0; n < T.cnt[size_t(lrow)]; ++n) want.push_back({hh, T.idx[size_t(lrow * nqt + n)]});
    }
    size_t step = 0;
    auto tag_of = [&](const StepCursor& c) { return int64_t(c.hh) * 1000000 + (c.list[c.n] & ~kPartial); };
    auto issue = [&](const StepCursor& c, uint32_t stage) {
      const int64_t h = hkv * G + c.hh, bh = b * pr.Hq + h;
      const int64_t qt = c.list[c.n] & ~kPartial;
      sim_load_tile(sm, sQ0 + stage * kStage, pr.q, bh * pr.Lq * D, qt * kBwdBM, pr.Lq, kBwdBM, D, NTH, tag_of(c));
      sim_load_tile(sm, sO0 + stage * kStage, pr.go, bh * pr.Lq * D, qt * kBwdBM, pr.Lq, kBwdBM, D, NTH, tag_of(c));
      std::vector<int> seen(size_t(2 * kBwdBM), 0);
      for (int tid = 0; tid < 32; ++tid) {
        const int si = stat_smem(tid, int(stage));
        CHECK(si % 4 == 0 && si >= 0 && si + 4 <= 4 * kBwdBM, "stat smem index");
        const std::vector<float>& src = tid < 16 ? wk.lse2 : wk.dsum;
        for (int e = 0; e < 4; ++e) {
          stats[size_t(si + e)] = src[size_t(bh * p.Lq_pad + qt * kBwdBM + stat_row(tid) + e)];
          stag[size_t(si + e)] = tag_of(c) * 2 + (tid < 16 ? 0 : 1);
          seen[size_t((tid < 16 ? 0 : kBwdBM) + stat_row(tid) + e)]++;
        }
      }
      for (int x : seen) CHECK(x == 1, "stat row copied %d times", x);
    };
    StepCursor cur{-1, 0, 0, nullptr};
    cursor_next(cur, p, b, hkv, kt, nqt, nkt, G);
    if (cur.hh < G && cur.n < cur.cnt) {
      sim_load_tile(sm, sK, pr.k, bkv * pr.Lk * D, kt * kBN, pr.Lk, kBN, D, NTH, tagK);
      sim_load_tile(sm, sV, pr.v, bkv * pr.Lk * D, kt * kBN, pr.Lk, kBN, D, NTH, tagV);
      issue(cur, 0);
      for (int it = 0; cur.hh < G; ++it) {
        const uint32_t stage = uint32_t(it & 1);
        CHECK(step < want.size() && want[step].first == cur.hh && want[step].second == cur.list[cur.n],
              "dkdv cursor step %zu", step);
        ++step;
        const int64_t tg = tag_of(cur);
        StepCursor nxt = cur;
        cursor_next(nxt, p, b, hkv, kt, nqt, nkt, G);
        if (nxt.hh < G) issue(nxt, stage ^ 1u);
        const int64_t h = hkv * G + cur.hh, bh = b * pr.Hq + h;
        const uint32_t e = cur.list[cur.n];
        const int64_t qcol0 = int64_t(e & ~kPartial) * kBwdBM;
        const int64_t mrow = (pr.mB == 1 ? 0 : b) * pr.mH + (pr.mH == 1 ? 0 : h);
        const bool* mask = reinterpret_cast<const bool*>(pr.mask.data()) + mrow * pr.nqb * pr.nkb;
        const uint32_t sQ = sQ0 + stage * kStage, sO = sO0 + stage * kStage;
        for (int w = 0; w < kBwdWarps; ++w) {
          const int64_t key0 = kt * kBN + 16 * w;
          const uint32_t bits = (e & kPartial) ? sim_warp_bits(mask, p.geo, key0, qcol0, true) : 0xfu;
          const MaskRel mr = mask_rel_k(key0, qcol0, pr.Lk);
          for (int qs = 0; qs < kBwdBM / QS; ++qs) {
            Frag s(QNT), dp(QNT);
            sim_gemm_ss(pr.cd, sm, D, s, sK, 16 * w, tagK, sQ, qs * QS, tg);
            check_exact(s, key0, qcol0 + qs * QS, pr.Lk, pr.Lq, D, [&](int64_t r, int64_t d) { return pr.kf(bkv, r, d); },
                        [&](int64_t c, int64_t d) { return pr.qf(bh, c, d); }, "dkdv S^T");
            for (int lane = 0; lane < 32; ++lane)
              for (int nt = 0; nt < QNT; ++nt)
                for (int i = 0; i < 4; ++i) {
                  float x = s.at(lane, nt, i) * p.scale_log2;
                  const int qc = qs * QS + c_col(lane, nt, i);
                  const int64_t kj = key0 + c_row(lane, i), qi = qcol0 + qc;
                  const bool truth = pr.allowed(b, h, qi, kj);
                  if (e & kPartial) {
                    const bool bit = (bits >> (qc >> 4)) & 1u;
                    const bool ok = elem_ok_k(bit, mr, c_row(lane, i), qc, pr.causal);
                    CHECK(ok == elem_ok(bit, qi, kj, pr.Lk, pr.causal), "elem_ok_k != elem_ok");
                    if (qi < pr.Lq && kj < pr.Lk) CHECK(ok == truth, "dkdv mask (%lld, %lld)", (long long)qi, (long long)kj);
                    if (!ok) x = -INFINITY;
                  } else if (qi < pr.Lq && kj < pr.Lk) {
                    CHECK(truth, "dkdv tile without the partial flag has a masked element");
                  }
                  const size_t li = size_t(stat_lse(int(stage), qc));
                  CHECK(stag[li] == tg * 2, "lse2 stat of the wrong step");
                  const float prb = ex2(x - stats[li]);
                  CHECK(!std::isnan(prb) && prb <= 1.0001f, "dkdv P = %g", prb);
                  if (!truth && kj < pr.Lk) CHECK(prb == 0.f, "dkdv P of a masked / dead element = %g", prb);
                  s.at(lane, nt, i) = prb;
                }
            sim_gemm_rs(pr.cd, sm, D, adv[size_t(w)], s, QS / 16, sO, qs * QS, tg);
            sim_gemm_ss(pr.cd, sm, D, dp, sV, 16 * w, tagV, sO, qs * QS, tg);
            check_exact(dp, key0, qcol0 + qs * QS, pr.Lk, pr.Lq, D, [&](int64_t r, int64_t d) { return pr.vf(bkv, r, d); },
                        [&](int64_t c, int64_t d) { return pr.gof(bh, c, d); }, "dkdv dP^T");
            for (int lane = 0; lane < 32; ++lane)
              for (int nt = 0; nt < QNT; ++nt)
                for (int i = 0; i < 4; ++i) {
                  const size_t di = size_t(stat_dsum(int(stage), qs * QS + c_col(lane, nt, i)));
                  CHECK(stag[di] == tg * 2 + 1, "dsum stat of the wrong step");
                  s.at(lane, nt, i) *= dp.at(lane, nt, i) - stats[di];
                }
            sim_gemm_rs(pr.cd, sm, D, adk[size_t(w)], s, QS / 16, sQ, qs * QS, tg);
          }
        }
        cur = nxt;
      }
    }
    CHECK(step == want.size(), "dkdv walked %zu steps, want %zu", step, want.size());
    for (int w = 0; w < kBwdWarps; ++w)
      for (int lane = 0; lane < 32; ++lane)
        for (int hr = 0; hr < 2; ++hr) {
          const int64_t kj = kt * kBN + 16 * w + c_row(lane, 2 * hr);
          if (kj >= pr.Lk) continue;
          for (int dt = 0; dt < DT; ++dt) {
            const size_t o = size_t((bkv * pr.Lk + kj) * D + c_col(lane, dt, 2 * hr));
            dk[o] = pr.cd.enc(adk[size_t(w)].at(lane, dt, 2 * hr) * pr.scale);
            dk[o + 1] = pr.cd.enc(adk[size_t(w)].at(lane, dt, 2 * hr + 1) * pr.scale);
            dv[o] = pr.cd.enc(adv[size_t(w)].at(lane, dt, 2 * hr));
            dv[o + 1] = pr.cd.enc(adv[size_t(w)].at(lane, dt, 2 * hr + 1));
            wr[o]++;
            wr[o + 1]++;
          }
        }
  }
  for (size_t i = 0; i < wr.size(); ++i) CHECK(wr[i] == 1, "dk/dv element %zu written %d times", i, wr[i]);
}

// ------------------------------------------------------------ driver
static double compare(const char* what, const Prob& pr, const std::vector<uint16_t>& got, const std::vector<double>& ref,
                      double rel) {
  double mx = 0, err = 0;
  for (double r : ref) mx = std::max(mx, std::fabs(r));
  const double tol = rel * mx + 1e-3;
  size_t bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = pr.cd.dec(got[i]);
    const double e = std::fabs(g - ref[i]);
    if (!(e <= tol)) {
      if (bad < 3) CHECK(false, "%s[%zu] = %g, want %g (tol %g)", what, i, g, ref[i], tol);
      ++bad;
    }
    if (e > err || std::isnan(e)) err = e;
  }
  if (bad > 3) CHECK(false, "%s: %zu elements off", what, bad);
  return mx > 0 ? err / mx : err;
}

enum class MaskKind { kRandom, kAll, kNone, kEmptyRows, kBand };

static void run_case(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t bq, int64_t bk,
                     bool causal, MaskKind mk, bool per_head, Fmt fmt, bool backward, std::mt19937& rng,
                     float scale_mul = 1.f) {
  const int before = failures;
  Prob pr{};
  pr.B = B, pr.Hq = Hq, pr.Hkv = Hkv, pr.Lq = Lq, pr.Lk = Lk, pr.D = D, pr.bq = bq, pr.bk = bk;
  pr.nqb = cdiv(Lq, bq);
  pr.nkb = cdiv(Lk, bk);
  pr.mB = per_head ? B : 1;
  pr.mH = per_head ? Hq : 1;
  pr.causal = causal;
  pr.scale = scale_mul / std::sqrt(float(D));
  pr.cd = Codec{fmt};
  std::uniform_int_distribution<int> val(-2, 2);  // multiples of 1/2 in [-1, 1]
  auto fill = [&](std::vector<uint16_t>& t, int64_t n) {
    t.resize(size_t(n));
    for (auto& x : t) x = pr.cd.enc(0.5f * float(val(rng)));
  };
  fill(pr.q, B * Hq * Lq * D);
  fill(pr.k, B * Hkv * Lk * D);
  fill(pr.v, B * Hkv * Lk * D);
  fill(pr.go, B * Hq * Lq * D);
  pr.mask.assign(size_t(pr.mB * pr.mH * pr.nqb * pr.nkb), 0);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (int64_t x = 0; x < pr.mB * pr.mH; ++x)
    for (int64_t i = 0; i < pr.nqb; ++i)
      for (int64_t j = 0; j < pr.nkb; ++j) {
        uint8_t m = 0;
        switch (mk) {
          case MaskKind::kRandom: m = u(rng) < 0.35f; break;
          case MaskKind::kAll: m = 1; break;
          case MaskKind::kNone: m = 0; break;
          case MaskKind::kEmptyRows: m = i != 0 && i != pr.nqb - 1 && u(rng) < 0.5f; break;
          case MaskKind::kBand: m = std::llabs(i * bq - j * bk) <= 2 * std::max(bq, bk); break;
        }
        pr.mask[size_t((x * pr.nqb + i) * pr.nkb + j)] = m;
      }
  const List lf = sim_build_list(pr, kFwdBM, kBN, false);
  std::vector<uint16_t> out;
  std::vector<float> lse;
  sim_forward(pr, lf, out, lse);
  const Ref ref = reference(pr, backward ? &out : nullptr, backward ? &lse : nullptr);
  const double rel = fmt == Fmt::F16 ? 4e-3 : 2.5e-2;
  double e_out = compare("out", pr, out, ref.out, rel), e_lse = 0;
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      CHECK(lse[i] == -INFINITY, "lse[%zu] = %g, want -inf", i, lse[i]);
      for (int64_t c = 0; c < D; ++c) CHECK(out[i * size_t(D) + size_t(c)] == 0, "out of a dead row not 0");
    } else {
      const double e = std::fabs(double(lse[i]) - ref.lse[i]);
      e_lse = std::max(e_lse, e);
      CHECK(e <= 1e-4 * (1 + std::fabs(ref.lse[i])), "lse[%zu] = %g, want %g", i, lse[i], ref.lse[i]);
    }
  }
  double e_dq = 0, e_dk = 0, e_dv = 0;
  if (backward) {
    const List lr = sim_build_list(pr, kBwdBM, kBN, false);
    const List lt = sim_build_list(pr, kBwdBM, kBN, true);
    const Work wk = sim_prep(pr, out, lse);
    std::vector<uint16_t> dq, dk, dv;
    sim_dq(pr, lr, wk, dq);
    sim_dkdv(pr, lt, wk, dk, dv);
    e_dq = compare("dq", pr, dq, ref.dq, 2 * rel);
    e_dk = compare("dk", pr, dk, ref.dk, 2 * rel);
    e_dv = compare("dv", pr, dv, ref.dv, 2 * rel);
  }
  std::printf("%s D=%3lld B=%lld Hq=%lld Hkv=%lld Lq=%3lld Lk=%3lld blk=(%3lld,%3lld) causal=%d mask=%d%s%s: "
              "rel err out %.1e lse %.1e dq %.1e dk %.1e dv %.1e  %s\n",
              fmt == Fmt::F16 ? "f16 " : "bf16", (long long)D, (long long)B, (long long)Hq, (long long)Hkv, (long long)Lq,
              (long long)Lk, (long long)bq, (long long)bk, causal, int(mk), per_head ? " per-head" : "",
              backward ? " +bwd" : "", e_out, e_lse, e_dq, e_dk, e_dv, failures == before ? "ok" : "FAILED");
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "quick") == 0;
  std::mt19937 rng(20261130);
  // helper identities over many lanes / offsets
  for (int D : {64, 128})
    for (int lane = 0; lane < 32; ++lane)
      for (int row0 = 0; row0 < 128; row0 += 8)
        for (int c0 = 0; c0 < D / 8; c0 += 2) {
          const RC a = ldsm_rc_a(lane, row0, c0), bn = ldsm_rc_bn(lane, row0, c0);
          CHECK(at(lane_off_a(lane, D), row0, c0, D) == 2u * uint32_t(swz(a.row, a.chunk, D)), "at/a");
          CHECK(at(lane_off_bn(lane, D), row0, c0, D) == 2u * uint32_t(swz(bn.row, bn.chunk, D)), "at/bn");
        }
  for (int64_t q0 : {0, 16, 100, 4096})
    for (int64_t c0 : {0, 64, 128, 4032, 5000})
      for (int64_t Lk : {1, 63, 64, 65, 200, 4100, 100000})
        for (int rr = 0; rr < 16; ++rr)
          for (int cc = 0; cc < 64; ++cc)
            for (bool causal : {false, true}) {
              const MaskRel m = mask_rel_q(q0, c0, Lk), mk = mask_rel_k(q0, c0, Lk);
              CHECK(elem_ok_q(true, m, rr, cc, causal) == elem_ok(true, q0 + rr, c0 + cc, Lk, causal), "rel q");
              CHECK(elem_ok_k(true, mk, rr, cc, causal) == elem_ok(true, c0 + cc, q0 + rr, Lk, causal), "rel k");
            }
  // pair_info / lists on generic block sizes (the list builder takes any block size)
  for (int64_t bq : {1, 7, 16, 33, 64, 100, 256})
    for (int64_t bk : {1, 16, 50, 64, 128})
      for (bool causal : {false, true}) {
        Prob pr{};
        pr.B = 1, pr.Hq = 2, pr.Hkv = 1, pr.Lq = 211, pr.Lk = 173, pr.D = 64, pr.bq = bq, pr.bk = bk;
        pr.nqb = cdiv(pr.Lq, bq), pr.nkb = cdiv(pr.Lk, bk), pr.mB = 1, pr.mH = 2, pr.causal = causal;
        pr.mask.resize(size_t(2 * pr.nqb * pr.nkb));
        std::uniform_int_distribution<int> bit(0, 3);
        for (auto& m : pr.mask) m = bit(rng) != 0;
        for (auto tm : {std::pair<int64_t, int64_t>{kFwdBM, kBN}, {kBwdBM, kBN}}) {
          sim_build_list(pr, tm.first, tm.second, false);
          sim_build_list(pr, tm.first, tm.second, true);
        }
      }
  std::printf("helpers and work lists: %s\n", failures ? "FAILED" : "ok");

  // full replays
  for (Fmt fmt : {Fmt::F16, Fmt::BF16})
    for (int64_t D : {64, 128}) {
      run_case(2, 4, 2, 300, 260, D, 64, 64, false, MaskKind::kRandom, true, fmt, true, rng);
      run_case(2, 4, 2, 300, 260, D, 64, 64, true, MaskKind::kEmptyRows, false, fmt, true, rng);
      run_case(1, 2, 1, 257, 200, D, 48, 80, true, MaskKind::kRandom, true, fmt, true, rng);
      if (quick) continue;
      run_case(1, 2, 2, 300, 260, D, 64, 64, true, MaskKind::kAll, false, fmt, true, rng);
      run_case(1, 2, 1, 130, 200, D, 64, 64, false, MaskKind::kNone, true, fmt, true, rng);
      run_case(1, 2, 1, 257, 384, D, 48, 80, false, MaskKind::kRandom, true, fmt, true, rng);
      run_case(1, 2, 2, 256, 256, D, 128, 128, true, MaskKind::kBand, false, fmt, true, rng);
    }
  if (!quick) {
    for (auto bl : {std::pair<int64_t, int64_t>{16, 16}, {32, 64}, {128, 64}, {16, 128}, {256, 32}}) {
      run_case(1, 2, 1, 257, 384, 64, bl.first, bl.second, false, MaskKind::kRandom, true, Fmt::BF16, true, rng);
      run_case(1, 2, 2, 200, 200, 128, bl.first, bl.second, true, MaskKind::kRandom, false, Fmt::F16, true, rng);
    }
    run_case(1, 3, 1, 70, 17, 64, 16, 16, true, MaskKind::kRandom, true, Fmt::F16, true, rng);  // Lk < tile, GQA 3
    run_case(1, 1, 1, 5, 300, 128, 16, 32, false, MaskKind::kAll, false, Fmt::F16, true, rng);  // Lq < 16
    run_case(1, 2, 1, 150, 150, 64, 32, 32, true, MaskKind::kRandom, false, Fmt::F16, true, rng, -2.f);  // scale < 0
    run_case(1, 2, 1, 150, 150, 64, 32, 32, false, MaskKind::kRandom, false, Fmt::F16, true, rng, 0.f);  // scale 0
  }
  std::printf("%s (%d failures)\n", failures ? "SIMULATION FAILED" : "SIMULATION PASSED", failures);
  return failures ? 1 : 0;
}
