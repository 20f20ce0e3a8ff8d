// Host simulation of sparse24_small_m.cu's thread -> data mapping and arithmetic.
// Includes the kernel file's host+device section (SEMISPARSE_SMALL_M_HOST_SIM) and
// replays the kernel's loops for every block / warp / lane:
//  * every (row, 4-column group) of W is loaded exactly once (values and code), from the
//    value offset and the meta word the kernel computes, and that meta address equals
//    sm80_meta_word / sm90_meta_byte of meta_layout.h;
//  * A and B fragments are built with the kernel's helpers (selector table, byte_perm,
//    word_of), the warp mma is emulated from the PTX fragment layouts of
//    mma.m16n8k16 (as CUTLASS's SM80_16x8x16 traits state them), accumulators are
//    reduced in the kernel's order, and y is compared with x @ decompress(W)^T
//    (exact: small integers).
#define SEMISPARSE_SMALL_M_HOST_SIM 1
#include "sparse24/sparse24_small_m.cu"
#include "sparse24/sparse24_cpu.h"

#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace semisparse::sparse24;
using namespace semisparse::sparse24::small_m;

#include "sim_check.h"

// fp16 bits <-> float for small integers and halves (exact)
static uint16_t f2h(float f) {
  if (f == 0.f) return std::signbit(f) ? 0x8000 : 0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const int e = int((u >> 23) & 0xff) - 127 + 15;
  assert(e > 0 && e < 31);
  const uint32_t man = (u >> 13) & 0x3ff;
  assert((u & 0x1fff) == 0);
  return uint16_t(sign | (e << 10) | man);
}
static float h2f(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const int e = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  uint32_t u;
  if (e == 0) {
    assert(man == 0);
    u = sign;
  } else {
    u = sign | uint32_t(e - 15 + 127) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Problem {
  int64_t M, N, K;
  MetaLayout layout;
  std::vector<uint16_t> dense, values, x;  // fp16 bits
  std::vector<uint16_t> meta16;            // meta as 16-bit units
  std::vector<int> meta_reads;             // per 16-bit unit
  std::vector<int> value_reads;            // per value element
};

static void make_problem(Problem& p, std::mt19937& rng) {
  const int64_t N = p.N, K = p.K, M = p.M;
  std::uniform_int_distribution<int> val(-8, 8), pat(0, 5), nz(0, 3);
  static const int pairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
  p.dense.assign(N * K, 0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      const int* pr = pairs[pat(rng)];
      const int kind = nz(rng);  // 0: both zero-able, also fewer than 2 non-zeros
      for (int i = 0; i < 2; ++i) {
        int v = val(rng);
        if (kind == 0 && i == 1) v = 0;
        p.dense[r * K + 4 * g + pr[i]] = f2h(float(v) * 0.5f);
      }
    }
  // compress exactly like the CPU (kCodeFromMask), meta in the GPU layout
  p.values.assign(N * K / 2, 0);
  std::vector<uint8_t> codes(N * K / 4);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      unsigned mask = 0;
      for (int i = 0; i < 4; ++i) mask |= unsigned((p.dense[r * K + 4 * g + i] & 0x7fff) != 0) << i;
      const unsigned code = kCodeFromMask[mask];
      codes[r * (K / 4) + g] = uint8_t(code);
      uint16_t a = p.dense[r * K + 4 * g + (code & 3)], b = p.dense[r * K + 4 * g + (code >> 2)];
      p.values[r * (K / 2) + 2 * g] = (a & 0x7fff) ? a : 0;
      p.values[r * (K / 2) + 2 * g + 1] = (b & 0x7fff) ? b : 0;
    }
  p.meta16.assign(N * K / 16, 0);
  std::vector<int> filled(N * K / 16, 0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      const unsigned code = codes[r * (K / 4) + g];
      if (p.layout == MetaLayout::kSm80) {
        const int64_t w = sm80_meta_word(r, g / 4, N);
        p.meta16[w] |= uint16_t(code << (4 * (g % 4)));
        filled[w]++;
      } else {
        const int64_t byte = sm90_meta_byte(r, g / 2, N);
        p.meta16[byte / 2] |= uint16_t(code << (4 * (g % 2) + 8 * (byte % 2)));
        filled[byte / 2]++;
      }
    }
  for (size_t i = 0; i < filled.size(); ++i) CHECK(filled[i] == 4, "meta unit %zu filled %d times", i, filled[i]);
  p.x.assign(M * K, 0);
  for (auto& v : p.x) v = f2h(float(val(rng)) * 0.25f);
  p.meta_reads.assign(N * K / 16, 0);
  p.value_reads.assign(N * K / 2, 0);
}

// loads as the kernel does them, recording what was read
static uint4 load_values(Problem& p, int64_t elem_off) {
  CHECK(elem_off % 8 == 0 && elem_off >= 0 && elem_off + 8 <= int64_t(p.values.size()), "value offset %lld",
        (long long)elem_off);
  uint4 v;
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) {
    w[i] = uint32_t(p.values[elem_off + 2 * i]) | uint32_t(p.values[elem_off + 2 * i + 1]) << 16;
    p.value_reads[elem_off + 2 * i]++;
    p.value_reads[elem_off + 2 * i + 1]++;
  }
  v.x = w[0], v.y = w[1], v.z = w[2], v.w = w[3];
  return v;
}
static uint4 load_x(const Problem& p, int64_t elem_off) {
  CHECK(elem_off % 8 == 0 && elem_off + 8 <= int64_t(p.x.size()), "x offset");
  uint4 v;
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) w[i] = uint32_t(p.x[elem_off + 2 * i]) | uint32_t(p.x[elem_off + 2 * i + 1]) << 16;
  v.x = w[0], v.y = w[1], v.z = w[2], v.w = w[3];
  return v;
}

static float half_of(uint32_t reg, int hi) { return h2f(uint16_t(hi ? reg >> 16 : reg & 0xffff)); }

// PTX mma.m16n8k16 .row.col fragment layouts (CUTLASS SM80_16x8x16_F32F16F16F32_TN traits):
//  A (row i, k): lane 4 (i % 8) + (k % 8) / 2, register (i / 8) + 2 (k / 8), half k % 2
//  B (k, n):     lane 4 n + (k % 8) / 2,       register k / 8,               half k % 2
//  C (i, n):     lane 4 (i % 8) + n / 2,       element 2 (i / 8) + n % 2
static void warp_mma(const uint32_t a[32][4], const uint32_t b[32][2], float acc[32][4]) {
  float A[16][16], B[16][8];
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) A[i][k] = half_of(a[4 * (i % 8) + (k % 8) / 2][(i / 8) + 2 * (k / 8)], k % 2);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) B[k][n] = half_of(b[4 * n + (k % 8) / 2][k / 8], k % 2);
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n) {
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[i][k] * B[k][n];
      acc[4 * (i % 8) + n / 2][2 * (i / 8) + n % 2] += s;
    }
}

// Replays small_m_kernel for one config; returns y (fp32, before the output rounding).
static std::vector<float> run_kernel_sim(Problem& p, const Config& c) {
  const int64_t M = p.M, N = p.N, K = p.K;
  const int NT = M <= 8 ? 1 : 2, kTok = 8 * NT;
  const int nwarps = c.warps, wr_n = c.wr, wk_n = nwarps / wr_n;
  const int rb = kRowsPerWarp * wr_n, ld = rb + 4;
  const int s_n = c.s;
  const int q = int((K + kChunkCols - 1) / kChunkCols);
  std::vector<float> y(M * N, NAN);
  std::vector<int> y_writes(M * N, 0);
  uint2 lut_table[16];
  for (unsigned i = 0; i < 16; ++i) {
    const Selectors s = expand_selectors(i);
    lut_table[i] = uint2{s.lo, s.hi};
  }
  const Lut lut{lut_table};
  for (int64_t by = 0; by < c.row_tiles; ++by) {
    // shared memory of every block of the cluster
    std::vector<std::vector<float>> red(s_n, std::vector<float>(smem_floats(c, M), NAN));
    const int64_t tile_row0 = by * rb;
    for (int b = 0; b < s_n; ++b) {
      const SliceBounds sb = slice_bounds(b, s_n, K);
      const int cb = sb.cb, ce = sb.ce, ce_full = sb.ce_full;
      CHECK(cb == int(slice_begin(b, s_n, q)) && ce == int(slice_begin(b + 1, s_n, q)) &&
                ce_full == std::min(ce, int(K / kChunkCols)), "slice bounds");
      for (int warp = 0; warp < nwarps; ++warp) {
        const int wr = warp % wr_n, wk = warp / wr_n;
        const int64_t r0 = tile_row0 + kRowsPerWarp * wr;
        float acc[2][2][32][4] = {};  // [mt][nt][lane][i]
        if (r0 < N) {
          // the kernel's loop: hot iterations while c + kU <= ce_full, then one partial
          int cstart = cb + wk * kU;
          const int cstride = wk_n * kU;
          std::vector<std::pair<int, bool>> iters;  // (c, predicated)
          int cc = cstart;
          for (; cc + kU <= ce_full; cc += cstride) iters.push_back({cc, false});
          if (cc < ce) iters.push_back({cc, true});
          for (auto [c0, pred] : iters) {
            for (int u = 0; u < kU; ++u) {
              const int cu = c0 + u;
              if (pred && cu >= ce) break;
              CHECK(cu < ce && cu >= cb, "chunk out of slice");
              uint32_t afrag[2][32][4], bfrag[2][32][2][4];  // [mt][lane][reg]; [nt][lane][reg][s]
              uint4 va[32][2][2];
              uint32_t mw[32][2][2];
              uint4 xa[32][2][2];
              for (int lane = 0; lane < 32; ++lane) {
                const int g = lane >> 2, t = lane & 3;
                const int ce_lane = lane_chunk_end(ce, K, t);
                const bool ok = !pred || cu < ce_lane;
                CHECK(ok == (kChunkCols * int64_t(cu) + 16 * t < K), "lane predicate");
                for (int mt = 0; mt < 2; ++mt)
                  for (int h = 0; h < 2; ++h) {
                    const int64_t r = r0 + 16 * mt + 8 * h + g;
                    if (ok) {
                      // kernel: pointer at values_offset(r, cstart, t) advanced by 4 uint4 per chunk
                      const int64_t voff = values_offset(r, cu, t, K);
                      CHECK(voff == values_offset(r, cstart, t, K) + 32 * int64_t(cu - cstart), "value step");
                      va[lane][mt][h] = load_values(p, voff);
                      const int64_t midx = meta_base16(p.layout, r, t, N) + int64_t(cu) * meta_step16(N);
                      // the meta unit must be the one meta_layout.h assigns to these 16 columns
                      if (p.layout == MetaLayout::kSm80) {
                        CHECK(midx == sm80_meta_word(r, 4 * int64_t(cu) + t, N), "sm80 word r=%lld c=%d t=%d",
                              (long long)r, cu, t);
                      } else {
                        CHECK(2 * midx == sm90_meta_byte(r, 8 * int64_t(cu) + 2 * t, N) &&
                                  2 * midx + 1 == sm90_meta_byte(r, 8 * int64_t(cu) + 2 * t + 1, N),
                              "sm90 bytes r=%lld c=%d t=%d", (long long)r, cu, t);
                      }
                      mw[lane][mt][h] = p.meta16[midx];
                      p.meta_reads[midx]++;
                    } else {
                      va[lane][mt][h] = uint4{0, 0, 0, 0};
                      mw[lane][mt][h] = 0;
                    }
                  }
                for (int nt = 0; nt < NT; ++nt) {
                  const int64_t tok = 8 * nt + g;
                  const bool xok = ok && tok < M;
                  const int64_t xoff = x_offset(tok < M ? tok : 0, cu, t, K);
                  xa[lane][nt][0] = xok ? load_x(p, xoff) : uint4{0, 0, 0, 0};
                  xa[lane][nt][1] = xok ? load_x(p, xoff + 8) : uint4{0, 0, 0, 0};
                }
              }
              for (int s = 0; s < 4; ++s) {
                for (int lane = 0; lane < 32; ++lane) {
                  for (int mt = 0; mt < 2; ++mt) a_fragment(va[lane][mt], mw[lane][mt], s, lut, afrag[mt][lane]);
                  for (int nt = 0; nt < NT; ++nt) b_fragment(xa[lane][nt], s, bfrag[nt][lane][0][s], bfrag[nt][lane][1][s]);
                }
                for (int nt = 0; nt < NT; ++nt) {
                  uint32_t bb[32][2];
                  for (int lane = 0; lane < 32; ++lane) bb[lane][0] = bfrag[nt][lane][0][s], bb[lane][1] = bfrag[nt][lane][1][s];
                  for (int mt = 0; mt < 2; ++mt) warp_mma(afrag[mt], bb, acc[mt][nt]);
                }
              }
            }
          }
        }
        // fragments -> shared memory slab wk
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          for (int mt = 0; mt < 2; ++mt)
            for (int nt = 0; nt < NT; ++nt)
              for (int i = 0; i < 4; ++i) {
                const int row = kRowsPerWarp * wr + 16 * mt + g + 8 * (i >> 1);
                const int tok = 8 * nt + 2 * t + (i & 1);
                const int64_t idx = int64_t(wk * kTok + tok) * ld + row;
                CHECK(idx < int64_t(red[b].size()), "smem index");
                CHECK(std::isnan(red[b][idx]), "smem slot written twice");
                red[b][idx] = acc[mt][nt][lane][i];
              }
        }
      }
      // block reduction over K-warps, fixed order
      for (int idx = 0; idx < M * rb; ++idx) {
        const int tok = idx / rb, row = idx - tok * rb;
        float sum = 0.f;
        for (int w = 0; w < wk_n; ++w) {
          const float v = red[b][int64_t(w * kTok + tok) * ld + row];
          CHECK(!std::isnan(v), "unwritten smem slot");
          sum += v;
        }
        if (s_n == 1) {
          const int64_t rg = tile_row0 + row;
          if (rg < N) y[tok * N + rg] = sum, y_writes[tok * N + rg]++;
        } else {
          red[b][int64_t(tok) * ld + row] = sum;
        }
      }
    }
    if (s_n > 1) {
      const int rows_per = rb / s_n;
      CHECK(rows_per * s_n == rb, "rows per rank");
      for (int b = 0; b < s_n; ++b)
        for (int idx = 0; idx < M * rows_per; ++idx) {
          const int tok = idx / rows_per, row = b * rows_per + (idx - tok * rows_per);
          float sum = 0.f;
          for (int src = 0; src < s_n; ++src) sum += red[src][int64_t(tok) * ld + row];
          const int64_t rg = tile_row0 + row;
          if (rg < N) y[tok * N + rg] = sum, y_writes[tok * N + rg]++;
        }
    }
  }
  for (size_t i = 0; i < y_writes.size(); ++i) CHECK(y_writes[i] == 1, "y element %zu written %d times", i, y_writes[i]);
  return y;
}

static void check_problem(int64_t M, int64_t N, int64_t K, MetaLayout layout, const Config& c, std::mt19937& rng) {
  Problem p;
  p.M = M, p.N = N, p.K = K, p.layout = layout;
  make_problem(p, rng);
  const int before = failures;
  std::vector<float> y = run_kernel_sim(p, c);
  for (size_t i = 0; i < p.meta_reads.size(); ++i) CHECK(p.meta_reads[i] == 1, "meta unit %zu read %d times", i, p.meta_reads[i]);
  for (size_t i = 0; i < p.value_reads.size(); ++i)
    CHECK(p.value_reads[i] == 1, "value %zu read %d times", i, p.value_reads[i]);
  // reference: x @ dense^T (all values are multiples of 1/8 with small magnitude: exact)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += double(h2f(p.x[m * K + k])) * double(h2f(p.dense[n * K + k]));
      CHECK(double(y[m * N + n]) == ref, "y[%lld,%lld]=%g ref %g (M=%lld N=%lld K=%lld)", (long long)m, (long long)n,
            y[m * N + n], ref, (long long)M, (long long)N, (long long)K);
    }
  std::printf("%s M=%2lld N=%4lld K=%4lld wr=%d warps=%2d s=%d tiles=%lld: %s\n",
              layout == MetaLayout::kSm80 ? "sm80" : "sm90", (long long)M, (long long)N, (long long)K, c.wr, c.warps,
              c.s, (long long)c.row_tiles, failures == before ? "ok" : "FAILED");
}

int main() {
  std::mt19937 rng(1234);
  // selector table: every code expands exactly like the CPU decompress
  for (unsigned code = 0; code < 16; ++code) {
    const Selectors s = expand_selectors(code);
    const uint32_t v = 0xBBBBAAAAu;  // a = 0xAAAA (low), b = 0xBBBB (high)
    const uint32_t lo = byte_perm(v, 0, s.lo), hi = byte_perm(v, 0, s.hi);
    const uint16_t out[4] = {uint16_t(lo), uint16_t(lo >> 16), uint16_t(hi), uint16_t(hi >> 16)};
    const unsigned i0 = code & 3, i1 = code >> 2;
    for (unsigned i = 0; i < 4; ++i) {
      const uint16_t want = i == i1 ? 0xBBBB : i == i0 ? 0xAAAA : 0;
      CHECK(out[i] == want, "code %u position %u", code, i);
    }
  }
  // configs the host picks, over many shapes (sanity of the chooser)
  for (int sms : {108, 132})
    for (bool cl : {false, true})
      for (int64_t M = 1; M <= 16; ++M)
        for (int64_t N : {32, 64, 128, 1024, 2048, 4096, 5120, 11008, 14336, 28672})
          for (int64_t K : {32, 64, 96, 1024, 4096, 11008, 14336}) {
            const Config c = choose_config(M, N, K, sms, cl);
            CHECK(c.wr == 1 || c.wr == 2 || c.wr == 4, "wr");
            CHECK(c.warps == 8 || c.warps == 16, "warps");
            CHECK(c.warps % c.wr == 0, "warps % wr");
            CHECK(c.s >= 1 && c.s <= kMaxCluster && (c.s & (c.s - 1)) == 0, "s");
            CHECK(cl || c.s == 1, "s without clusters");
            CHECK((kRowsPerWarp * c.wr) % c.s == 0, "rows per rank");
            CHECK(smem_floats(c, M) * 4 <= 48 * 1024, "smem %lld", (long long)smem_floats(c, M) * 4);
            CHECK(c.row_tiles * kRowsPerWarp * c.wr >= N && c.row_tiles <= 65535, "tiles");
          }
  std::printf("chooser examples (132 SMs, clusters):\n");
  for (int64_t M : {1, 4, 8, 16})
    for (auto nk : {std::pair<int64_t, int64_t>{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}}) {
      const Config c = choose_config(M, nk.first, nk.second, 132, true);
      std::printf("  M=%2lld N=%5lld K=%5lld -> wr=%d warps=%d s=%d blocks=%lld\n", (long long)M, (long long)nk.first,
                  (long long)nk.second, c.wr, c.warps, c.s, (long long)(c.row_tiles * c.s));
    }
  // full replays: forced configs over small shapes
  struct Shape {
    int64_t M, N, K;
  };
  const Shape shapes80[] = {{1, 32, 32}, {3, 64, 96}, {8, 96, 160}, {9, 128, 224}, {16, 64, 64}, {5, 160, 544}};
  const Shape shapes90[] = {{1, 64, 64}, {2, 128, 192}, {8, 192, 128}, {12, 64, 320}, {16, 128, 512}};
  for (int wr : {1, 2, 4})
    for (int warps : {8, 16})
      for (int s : {1, 2, 4, 8}) {
        for (const Shape& sh : shapes80) {
          Config c;
          c.wr = wr, c.warps = warps, c.s = s;
          c.row_tiles = (sh.N + 32 * wr - 1) / (32 * wr);
          check_problem(sh.M, sh.N, sh.K, MetaLayout::kSm80, c, rng);
        }
        for (const Shape& sh : shapes90) {
          Config c;
          c.wr = wr, c.warps = warps, c.s = s;
          c.row_tiles = (sh.N + 32 * wr - 1) / (32 * wr);
          check_problem(sh.M, sh.N, sh.K, MetaLayout::kSm90, c, rng);
        }
      }
  // the chooser's own configs on a mid-size problem
  for (int64_t M : {1, 7, 16}) {
    const Config c = choose_config(M, 512, 1024, 4, true);
    check_problem(M, 512, 1024, MetaLayout::kSm90, c, rng);
    const Config c2 = choose_config(M, 512, 1056, 4, false);
    check_problem(M, 512, 1056, MetaLayout::kSm80, c2, rng);
  }
  std::printf("%s (%d failures)\n", failures ? "SIMULATION FAILED" : "SIMULATION PASSED", failures);
  return failures ? 1 : 0;
}
