// Host simulation of the BSR linear CUDA fast path (csrc/blocksparse/bsr_linear_mma.cuh and
// the schedule / CSC kernels of bsr_linear_cuda.cu). Includes the header's host+device
// section (SEMISPARSE_BSR_HOST_SIM) and replays, with the header's own index functions:
//  * the device-side preparation: the sanitized row starts (running max of clamped crow),
//    the work list of schedule_rows (pass 1 scans and length histogram, pass 2 placement with
//    the atomic cursor order shuffled), the CSC build (csc_rank with __match_any_sync
//    emulated per 32 blocks, csc_offsets, csc_scatter) -- checked against the CPU front end's
//    CSC and against the schedule's invariants (every block of every row in exactly one
//    chunk, chunk lengths <= C when split, longest bucket first, workspace slots and arrival
//    counters disjoint and inside the host bounds);
//  * bsr_mma_kernel for every CTA (in shuffled order, so split chunks arrive in any order),
//    every thread's cp.async (source inside the operand, chunk written exactly once per
//    stage, zero-fill where absent), every warp's ldmatrix (.trans) from the swizzled tile
//    (addresses 16-byte aligned, inside the tile, the 8 rows of each phase in 8 distinct bank
//    groups), the mma.m16n8k16 fragments (PTX layouts), the k-warp reduction, the partial
//    workspace with the last-arriver sum, the epilogue (every output element written exactly
//    once) -- and compares the output exactly with a double reference on small integers.
// Prints "SIMULATION PASSED (0 failures)" and exits 0 when everything holds.
#define SEMISPARSE_BSR_HOST_SIM 1
#include "blocksparse/bsr_linear_mma.cuh"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace semisparse::bsr::cuda;

#include "sim_check.h"
// what the cases exercised (printed, and required to be non-zero)
static long cov_split_ctas = 0, cov_last_arrivals = 0, cov_multi_pass = 0, cov_gv_split = 0, cov_kwarp = 0,
            cov_skipped_blocks = 0, cov_empty_items = 0, cov_partial_tiles = 0;

// ----------------------------------------------------------------- fp16 for small integers
static uint16_t f2h(float f) {
  if (f == 0.f) return std::signbit(f) ? 0x8000 : 0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  const int e = int((u >> 23) & 0xff) - 127 + 15;
  assert(e > 0 && e < 31 && (u & 0x1fff) == 0);
  return uint16_t(sign | (e << 10) | ((u >> 13) & 0x3ff));
}
static float h2f(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const int e = (h >> 10) & 0x1f;
  uint32_t u = sign;
  if (e != 0) u |= uint32_t(e - 15 + 127) << 23 | uint32_t(h & 0x3ff) << 13;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------------------- the problem
struct Bsr {
  int64_t n = 0, k = 0, bh = 0, bw = 0, nnz = 0;
  std::vector<int64_t> crow, col;
  std::vector<uint16_t> values;  // [nnz][bh][bw]
};

// Random mask with a full and an empty block row (skew); optionally some column indices out
// of range (the kernels must skip those blocks).
static Bsr make_bsr(std::mt19937& rng, int64_t nbr, int64_t nbc, int64_t bh, int64_t bw, double density,
                    bool bad_cols, bool empty) {
  Bsr w;
  w.bh = bh;
  w.bw = bw;
  w.n = nbr * bh;
  w.k = nbc * bw;
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<int> val(-3, 3);
  w.crow.push_back(0);
  for (int64_t r = 0; r < nbr; ++r) {
    for (int64_t c = 0; c < nbc; ++c) {
      const bool full = nbr > 2 && r == 1, none = nbr > 2 && r == nbr - 1;
      if (empty || none || !(full || u(rng) < density)) continue;
      w.col.push_back(c);
    }
    w.crow.push_back(static_cast<int64_t>(w.col.size()));
  }
  w.nnz = static_cast<int64_t>(w.col.size());
  if (bad_cols)
    for (int64_t b = 0; b < w.nnz; b += 5) w.col[b] = (b % 10 == 0) ? -1 : nbc + 2;
  w.values.resize(w.nnz * bh * bw);
  for (auto& v : w.values) v = f2h(float(val(rng)));
  return w;
}

static std::vector<uint16_t> rand_mat(std::mt19937& rng, int64_t rows, int64_t cols) {
  std::uniform_int_distribution<int> val(-3, 3);
  std::vector<uint16_t> m(rows * cols);
  for (auto& v : m) v = f2h(float(val(rng)));
  return m;
}

static bool col_ok(const Bsr& w, int64_t b) { return w.col[b] >= 0 && w.col[b] < w.k / w.bw; }

// double references (blocks with a bad column contribute nothing)
static std::vector<double> ref_forward(const Bsr& w, const std::vector<uint16_t>& x, int64_t m,
                                       const std::vector<uint16_t>* bias) {
  std::vector<double> y(m * w.n, 0.0);
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(w.crow.size()); ++r)
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      if (!col_ok(w, b)) continue;
      for (int64_t t = 0; t < m; ++t)
        for (int64_t i = 0; i < w.bh; ++i) {
          double s = 0;
          for (int64_t j = 0; j < w.bw; ++j)
            s += double(h2f(x[t * w.k + w.col[b] * w.bw + j])) * h2f(w.values[(b * w.bh + i) * w.bw + j]);
          y[t * w.n + r * w.bh + i] += s;
        }
    }
  if (bias)
    for (int64_t t = 0; t < m; ++t)
      for (int64_t n = 0; n < w.n; ++n) y[t * w.n + n] += h2f((*bias)[n]);
  return y;
}
static std::vector<double> ref_grad_input(const Bsr& w, const std::vector<uint16_t>& gy, int64_t m) {
  std::vector<double> dx(m * w.k, 0.0);
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(w.crow.size()); ++r)
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      if (!col_ok(w, b)) continue;
      for (int64_t t = 0; t < m; ++t)
        for (int64_t j = 0; j < w.bw; ++j) {
          double s = 0;
          for (int64_t i = 0; i < w.bh; ++i)
            s += double(h2f(gy[t * w.n + r * w.bh + i])) * h2f(w.values[(b * w.bh + i) * w.bw + j]);
          dx[t * w.k + w.col[b] * w.bw + j] += s;
        }
    }
  return dx;
}
static std::vector<double> ref_grad_values(const Bsr& w, const std::vector<uint16_t>& gy,
                                           const std::vector<uint16_t>& x, int64_t m) {
  std::vector<double> gv(w.nnz * w.bh * w.bw, 0.0);
  for (int64_t r = 0; r + 1 < static_cast<int64_t>(w.crow.size()); ++r)
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) {
      if (!col_ok(w, b)) continue;
      for (int64_t i = 0; i < w.bh; ++i)
        for (int64_t j = 0; j < w.bw; ++j) {
          double s = 0;
          for (int64_t t = 0; t < m; ++t)
            s += double(h2f(gy[t * w.n + r * w.bh + i])) * h2f(x[t * w.k + w.col[b] * w.bw + j]);
          gv[(b * w.bh + i) * w.bw + j] = s;
        }
    }
  return gv;
}

// ---------------------------------------------------------------- device preparation
// fwd_schedule_kernel part 1: rs[i] = running max of clamp(crow[i], 0, nnz), i = 0..nbr
static std::vector<int32_t> sanitize(const std::vector<int64_t>& crow, int64_t nnz) {
  std::vector<int32_t> rs(crow.size());
  int32_t carry = 0;
  for (size_t i = 0; i < crow.size(); ++i) {
    const int64_t v = crow[i] < 0 ? 0 : crow[i] > nnz ? nnz : crow[i];
    carry = std::max<int32_t>(carry, static_cast<int32_t>(v));
    rs[i] = carry;
  }
  return rs;
}

struct Sched {
  std::vector<int32_t> wsbase, splitidx, work;
  int32_t nwork = 0;
};

// schedule_rows replayed: pass 1 in the kernel's tile order (its exclusive scans are prefix
// sums), the bucket cursors, pass 2 with the atomics taken in a random order.
static Sched schedule(const std::vector<int32_t>& rs, int64_t nrows, const RowPlan& plan, std::mt19937& rng) {
  Sched s;
  s.wsbase.assign(nrows, -7);
  s.splitidx.assign(nrows, -7);
  s.work.assign(plan.work_bound * kWorkInts, -7);
  int hist[kBuckets] = {}, cursor[kBuckets];
  int carry_ws = 0, carry_sp = 0;
  for (int64_t base = 0; base < nrows; base += kScheduleThreads) {
    int ews = 0, esp = 0;  // running exclusive sums inside the tile
    for (int tid = 0; tid < kScheduleThreads; ++tid) {
      const int64_t r = base + tid;
      int64_t lo = 0, cnt = 0, nch = 0;
      if (r < nrows) {
        lo = rs[r];
        cnt = rs[r + 1] - lo;
        nch = chunk_count(cnt, plan.c, plan.allow_split);
      }
      const bool split = nch > 1;
      if (r < nrows) {
        s.wsbase[r] = split ? carry_ws + ews : -1;
        s.splitidx[r] = split ? carry_sp + esp : -1;
        for (int64_t j = 0; j < nch; ++j)
          hist[bucket_of(chunk_begin(lo, cnt, nch, j + 1) - chunk_begin(lo, cnt, nch, j), plan.c)]++;
      }
      ews += split ? static_cast<int>(nch) : 0;
      esp += split ? 1 : 0;
    }
    carry_ws += ews;
    carry_sp += esp;
  }
  int total = 0;
  for (int b = kBuckets - 1; b >= 0; --b) {
    cursor[b] = total;
    total += hist[b];
  }
  s.nwork = static_cast<int32_t>(std::min<int64_t>(total, plan.work_bound));
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t cnt = rs[r + 1] - rs[r];
    for (int64_t j = 0; j < chunk_count(cnt, plan.c, plan.allow_split); ++j) items.push_back({r, j});
  }
  std::shuffle(items.begin(), items.end(), rng);
  for (auto [r, j] : items) {
    const int64_t lo = rs[r], cnt = rs[r + 1] - lo, nch = chunk_count(cnt, plan.c, plan.allow_split);
    const int64_t b0 = chunk_begin(lo, cnt, nch, j), b1 = chunk_begin(lo, cnt, nch, j + 1);
    const int pos = cursor[bucket_of(b1 - b0, plan.c)]++;
    CHECK(pos < plan.work_bound, "work position %d beyond the bound %lld", pos, (long long)plan.work_bound);
    if (pos >= plan.work_bound) continue;
    int32_t* w = &s.work[int64_t(pos) * kWorkInts];
    const int32_t v[8] = {int32_t(r), int32_t(b0), int32_t(b1), int32_t(j), int32_t(nch), s.wsbase[r], s.splitidx[r], 0};
    std::copy(v, v + 8, w);
  }
  return s;
}

// The schedule's invariants (rs monotone: every block of [rs[0], rs[nrows]) in one chunk).
static void check_schedule(const Sched& s, const std::vector<int32_t>& rs, int64_t nrows, const RowPlan& plan,
                           int64_t mtiles) {
  CHECK(s.nwork <= plan.work_bound, "nwork %d > bound %lld", s.nwork, (long long)plan.work_bound);
  std::vector<int> covered(rs.empty() ? 0 : rs[nrows] + 1, 0), row_items(nrows, 0);
  std::vector<int> slot_used(plan.ws_slots + 1, 0), sem_used(plan.nsplit + 1, 0);
  int prev_bucket = kBuckets;
  int64_t min_len = int64_t{1} << 40;
  for (int32_t w = 0; w < s.nwork; ++w) {
    const int32_t* it = &s.work[int64_t(w) * kWorkInts];
    const int32_t r = it[0], b0 = it[1], b1 = it[2], j = it[3], nch = it[4], wb = it[5], si = it[6];
    CHECK(r >= 0 && r < nrows, "work %d: row %d", w, r);
    if (r < 0 || r >= nrows) continue;
    row_items[r]++;
    CHECK(b0 >= rs[r] && b0 <= b1 && b1 <= rs[r + 1], "work %d: [%d, %d) outside row %d [%d, %d)", w, b0, b1, r, rs[r],
          rs[r + 1]);
    CHECK(j >= 0 && j < nch, "work %d: chunk %d of %d", w, j, nch);
    if (plan.allow_split) CHECK(b1 - b0 <= plan.c, "work %d: %d blocks > C = %lld", w, b1 - b0, (long long)plan.c);
    const int bk = bucket_of(b1 - b0, plan.c);
    CHECK(bk <= prev_bucket, "work %d: bucket %d after %d (not longest first)", w, bk, prev_bucket);
    prev_bucket = bk;
    // longest first, independently of bucket_of: no later chunk is longer by more than a bucket
    // (chunks longer than C -- only from invalid crow -- share the top bucket)
    CHECK(b1 - b0 > plan.c || b1 - b0 <= min_len + (plan.c + 1) / kBuckets + 1, "work %d: %d blocks after a chunk of %lld (not LPT)", w,
          b1 - b0, (long long)min_len);
    min_len = std::min<int64_t>(min_len, b1 - b0);
    for (int32_t b = b0; b < b1; ++b) covered[b]++;
    if (nch > 1) {
      CHECK(wb >= 0 && wb + nch <= plan.ws_slots, "row %d: slots [%d, %d) outside %lld", r, wb, wb + nch,
            (long long)plan.ws_slots);
      CHECK(si >= 0 && si < plan.nsplit, "row %d: counter %d outside %lld", r, si, (long long)plan.nsplit);
      if (wb >= 0 && wb + j < plan.ws_slots) slot_used[wb + j]++;
      if (j == 0 && si >= 0 && si < plan.nsplit) sem_used[si]++;
    } else {
      CHECK(wb == -1 && si == -1, "unsplit row %d has slot %d counter %d", r, wb, si);
    }
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t cnt = rs[r + 1] - rs[r];
    CHECK(row_items[r] == chunk_count(cnt, plan.c, plan.allow_split), "row %lld: %d items", (long long)r, row_items[r]);
  }
  for (int32_t b = rs[0]; b < rs[nrows]; ++b) CHECK(covered[b] == 1, "block %d covered %d times", b, covered[b]);
  for (int64_t i = 0; i < plan.ws_slots; ++i) CHECK(slot_used[i] <= 1, "slot %lld used %d times", (long long)i, slot_used[i]);
  for (int64_t i = 0; i < plan.nsplit; ++i) CHECK(sem_used[i] <= 1, "counter %lld used %d times", (long long)i, sem_used[i]);
  (void)mtiles;
}

// CSC build replayed (csc_rank / csc_offsets / csc_scatter) and checked against the CPU's
// construction (bsr_linear_cpu.cpp: blocks of every column in block order).
struct Csc {
  std::vector<int32_t> ccol, perm, rowid;
};
static Csc build_csc(const Bsr& w) {
  const int64_t nbc = w.k / w.bw, nbr = w.n / w.bh, nnz = w.nnz;
  const int64_t seg = csc_segment(nnz), nseg = (nnz + seg - 1) / seg;
  std::vector<int32_t> lrank(nnz, -9), segc(nseg * nbc, 0);
  for (int64_t s = 0; s < nseg; ++s) {
    std::vector<int32_t> cnt(nbc, 0);
    const int64_t b_begin = s * seg, b_end = std::min(nnz, b_begin + seg);
    for (int64_t base = b_begin; base < b_end; base += 32) {
      int key[32], base_cnt[32];
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t b = base + lane;
        key[lane] = -1;
        if (b < b_end && w.col[b] >= 0 && w.col[b] < nbc) key[lane] = static_cast<int>(w.col[b]);
      }
      unsigned same[32];
      for (int lane = 0; lane < 32; ++lane) {
        same[lane] = 0;
        for (int o = 0; o < 32; ++o) same[lane] |= unsigned(key[o] == key[lane]) << o;  // __match_any_sync
        base_cnt[lane] = key[lane] >= 0 ? cnt[key[lane]] : 0;                         // all read, then
      }
      for (int lane = 0; lane < 32; ++lane) {                                          // leaders write
        const int leader = __builtin_ctz(same[lane]);
        if (key[lane] >= 0 && lane == leader) cnt[key[lane]] = base_cnt[lane] + __builtin_popcount(same[lane]);
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t b = base + lane;
        const int before = __builtin_popcount(same[lane] & ((1u << lane) - 1u));
        if (b < b_end) lrank[b] = key[lane] >= 0 ? base_cnt[lane] + before : -1;
      }
    }
    for (int64_t c = 0; c < nbc; ++c) segc[s * nbc + c] = cnt[c];
  }
  Csc out;
  out.ccol.assign(nbc + 1, 0);
  int carry = 0;
  for (int64_t c = 0; c < nbc; ++c) {
    int run = 0;
    for (int64_t s = 0; s < nseg; ++s) {
      const int v = segc[s * nbc + c];
      segc[s * nbc + c] = run;
      run += v;
    }
    out.ccol[c] = carry;
    carry += run;
  }
  out.ccol[nbc] = carry;
  out.perm.assign(nnz, -1);
  out.rowid.assign(nnz, -1);
  std::vector<int> filled(nnz, 0);
  for (int64_t b = 0; b < nnz; ++b) {
    const int r = lrank[b];
    if (r < 0) continue;
    const int64_t c = w.col[b];
    const int64_t pos = out.ccol[c] + segc[(b / seg) * nbc + c] + r;
    CHECK(pos >= 0 && pos < carry, "csc position %lld of block %lld outside [0, %d)", (long long)pos, (long long)b, carry);
    if (pos < 0 || pos >= carry) continue;
    filled[pos]++;
    out.perm[pos] = static_cast<int32_t>(b);
    out.rowid[pos] = static_cast<int32_t>(row_of(w.crow.data(), nbr, nnz, b));
  }
  for (int i = 0; i < carry; ++i) CHECK(filled[i] == 1, "csc slot %d filled %d times", i, filled[i]);
  // the CPU front end's CSC (valid columns only)
  std::vector<int64_t> rc(nbc + 1, 0), rows(nnz);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t b = w.crow[r]; b < w.crow[r + 1]; ++b) rows[b] = r;
  for (int64_t b = 0; b < nnz; ++b)
    if (col_ok(w, b)) rc[w.col[b] + 1]++;
  for (int64_t c = 0; c < nbc; ++c) rc[c + 1] += rc[c];
  std::vector<int64_t> fill(rc.begin(), rc.end() - 1), cblk(rc[nbc]);
  for (int64_t b = 0; b < nnz; ++b)
    if (col_ok(w, b)) cblk[fill[w.col[b]]++] = b;
  for (int64_t c = 0; c <= nbc; ++c) CHECK(out.ccol[c] == rc[c], "ccol[%lld] = %d, CPU %lld", (long long)c, out.ccol[c], (long long)rc[c]);
  for (int64_t p = 0; p < rc[nbc]; ++p) {
    CHECK(out.perm[p] == cblk[p], "perm[%lld] = %d, CPU %lld", (long long)p, out.perm[p], (long long)cblk[p]);
    CHECK(out.rowid[p] == rows[cblk[p]], "rowid[%lld] = %d, CPU %lld", (long long)p, out.rowid[p], (long long)rows[cblk[p]]);
  }
  return out;
}

// ------------------------------------------------------------------ warp-level emulation
using Regs4 = uint32_t[32][4];

// ldmatrix.x4 (.trans): lane l gives the address (elements) of row l % 8 of matrix l / 8;
// register q of lane (g, t) gets row g, columns 2t, 2t+1 of matrix q (trans: rows 2t, 2t+1
// of column g), the lower column / row in the low half.
static void ldmatrix_x4(const std::vector<uint16_t>& sm, int64_t tile_begin, int64_t tile_end, const int (&addr)[32],
                        bool trans, uint32_t (&out)[32][4]) {
  for (int q = 0; q < 4; ++q) {
    int groups = 0;
    for (int i = 0; i < 8; ++i) {
      const int a = addr[8 * q + i];
      CHECK(a % 8 == 0 && a >= tile_begin && a + 8 <= tile_end, "ldmatrix row address %d outside [%lld, %lld) or unaligned",
            a, (long long)tile_begin, (long long)tile_end);
      groups |= 1 << ((a * 2 / 16) % 8);
    }
    CHECK(groups == 0xff, "ldmatrix phase %d: bank groups 0x%02x (conflict)", q, groups);
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, t = lane & 3;
      uint16_t lo, hi;
      if (!trans) {
        lo = sm[addr[8 * q + g] + 2 * t];
        hi = sm[addr[8 * q + g] + 2 * t + 1];
      } else {
        lo = sm[addr[8 * q + 2 * t] + g];
        hi = sm[addr[8 * q + 2 * t + 1] + g];
      }
      out[lane][q] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

// mma.m16n8k16.row.col: A regs a0..a3 = (g, 2t..) (g+8, 2t..) (g, 2t+8..) (g+8, 2t+8..);
// B regs b0, b1 = (k 2t.., n g) (k 2t+8.., n g); C c0..c3 = (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1).
static void mma(float (&c)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  float A[16][16], B[16][8];
  auto lo = [](uint32_t v) { return h2f(uint16_t(v & 0xffff)); };
  auto hi = [](uint32_t v) { return h2f(uint16_t(v >> 16)); };
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    A[g][2 * t] = lo(a[lane][0]);
    A[g][2 * t + 1] = hi(a[lane][0]);
    A[g + 8][2 * t] = lo(a[lane][1]);
    A[g + 8][2 * t + 1] = hi(a[lane][1]);
    A[g][2 * t + 8] = lo(a[lane][2]);
    A[g][2 * t + 9] = hi(a[lane][2]);
    A[g + 8][2 * t + 8] = lo(a[lane][3]);
    A[g + 8][2 * t + 9] = hi(a[lane][3]);
    B[2 * t][g] = lo(b[lane][0]);
    B[2 * t + 1][g] = hi(b[lane][0]);
    B[2 * t + 8][g] = lo(b[lane][1]);
    B[2 * t + 9][g] = hi(b[lane][1]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][n];
      c[lane][i] += s;
    }
  }
}

// ------------------------------------------------------------------ kernel replay
struct int2v {
  int32_t x, y;
};

struct Launch {
  Mode mode;
  const std::vector<uint16_t>* a;  // x (forward) / grad_y
  const std::vector<uint16_t>* b;  // values / x (grad_values)
  const std::vector<uint16_t>* bias;
  const Bsr* w;
  const Sched* sched;  // list modes
  const Csc* csc;      // grad_input
  int64_t m, n, k;
  int64_t mtiles = 0, ws_slots = 0, nsplit = 0, work_bound = 0;
  int group = kGroupTiles;
  int splits = 1;
  int64_t tok = 0;
};

struct Outputs {
  std::vector<float> out;
  std::vector<int> writes;
  std::vector<float> ws;
  std::vector<int> sems;
};

template <class Tl>
static void replay_cta(const Launch& L, int64_t cta, Outputs& o) {
  constexpr Mode MODE = Tl::kMode;
  constexpr bool kList = MODE != Mode::kGradValues;
  constexpr int kST = Tl::STAGES;
  const Bsr& w = *L.w;
  const int bh = static_cast<int>(w.bh), bw = static_cast<int>(w.bw);
  const int64_t bsz = w.bh * w.bw;
  const std::vector<uint16_t>& ga = *L.a;
  const std::vector<uint16_t>& gb = *L.b;

  int64_t m0 = 0, lrow = 0, lcol = 0, blk = 0, e_begin = 0, e_end = 0, t_begin = 0, t_end = 0, slot0 = 0;
  int chunk_j = 0, nch = 1;
  int64_t sem = -1;
  if constexpr (kList) {
    const int64_t nwork = L.sched->nwork;
    if (cta >= L.mtiles * nwork) return;
    int64_t mt, wi;
    raster(cta, nwork, L.mtiles, L.group, mt, wi);
    CHECK(wi >= 0 && wi < nwork && mt >= 0 && mt < L.mtiles, "raster %lld -> (%lld, %lld)", (long long)cta,
          (long long)mt, (long long)wi);
    const int32_t* it = &L.sched->work[wi * kWorkInts];
    lrow = it[0];
    e_begin = it[1];
    e_end = it[2];
    chunk_j = it[3];
    nch = it[4];
    m0 = mt * Tl::BM;
    if (nch > 1) {
      slot0 = mt * L.ws_slots + it[5];
      sem = mt * L.nsplit + it[6];
    }
  } else {
    blk = cta / L.splits;
    chunk_j = static_cast<int>(cta % L.splits);
    nch = L.splits;
    const int64_t nbr = w.n / w.bh, nbc = w.k / w.bw;
    int64_t lo = 0, hi = nbr - 1;  // the warp's 32-way search
    while (lo < hi) {
      const int64_t step = search_step(lo, hi);
      unsigned mask = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t idx = lo + lane * step;
        const bool ok = idx <= hi && std::max<int64_t>(std::min<int64_t>(w.crow[idx], w.nnz), 0) <= blk;
        mask |= unsigned(ok) << lane;
      }
      search_update(lo, hi, step, mask);
    }
    CHECK(lo == row_of(w.crow.data(), nbr, w.nnz, blk), "warp row search %lld != row_of %lld (block %lld)",
          (long long)lo, (long long)row_of(w.crow.data(), nbr, w.nnz, blk), (long long)blk);
    lrow = lo;
    const int64_t c = w.col[blk];
    lcol = (c >= 0 && c < nbc) ? c : -1;
    t_begin = chunk_j * L.tok;
    t_end = std::min(L.m, t_begin + L.tok);
    if (lcol < 0) t_end = t_begin;
    if (nch > 1) {
      slot0 = blk * L.splits;
      sem = blk;
    }
  }

  if (nch > 1) (kList ? cov_split_ctas : cov_gv_split)++;
  if (kList && e_end - e_begin > kListCap) cov_multi_pass++;
  if (kList && e_end == e_begin) cov_empty_items++;
  if (kList && m0 + Tl::BM > L.m) cov_partial_tiles++;
  if (Tl::WK > 1) cov_kwarp++;
  static float acc[4][32][Tl::MT][Tl::NT][4];
  std::memset(acc, 0, sizeof(acc));
  std::vector<uint16_t> sm(Tl::SMEM_BYTES / 2, 0xBEEF);  // poisoned shared memory
  std::vector<int2v> s_list(kListCap + kListPad, int2v{-5, -5});
  const int rw = MODE == Mode::kForward ? bw : bh;
  const int nseg = kBK / rw;
  const int64_t lda = MODE == Mode::kForward ? L.k : L.n;
  constexpr int kStageElems = Tl::STAGE_ELEMS;

  using MapA = LoadMap<Tl::A_ROWS, Tl::A_W>;
  using MapB = LoadMap<Tl::B_ROWS, Tl::B_W>;
  std::vector<int> written(kStageElems / 8);
  // cp.async of one 16-byte chunk: 8 elements from src (elements of `from`) or zeros
  auto cp_async = [&](int64_t dst, const std::vector<uint16_t>& from, int64_t src, bool ok, int64_t stage_base) {
    CHECK(dst % 8 == 0 && dst >= stage_base && dst + 8 <= stage_base + kStageElems, "cp.async dst %lld outside stage",
          (long long)dst);
    CHECK(dst + 8 <= static_cast<int64_t>(sm.size()), "cp.async dst %lld beyond the shared-memory size %d B",
          (long long)dst, Tl::SMEM_BYTES);
    if (dst < stage_base || dst + 8 > stage_base + kStageElems || dst + 8 > static_cast<int64_t>(sm.size())) return;
    written[(dst - stage_base) / 8]++;
    if (ok) {
      CHECK(src >= 0 && src + 8 <= static_cast<int64_t>(from.size()) && src % 8 == 0,
            "cp.async src %lld outside the operand (%zu) or unaligned", (long long)src, from.size());
      if (src < 0 || src + 8 > static_cast<int64_t>(from.size())) return;
    }
    for (int e = 0; e < 8; ++e) sm[dst + e] = ok ? from[src + e] : 0;
  };

  // per-thread loader state, as the kernel sets it up
  auto la_of = [&](int tid) { return list_a_load<MapA>(tid, m0, L.m, lda, rw); };
  auto lb_of = [&](int tid) { return fwd_b_load<MapB>(tid, bw, rw); };
  auto ta_of = [&](int tid) { return gv_load<MapA>(tid, t_begin, L.n, lrow, bh); };
  auto tb_of = [&](int tid) { return gv_load<MapB>(tid, t_begin, L.k, lcol, bw); };
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int i = 0; i < MapA::L; ++i)
      CHECK(MapA::dst(tid, i) == swz_off<Tl::A_W>(MapA::row(tid, i), MapA::ch(tid)), "A load destination");
    for (int i = 0; i < MapB::L; ++i)
      CHECK(MapB::dst(tid, i) == swz_off<Tl::B_W>(MapB::row(tid, i), MapB::ch(tid)), "B load destination");
  }
  auto load_stage = [&](int slot, int st, int len) {
    const int64_t sa = int64_t(slot) * kStageElems, sb = sa + Tl::A_ELEMS;
    std::fill(written.begin(), written.end(), 0);
    for (int tid = 0; tid < kThreads; ++tid) {
      const int64_t a_dst0 = MapA::dst(tid, 0), b_dst0 = MapB::dst(tid, 0);
      if constexpr (kList) {
        {
          const ALoad la = la_of(tid);
          const int ent = list_entry(st, nseg, la.seg);
          CHECK(ent >= 0 && ent < list_padded(len), "list entry %d outside the padded list (%d)", ent, list_padded(len));
          const int key = s_list[ent].x;
          int64_t src = la.off0 + int64_t(key) * rw;
          for (int i = 0; i < MapA::L; ++i) {
            const bool ok = key >= 0 && i < la.nvalid;
            cp_async(sa + a_dst0 + i * MapA::DSTEP, ga, src, ok, sa);
            // semantic check: the chunk holds A[m0 + row][s_list key * rw + kk] and exists iff m0 + row < m
            const int row = MapA::row(tid, i);
            CHECK((i < la.nvalid) == (m0 + row < L.m), "A row validity");
            if (ok) {
              const SegK sk = seg_of(MapA::ch(tid) * 8, rw);
              CHECK(src == (m0 + row) * lda + int64_t(key) * rw + sk.kk, "A source mismatch");
            }
            src += la.step;
          }
        }
        if constexpr (MODE == Mode::kForward) {
          const BLoad lb = lb_of(tid);
          const int2v kb = s_list[list_entry(st, nseg, lb.seg)];
          const int64_t src = int64_t(kb.y) * bsz + lb.off0;
          for (int i = 0; i < MapB::L; ++i) cp_async(sb + b_dst0 + i * MapB::DSTEP, gb, src + i * lb.step, kb.x >= 0, sa);
        } else {
          for (int i = 0; i < MapB::L; ++i) {
            const SegK sk = seg_of(MapB::row(tid, i), rw);
            const int gseg = sk.seg, goff = static_cast<int>(gi_b_src(0, bsz, sk.kk, bw, MapB::ch(tid)));
            const int2v kb = s_list[list_entry(st, nseg, gseg)];
            cp_async(sb + b_dst0 + i * MapB::DSTEP, gb, int64_t(kb.y) * bsz + goff, kb.x >= 0, sa);
          }
        }
      } else {
        const int64_t t0 = t_begin + int64_t(st) * kBK;
        {
          const TLoad ta = ta_of(tid);
          const int64_t left = t_end - t0 - ta.row0;
          int64_t src = ta.off0 + st * ta.stage;
          for (int i = 0; i < MapA::L; ++i) {
            const bool ok = i * MapA::RSTEP < left;
            CHECK(ok == (t0 + MapA::row(tid, i) < t_end), "grad_values A token validity");
            cp_async(sa + a_dst0 + i * MapA::DSTEP, ga, src, ok, sa);
            src += ta.step;
          }
        }
        {
          const TLoad tb = tb_of(tid);
          const int64_t left = t_end - t0 - tb.row0;
          int64_t src = tb.off0 + st * tb.stage;
          for (int i = 0; i < MapB::L; ++i) {
            const bool ok = i * MapB::RSTEP < left;
            cp_async(sb + b_dst0 + i * MapB::DSTEP, gb, src, ok, sa);
            src += tb.step;
          }
        }
      }
    }
    for (size_t c = 0; c < written.size(); ++c)
      CHECK(written[c] == 1, "stage chunk %zu written %d times", c, written[c]);
  };

  auto compute_stage = [&](int slot) {
    const int64_t sa = int64_t(slot) * kStageElems, sb = sa + Tl::A_ELEMS;
    for (int warp = 0; warp < kThreads / 32; ++warp) {
      const WarpRole role = warp_role<Tl>(warp);
      const int a_row0 = role.wm * Tl::WM, b_row0 = role.wn * Tl::WN;
      for (int q = 0; q < 4 / Tl::WK; ++q) {
        const int kk = Tl::WK == 1 ? q : q * Tl::WK + role.wk;
        uint32_t af[Tl::MT][32][4];
        uint32_t bf[Tl::NT][32][2];
        for (int t = 0; t < Tl::MT; ++t) {
          int addr[32];
          for (int lane = 0; lane < 32; ++lane) {
            const LaneRC la = Tl::kAKMajor ? lane_a_kmajor(lane) : lane_a_mnmajor(lane);
            const int off = Tl::kAKMajor ? kmajor_base<Tl::A_W>(a_row0, la, kk) + kmajor_delta<Tl::A_W>(t)
                                         : mnmajor_base<Tl::A_W>(a_row0, la, t) + mnmajor_delta<Tl::A_W>(kk);
            addr[lane] = static_cast<int>(sa) + off;
            // the address is the swizzled place of the logical (row, chunk) this lane names
            const int row = Tl::kAKMajor ? a_row0 + 16 * t + la.lr : 16 * kk + la.lr;
            const int ch = Tl::kAKMajor ? 2 * kk + la.hi : (a_row0 + 16 * t) / 8 + la.hi;
            CHECK(off == swz_off<Tl::A_W>(row, ch), "A ldmatrix base+delta != swizzle");
          }
          ldmatrix_x4(sm, sa, sa + Tl::A_ELEMS, addr, !Tl::kAKMajor, af[t]);
        }
        for (int t = 0; t < Tl::NT / 2; ++t) {
          int addr[32];
          for (int lane = 0; lane < 32; ++lane) {
            const LaneRC lb = Tl::kBKMajor ? lane_b_kmajor(lane) : lane_b_mnmajor(lane);
            const int off = Tl::kBKMajor ? kmajor_base<Tl::B_W>(b_row0, lb, kk) + kmajor_delta<Tl::B_W>(t)
                                         : mnmajor_base<Tl::B_W>(b_row0, lb, t) + mnmajor_delta<Tl::B_W>(kk);
            addr[lane] = static_cast<int>(sb) + off;
            const int row = Tl::kBKMajor ? b_row0 + 16 * t + lb.lr : 16 * kk + lb.lr;
            const int ch = Tl::kBKMajor ? 2 * kk + lb.hi : (b_row0 + 16 * t) / 8 + lb.hi;
            CHECK(off == swz_off<Tl::B_W>(row, ch), "B ldmatrix base+delta != swizzle");
          }
          uint32_t r[32][4];
          ldmatrix_x4(sm, sb, sb + Tl::B_ELEMS, addr, !Tl::kBKMajor, r);
          for (int lane = 0; lane < 32; ++lane) {
            bf[2 * t][lane][0] = r[lane][0];
            bf[2 * t][lane][1] = r[lane][1];
            bf[2 * t + 1][lane][0] = r[lane][2];
            bf[2 * t + 1][lane][1] = r[lane][3];
          }
        }
        for (int a = 0; a < Tl::MT; ++a)
          for (int b = 0; b < Tl::NT; ++b) {
            float c[32][4];
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) c[lane][i] = acc[warp][lane][a][b][i];
            mma(c, af[a], bf[b]);
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) acc[warp][lane][a][b][i] = c[lane][i];
          }
      }
    }
  };

  auto run_pipeline = [&](int nst, int len) {
    for (int s = 0; s < kST - 1; ++s)
      if (s < nst) load_stage(s, s, len);
    int rd = 0, wr = kST - 1;
    for (int it = 0; it < nst; ++it) {
      // the slot refilled now holds stage it - 1 (computed in the previous iteration)
      CHECK(rd == it % kST && wr == (it + kST - 1) % kST && wr != rd, "pipeline slots");
      if (it + kST - 1 < nst) load_stage(wr, it + kST - 1, len);
      compute_stage(rd);
      rd = rd + 1 == kST ? 0 : rd + 1;
      wr = wr + 1 == kST ? 0 : wr + 1;
    }
  };

  if constexpr (kList) {
    for (int64_t pb = e_begin; pb < e_end; pb += kListCap) {
      const int len = static_cast<int>(std::min<int64_t>(e_end - pb, kListCap));
      CHECK(list_padded(len) <= kListCap + kListPad && list_padded(len) >= len + (len % kListPad ? 1 : 0),
            "padded list length");
      for (int e = 0; e < list_padded(len); ++e) {
        int2v kb{-1, 0};
        if (e < len) {
          if constexpr (MODE == Mode::kForward) {
            const int64_t c = w.col[pb + e];
            kb.x = (c >= 0 && c < L.k / bw) ? static_cast<int32_t>(c) : -1;
            if (kb.x < 0) cov_skipped_blocks++;
            kb.y = static_cast<int32_t>(pb + e);
          } else {
            kb.x = L.csc->rowid[pb + e];
            kb.y = L.csc->perm[pb + e];
          }
        }
        s_list[e] = kb;
      }
      const int nst = (len + nseg - 1) / nseg;
      CHECK(list_entry(nst - 1, nseg, nseg - 1) < list_padded(len), "last stage reads beyond the padded list");
      run_pipeline(nst, len);
    }
  } else {
    run_pipeline(static_cast<int>((t_end - t_begin + kBK - 1) / kBK), 0);
  }

  // k-warp reduction through shared memory (fixed order)
  if constexpr (Tl::WK > 1) {
    std::vector<float> red(Tl::SMEM_BYTES / 4, NAN);
    for (int warp = 0; warp < 4; ++warp) {
      const WarpRole role = warp_role<Tl>(warp);
      if (role.wk == 0) continue;
      const int64_t base = int64_t((role.wk - 1) * Tl::WARPS_MN + role.wmn) * (32 * Tl::ACC);
      for (int lane = 0; lane < 32; ++lane)
        for (int a = 0; a < Tl::MT; ++a)
          for (int b = 0; b < Tl::NT; ++b)
            for (int i = 0; i < 4; ++i) {
              const int64_t idx = base + ((a * Tl::NT + b) * 4 + i) * 32 + lane;
              CHECK(idx < static_cast<int64_t>(red.size()), "k-warp buffer index outside shared memory");
              if (idx < static_cast<int64_t>(red.size())) red[idx] = acc[warp][lane][a][b][i];
            }
    }
    for (int warp = 0; warp < 4; ++warp) {
      const WarpRole role = warp_role<Tl>(warp);
      if (role.wk != 0) continue;
      for (int wk = 1; wk < Tl::WK; ++wk) {
        const int64_t base = int64_t((wk - 1) * Tl::WARPS_MN + role.wmn) * (32 * Tl::ACC);
        for (int lane = 0; lane < 32; ++lane)
          for (int a = 0; a < Tl::MT; ++a)
            for (int b = 0; b < Tl::NT; ++b)
              for (int i = 0; i < 4; ++i) {
                const int64_t idx = base + ((a * Tl::NT + b) * 4 + i) * 32 + lane;
                if (idx < static_cast<int64_t>(red.size())) acc[warp][lane][a][b][i] += red[idx];
              }
      }
    }
  }

  // split chunks: partials and the last arriver
  if (nch > 1) {
    CHECK(sem >= 0 && sem < static_cast<int64_t>(o.sems.size()), "arrival counter %lld outside %zu", (long long)sem,
          o.sems.size());
    for (int warp = 0; warp < 4; ++warp) {
      const WarpRole role = warp_role<Tl>(warp);
      if (role.wk != 0) continue;
      for (int lane = 0; lane < 32; ++lane)
        for (int a = 0; a < Tl::MT; ++a)
          for (int b = 0; b < Tl::NT; ++b) {
            const int64_t f4 = ws_f4(slot0 + chunk_j, Tl::BM * Tl::BN, a * Tl::NT + b, role.wmn, Tl::WARPS_MN, lane);
            CHECK(f4 >= 0 && 4 * f4 + 4 <= static_cast<int64_t>(o.ws.size()), "workspace float4 %lld outside %zu",
                  (long long)f4, o.ws.size());
            if (f4 < 0 || 4 * f4 + 4 > static_cast<int64_t>(o.ws.size())) continue;
            for (int i = 0; i < 4; ++i) o.ws[4 * f4 + i] = acc[warp][lane][a][b][i];
          }
    }
    if (sem < 0 || sem >= static_cast<int64_t>(o.sems.size())) return;
    const bool last = o.sems[sem]++ == nch - 1;
    if (!last) return;
    cov_last_arrivals++;
    for (int warp = 0; warp < 4; ++warp) {
      const WarpRole role = warp_role<Tl>(warp);
      if (role.wk != 0) continue;
      for (int lane = 0; lane < 32; ++lane)
        for (int a = 0; a < Tl::MT; ++a)
          for (int b = 0; b < Tl::NT; ++b) {
            float s[4] = {0, 0, 0, 0};
            for (int j = 0; j < nch; ++j) {
              const int64_t f4 = ws_f4(slot0 + j, Tl::BM * Tl::BN, a * Tl::NT + b, role.wmn, Tl::WARPS_MN, lane);
              if (f4 < 0 || 4 * f4 + 4 > static_cast<int64_t>(o.ws.size())) continue;
              for (int i = 0; i < 4; ++i) s[i] += o.ws[4 * f4 + i];
            }
            for (int i = 0; i < 4; ++i) acc[warp][lane][a][b][i] = s[i];
          }
    }
  }

  // epilogue
  for (int warp = 0; warp < 4; ++warp) {
    const WarpRole role = warp_role<Tl>(warp);
    if (role.wk != 0) continue;
    const int a_row0 = role.wm * Tl::WM, b_row0 = role.wn * Tl::WN;
    for (int lane = 0; lane < 32; ++lane)
      for (int a = 0; a < Tl::MT; ++a)
        for (int b = 0; b < Tl::NT; ++b)
          for (int h = 0; h < 2; ++h) {
            const int row = a_row0 + 16 * a + acc_row(lane, 2 * h);
            const int col = b_row0 + 8 * b + acc_col(lane, 2 * h);
            CHECK(acc_row(lane, 2 * h + 1) == acc_row(lane, 2 * h) && acc_col(lane, 2 * h + 1) == acc_col(lane, 2 * h) + 1,
                  "accumulator pair not adjacent");
            float v0 = acc[warp][lane][a][b][2 * h], v1 = acc[warp][lane][a][b][2 * h + 1];
            if (MODE != Mode::kGradValues && m0 + row >= L.m) continue;
            if (MODE == Mode::kForward && L.bias) {
              const int64_t n = lrow * bh + col;
              v0 += h2f((*L.bias)[n]);
              v1 += h2f((*L.bias)[n + 1]);
            }
            const int64_t off = out_off(MODE, m0, row, col, lrow, blk, L.n, L.k, bh, bw);
            CHECK(off % 2 == 0 && off >= 0 && off + 2 <= static_cast<int64_t>(o.out.size()), "output %lld outside %zu",
                  (long long)off, o.out.size());
            if (off < 0 || off + 2 > static_cast<int64_t>(o.out.size())) continue;
            o.out[off] = v0;
            o.out[off + 1] = v1;
            o.writes[off]++;
            o.writes[off + 1]++;
          }
  }
}

template <class Tl>
static void run_grid(const Launch& L, int64_t grid, Outputs& o, std::mt19937& rng) {
  std::vector<int64_t> order(grid);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  for (int64_t cta : order) replay_cta<Tl>(L, cta, o);
}

static void compare(const char* what, const std::vector<double>& ref, const Outputs& o) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (o.writes[i] != 1 || double(o.out[i]) != ref[i]) {
      if (bad < 5)
        CHECK(false, "%s: element %zu = %g (written %d times), reference %g", what, i, double(o.out[i]), o.writes[i],
              ref[i]);
      ++bad;
    }
  }
  if (bad > 5) CHECK(false, "%s: %d mismatching elements in all", what, bad);
}

// ------------------------------------------------------------------ one op replayed
struct Case {
  int64_t bh, bw, nbr, nbc, m;
  double density;
  int64_t concurrent;
  bool bad_cols = false, empty = false, bias = true;
};

template <int BH, int BW>
static void run_case(const Case& cs, std::mt19937& rng) {
  const Bsr w = make_bsr(rng, cs.nbr, cs.nbc, BH, BW, cs.density, cs.bad_cols, cs.empty);
  const int64_t m = cs.m, n = w.n, k = w.k;
  const std::vector<uint16_t> x = rand_mat(rng, m, k), gy = rand_mat(rng, m, n), bias = rand_mat(rng, 1, n);
  const int64_t mtiles = (m + kTokTile - 1) / kTokTile;

  {  // forward
    using Tl = TileCfg<Mode::kForward, kTokTile, BH>;
    const RowPlan plan = plan_rows(cs.nbr, cs.nbc, w.nnz, mtiles, kBK / BW, cs.concurrent);
    const std::vector<int32_t> rs = sanitize(w.crow, w.nnz);
    const Sched s = schedule(rs, cs.nbr, plan, rng);
    check_schedule(s, rs, cs.nbr, plan, mtiles);
    Launch L{Mode::kForward, &x, &w.values, cs.bias ? &bias : nullptr, &w, &s, nullptr, m, n, k};
    L.mtiles = mtiles;
    L.ws_slots = plan.ws_slots;
    L.nsplit = plan.nsplit;
    L.work_bound = plan.work_bound;
    Outputs o;
    o.out.assign(m * n, NAN);
    o.writes.assign(m * n, 0);
    o.ws.assign(mtiles * plan.ws_slots * Tl::BM * Tl::BN, NAN);
    o.sems.assign(mtiles * plan.nsplit, 0);
    run_grid<Tl>(L, mtiles * plan.work_bound, o, rng);
    compare("forward", ref_forward(w, x, m, cs.bias ? &bias : nullptr), o);
  }
  if (w.nnz > 0) {  // grad_input (the front end returns zeros for nnz == 0)
    using Tl = TileCfg<Mode::kGradInput, kTokTile, BW>;
    const Csc csc = build_csc(w);
    const RowPlan plan = plan_rows(cs.nbc, cs.nbr, w.nnz, mtiles, kBK / BH, cs.concurrent);
    const Sched s = schedule(csc.ccol, cs.nbc, plan, rng);
    check_schedule(s, csc.ccol, cs.nbc, plan, mtiles);
    Launch L{Mode::kGradInput, &gy, &w.values, nullptr, &w, &s, &csc, m, n, k};
    L.mtiles = mtiles;
    L.ws_slots = plan.ws_slots;
    L.nsplit = plan.nsplit;
    L.work_bound = plan.work_bound;
    Outputs o;
    o.out.assign(m * k, NAN);
    o.writes.assign(m * k, 0);
    o.ws.assign(mtiles * plan.ws_slots * Tl::BM * Tl::BN, NAN);
    o.sems.assign(mtiles * plan.nsplit, 0);
    run_grid<Tl>(L, mtiles * plan.work_bound, o, rng);
    compare("grad_input", ref_grad_input(w, gy, m), o);
  }
  if (w.nnz > 0) {  // grad_values
    using Tl = TileCfg<Mode::kGradValues, BH, BW>;
    const GvPlan g = plan_gv(m, w.nnz, cs.concurrent);
    CHECK(g.tok % kBK == 0 && int64_t(g.splits) * g.tok >= m && int64_t(g.splits - 1) * g.tok < m,
          "gv split %d x %lld does not tile M = %lld", g.splits, (long long)g.tok, (long long)m);
    Launch L{Mode::kGradValues, &gy, &x, nullptr, &w, nullptr, nullptr, m, n, k};
    L.splits = g.splits;
    L.tok = g.tok;
    Outputs o;
    o.out.assign(w.nnz * BH * BW, NAN);
    o.writes.assign(w.nnz * BH * BW, 0);
    o.ws.assign(g.splits > 1 ? w.nnz * g.splits * BH * BW : 0, NAN);
    o.sems.assign(g.splits > 1 ? w.nnz : 0, 0);
    run_grid<Tl>(L, w.nnz * g.splits, o, rng);
    compare("grad_values", ref_grad_values(w, gy, x, m), o);
  }
}

// Garbage crow (not monotone, out of range): the schedule and the row search stay in bounds.
static void garbage_crow(std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> any(-20, 60);
  for (int rep = 0; rep < 200; ++rep) {
    const int64_t nbr = 1 + rep % 37, nnz = 1 + rep % 50;
    std::vector<int64_t> crow(nbr + 1);
    for (auto& v : crow) v = any(rng);
    const std::vector<int32_t> rs = sanitize(crow, nnz);
    int64_t sum = 0;
    for (int64_t r = 0; r < nbr; ++r) {
      CHECK(rs[r] <= rs[r + 1] && rs[r] >= 0 && rs[r + 1] <= nnz, "sanitized rows not monotone in [0, nnz]");
      sum += rs[r + 1] - rs[r];
    }
    CHECK(sum <= nnz, "sanitized rows hold %lld > nnz blocks", (long long)sum);
    const RowPlan plan = plan_rows(nbr, 4, nnz, 3, 1, 1000);
    const Sched s = schedule(rs, nbr, plan, rng);
    check_schedule(s, rs, nbr, plan, 3);
    for (int64_t b = 0; b < nnz; ++b) {
      int64_t lo = 0, hi = nbr - 1;
      while (lo < hi) {
        const int64_t step = search_step(lo, hi);
        unsigned mask = 0;
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t idx = lo + lane * step;
          mask |= unsigned(idx <= hi && std::max<int64_t>(std::min<int64_t>(crow[idx], nnz), 0) <= b) << lane;
        }
        search_update(lo, hi, step, mask);
      }
      CHECK(lo >= 0 && lo < nbr, "row search left [0, nbr)");
      const int64_t r = row_of(crow.data(), nbr, nnz, b);
      CHECK(r >= 0 && r < nbr, "row_of left [0, nbr)");
    }
  }
}

// The warp's 32-way row search equals row_of (and the true row) for non-decreasing crow
// with many rows, empty rows included.
static void row_search(std::mt19937& rng) {
  for (int64_t nbr : {1, 2, 31, 32, 33, 100, 1023, 1024, 1025, 5000, 40000}) {
    std::vector<int64_t> crow(nbr + 1, 0);
    std::uniform_int_distribution<int> cnt(0, 3);
    for (int64_t r = 0; r < nbr; ++r) crow[r + 1] = crow[r] + (r % 7 == 3 ? 0 : cnt(rng));
    const int64_t nnz = crow[nbr];
    std::vector<int64_t> truth(nnz);
    for (int64_t r = 0; r < nbr; ++r)
      for (int64_t b = crow[r]; b < crow[r + 1]; ++b) truth[b] = r;
    for (int64_t b = 0; b < nnz; b += 1 + b / 97) {
      int64_t lo = 0, hi = nbr - 1;
      int rounds = 0;
      while (lo < hi) {
        const int64_t step = search_step(lo, hi);
        unsigned mask = 0;
        for (int lane = 0; lane < 32; ++lane) {
          const int64_t idx = lo + lane * step;
          mask |= unsigned(idx <= hi && std::max<int64_t>(std::min<int64_t>(crow[idx], nnz), 0) <= b) << lane;
        }
        search_update(lo, hi, step, mask);
        ++rounds;
      }
      CHECK(lo == truth[b] && row_of(crow.data(), nbr, nnz, b) == truth[b],
            "row of block %lld: warp search %lld, row_of %lld, truth %lld (nbr %lld)", (long long)b, (long long)lo,
            (long long)row_of(crow.data(), nbr, nnz, b), (long long)truth[b], (long long)nbr);
      CHECK(rounds <= 4, "warp search took %d rounds for %lld rows", rounds, (long long)nbr);
    }
  }
}

// The swizzle is a bijection of each tile's chunks and the address helpers agree with it.
template <int ROWS, int W>
static void check_swizzle() {
  std::vector<int> hit(ROWS * W / 8, 0);
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < W / 8; ++c) {
      const int o = swz_off<W>(r, c);
      CHECK(o % 8 == 0 && o >= 0 && o < ROWS * W, "swizzle out of the tile");
      if (o >= 0 && o < ROWS * W) hit[o / 8]++;
    }
  for (int h : hit) CHECK(h == 1, "swizzle not a bijection");
  // cp.async: each warp-wide store of 32 chunks spreads over the bank groups evenly
  using Map = LoadMap<ROWS, W>;
  for (int i = 0; i < Map::L; ++i)
    for (int w0 = 0; w0 < kThreads; w0 += 32) {
      int per_group[8] = {};
      for (int tid = w0; tid < w0 + 32; ++tid) per_group[(swz_off<W>(Map::row(tid, i), Map::ch(tid)) / 8) % 8]++;
      for (int g = 0; g < 8; ++g) CHECK(per_group[g] == 4, "cp.async store of a warp: %d chunks in bank group %d", per_group[g], g);
    }
}

int main() {
  std::mt19937 rng(20261129);
  check_swizzle<128, 64>();
  check_swizzle<64, 64>();
  check_swizzle<32, 64>();
  check_swizzle<16, 64>();
  check_swizzle<64, 32>();
  check_swizzle<64, 16>();
  garbage_crow(rng);
  row_search(rng);

  std::vector<Case> cases = {
      // bh, bw, nbr, nbc, m, density, concurrent, bad_cols, empty, bias
      {0, 0, 5, 7, 130, 0.5, 1, false, false, true},      // one chunk per row (no split)
      {0, 0, 5, 7, 77, 0.6, 1000, false, false, true},    // small C: long rows split, partials
      {0, 0, 3, 9, 257, 0.4, 1000, true, false, false},   // bad columns skipped, 3 token tiles
      {0, 0, 4, 3, 1, 0.7, 8, false, false, true},        // one token
      {0, 0, 3, 4, 600, 0.5, 1000, false, false, true},   // grad_values token split
      {0, 0, 3, 5, 40, 0.5, 1000, false, true, true},     // nnz == 0: bias only
  };
  int n = 0;
  for (const Case& c0 : cases) {
#define SEMISPARSE_SIM_CASE(H, W)          \
  {                                        \
    Case c = c0;                           \
    c.bh = H;                              \
    c.bw = W;                              \
    run_case<H, W>(c, rng);                \
    ++n;                                   \
  }
    SEMISPARSE_SIM_CASE(16, 16)
    SEMISPARSE_SIM_CASE(16, 32)
    SEMISPARSE_SIM_CASE(16, 64)
    SEMISPARSE_SIM_CASE(32, 16)
    SEMISPARSE_SIM_CASE(32, 32)
    SEMISPARSE_SIM_CASE(32, 64)
    SEMISPARSE_SIM_CASE(64, 16)
    SEMISPARSE_SIM_CASE(64, 32)
    SEMISPARSE_SIM_CASE(64, 64)
#undef SEMISPARSE_SIM_CASE
  }
  // a row longer than the staged list (kListCap): several passes in one CTA
  {
    Case c{16, 16, 2, 300, 5, 0.95, 1, false, false, true};
    run_case<16, 16>(c, rng);
    ++n;
    Case d{64, 16, 3, 290, 9, 0.9, 1000, false, false, true};  // and split into chunks
    run_case<64, 16>(d, rng);
    ++n;
  }
  std::printf("%d cases, %ld checks\n", n, checks);
  std::printf("coverage: split-chunk CTAs %ld, last arrivals %ld, multi-pass chunks %ld, grad_values split CTAs %ld,\n"
              "          k-warp CTAs %ld, skipped blocks %ld, empty work items %ld, partial token tiles %ld\n",
              cov_split_ctas, cov_last_arrivals, cov_multi_pass, cov_gv_split, cov_kwarp, cov_skipped_blocks,
              cov_empty_items, cov_partial_tiles);
  CHECK(cov_split_ctas && cov_last_arrivals && cov_multi_pass && cov_gv_split && cov_kwarp && cov_skipped_blocks &&
            cov_empty_items && cov_partial_tiles,
        "a path was not exercised");
  std::printf("SIMULATION %s (%d failures)\n", failures == 0 ? "PASSED" : "FAILED", failures);
  return failures == 0 ? 0 : 1;
}
