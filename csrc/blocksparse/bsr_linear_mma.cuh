// Tensor-core (mma.sync m16n8k16, fp16 / bf16 in, fp32 accumulate) kernels of the three BSR
// linear ops (schemas and references: python/semisparse/ops/bsr.py), shared by the per-dtype
// translation units bsr_linear_mma_f16.cu / bsr_linear_mma_bf16.cu (which define
// SEMISPARSE_BSR_MMA_IMPL to get the kernels) and the front end bsr_linear_cuda.cu (which
// includes only the host+device section: the index math, the schedule rules and the
// interface). tests/host_sim/sim_bsr_linear.cpp includes the same section
// (SEMISPARSE_BSR_HOST_SIM) and replays the kernels' thread -> data mapping.
//
// W [N, K] is stored as blocks (bh, bw), bh, bw in {16, 32, 64}: values [nnz, bh, bw]
// (row-major blocks), crow [N/bh + 1], col [nnz] (int64).
//
// One kernel template, three modes; a CTA (4 warps) computes one output tile
//   mode          tile (TM x TN)              reduction over ("k")            A (stored)     B (stored)
//   forward       128 tokens x bh (block      the stored blocks (r, c) of     x  [tok][k]    W_blk [n][k]
//                 row r of y)                 block row r: k = c-block cols   (K-major)      (K-major)
//   grad_input    128 tokens x bw (block      the stored blocks (r, c) of     gy [tok][k]    W_blk [k][n]
//                 column c of dx)             block column c: k = r-block      (K-major)      (MN-major)
//   grad_values   bh x bw (one stored block)  tokens (64 per stage)           gy [tok][i]    x [tok][j]
//                                                                             (MN-major)     (MN-major)
// The stage depth is kBK = 64 along k. In forward / grad_input a stage holds 64 / RW
// "segments" of RW = bw (forward) or bh (grad_input) columns, one stored block each, so
// 16- and 32-wide blocks still fill whole mma k-steps. Operands go global -> shared memory
// with cp.async (16 B, zero-filled where a row / segment does not exist) in a STAGES-deep
// pipeline (3 stages forward / grad_input, 4 grad_values), shared -> registers with
// ldmatrix (.trans for MN-major operands), and mma.sync.m16n8k16.row.col. Shared tiles are
// XOR-swizzled in 16-byte chunks (swz_off) so both the cp.async stores and the ldmatrix
// phases are free of bank conflicts.
//
// Work (forward / grad_input): the CTAs walk a work list of (row, block range) chunks built
// on the device by a small single-CTA schedule kernel (bsr_linear_cuda.cu): a row (block row
// of W in forward, block column in grad_input) with more than C stored blocks is split into
// nch = ceil(cnt / C) nearly equal chunks; C = the total work over the resident CTA slots
// (plan_rows), so no CTA gets more than an even share, and the list is ordered longest chunk
// first (LPT), which covers the skew left in unsplit rows. CTA id -> (token tile, work item)
// in groups of kGroupTiles token tiles so that running CTAs share x tiles in L2. Chunks of a
// split row write fp32 partial tiles to a workspace; the last CTA to arrive (an int counter
// per (token tile, split row)) sums all partials in chunk order and writes the output:
// deterministic, no float atomics. A chunk's block list is staged in shared memory (as
// {A block index, block id}, padded with absent entries) kListCap entries per pass.
// Work (grad_values): one CTA per stored block (its block row found by one warp in 32-way
// search rounds); when there are few blocks the tokens are split into `splits` ranges with
// the same deterministic last-arriver reduction.
//
// Warp tiles: forward / grad_input 64 x 32 (bh/bw = 64: 2 x 2 warps), 32 x 32 (32: 4 x 1),
// 32 x 16 (16: 4 x 1); grad_values min(bh, 32) x min(bw, 32) with the remaining warps
// splitting the stage's four k16 steps. Per stage and warp (64 x 32): 4 + 2 ldmatrix.x4 and
// 16 mma per k16 step. These run on sm80 and sm90a alike (mma.sync); Hopper's full tensor
// throughput needs a wgmma (+ TMA) path, which is not written yet.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SEMISPARSE_BSR_HD __host__ __device__ __forceinline__
#else
#define SEMISPARSE_BSR_HD inline
#endif

namespace semisparse::bsr::cuda {

// ----------------------------------------------------------- host + device index math
enum class Mode : int { kForward = 0, kGradInput = 1, kGradValues = 2 };

constexpr int kThreads = 128;     // 4 warps per CTA
constexpr int kBK = 64;           // reduction depth of one pipeline stage
constexpr int kTokTile = 128;     // token tile of forward / grad_input
constexpr int kListCap = 256;     // block-list entries staged in shared memory per pass
constexpr int kGroupTiles = 8;    // token tiles per raster group (forward / grad_input)
constexpr int kBuckets = 32;      // chunk-length buckets of the LPT order
constexpr int kWorkInts = 8;      // int32 per work item
constexpr int kScheduleThreads = 1024;  // the single-CTA schedule kernels

template <class A, class B>
SEMISPARSE_BSR_HD constexpr A cmin(A a, B b) { return a < static_cast<A>(b) ? a : static_cast<A>(b); }
template <class A, class B>
SEMISPARSE_BSR_HD constexpr A cmax(A a, B b) { return a > static_cast<A>(b) ? a : static_cast<A>(b); }

SEMISPARSE_BSR_HD constexpr bool fast_block(int64_t s) { return s == 16 || s == 32 || s == 64; }

// Static shape of one kernel instance. TM x TN is the output tile (forward: 128 x bh,
// grad_input: 128 x bw, grad_values: bh x bw); 4 warps = WARPS_M x WARPS_N x WK, where WK
// warps split the 4 k16-steps of a stage (grad_values with small tiles) and are summed in
// a fixed order at the end.
template <Mode MODE, int TM, int TN>
struct TileCfg {
  static constexpr Mode kMode = MODE;
  static constexpr int BM = TM, BN = TN;
  static constexpr bool kAKMajor = MODE != Mode::kGradValues;
  static constexpr bool kBKMajor = MODE == Mode::kForward;
  static constexpr int WM = MODE == Mode::kGradValues ? (TM < 32 ? TM : 32) : (TN == 64 ? 64 : 32);
  static constexpr int WN = MODE == Mode::kGradValues ? (TN < 32 ? TN : 32) : (TN == 64 ? 32 : TN);
  static constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, WARPS_MN = WARPS_M * WARPS_N;
  static constexpr int WK = (kThreads / 32) / WARPS_MN;
  static constexpr int MT = WM / 16, NT = WN / 8;  // m16 tiles, n8 tiles per warp
  static constexpr int ACC = MT * NT * 4;          // fp32 accumulators per lane
  // stored shared tiles: [rows][width] 16-bit elements
  static constexpr int A_ROWS = kAKMajor ? BM : kBK, A_W = kAKMajor ? kBK : BM;
  static constexpr int B_ROWS = kBKMajor ? BN : kBK, B_W = kBKMajor ? kBK : BN;
  static constexpr int A_ELEMS = A_ROWS * A_W, B_ELEMS = B_ROWS * B_W;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
  static constexpr int STAGES = MODE == Mode::kGradValues ? 4 : 3;
  static constexpr int PIPE_BYTES = STAGES * STAGE_ELEMS * 2;
  static constexpr int RED_BYTES = (WK - 1) * WARPS_MN * 32 * ACC * 4;
  static constexpr int SMEM_BYTES = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;

  static_assert(WARPS_MN * WK * 32 == kThreads, "4 warps");
  static_assert(WM % 16 == 0 && WN % 16 == 0 && NT % 2 == 0, "warp tile: m16 tiles, pairs of n8 tiles");
  static_assert(WK == 1 || MODE == Mode::kGradValues, "k-split warps only in grad_values");
  static_assert(4 % WK == 0, "WK divides the 4 k16-steps");
  static_assert(A_W == 16 || A_W == 32 || A_W == 64, "swizzle widths");
  static_assert(B_W == 16 || B_W == 32 || B_W == 64, "swizzle widths");
};

// Element offset of (row, 16-byte chunk ch) in a shared tile of width W (16, 32 or 64
// 16-bit elements): chunk ch of row r sits in physical chunk ch ^ ((r / RPL) % CPR), where
// CPR = chunks per row and RPL = rows per 128-byte line. Any 8 consecutive rows at one
// logical chunk then cover 8 distinct 16-byte bank groups (ldmatrix phases conflict-free).
template <int W>
SEMISPARSE_BSR_HD int swz_off(int row, int ch) {
  constexpr int CPR = W / 8, RPL = 8 / CPR;
  return row * W + ((ch ^ ((row / RPL) % CPR)) << 3);
}

// cp.async mapping of a stored tile [ROWS][W]: load i (0 <= i < L) of thread tid moves the
// 16-byte chunk (row(tid, i), ch(tid)); ch is fixed per thread (kThreads % CPR == 0).
template <int ROWS, int W>
struct LoadMap {
  static constexpr int CPR = W / 8;
  static constexpr int L = ROWS * CPR / kThreads;
  static constexpr int RSTEP = kThreads / CPR;
  static_assert(L >= 1 && L * kThreads == ROWS * CPR, "whole chunks per thread");
  SEMISPARSE_BSR_HD static int ch(int tid) { return tid % CPR; }
  SEMISPARSE_BSR_HD static int row(int tid, int i) { return tid / CPR + i * RSTEP; }
  // shared element offset of load i: RSTEP rows are 16 swizzle lines, a whole number of
  // swizzle periods (CPR lines), so it is load 0's place moved by i * RSTEP rows
  static constexpr int DSTEP = RSTEP * W;
  SEMISPARSE_BSR_HD static int dst(int tid, int i) { return swz_off<W>(row(tid, 0), ch(tid)) + i * DSTEP; }
};

// ldmatrix.x4 lane decomposition: lane supplies the address of row lr of the 16 stored
// rows of the step and the 8-element chunk hi (0 / 1) of the 16 columns.
//   K-major A (non-trans):  matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15) -> a0..a3
//   MN-major A (trans):     same matrices, stored [k][m]
//   K-major B (non-trans):  (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15) -> b[2p][0..1], b[2p+1][0..1]
//   MN-major B (trans):     same matrices, stored [k][n]
struct LaneRC {
  int lr, hi;
};
SEMISPARSE_BSR_HD LaneRC lane_a_kmajor(int lane) { return {lane & 15, lane >> 4}; }
SEMISPARSE_BSR_HD LaneRC lane_a_mnmajor(int lane) { return {(lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1}; }
SEMISPARSE_BSR_HD LaneRC lane_b_kmajor(int lane) { return {(lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1}; }
SEMISPARSE_BSR_HD LaneRC lane_b_mnmajor(int lane) { return {(lane & 7) | (((lane >> 3) & 1) << 3), lane >> 4}; }

// K-major operand stored [rows][64]: the lane's ldmatrix address for k16-step kk and the
// warp's 16-row tile t is kmajor_base(row0, lrc, kk) + kmajor_delta(t) (the swizzle term
// does not depend on t: 16 t rows are whole swizzle periods).
template <int W>
SEMISPARSE_BSR_HD int kmajor_base(int row0, LaneRC l, int kk) { return swz_off<W>(row0 + l.lr, 2 * kk + l.hi); }
template <int W>
SEMISPARSE_BSR_HD int kmajor_delta(int t) { return 16 * t * W; }
// MN-major operand stored [64][W]: address for the warp's 16-column tile t (m16 tile of A,
// pair of n8 tiles of B) and k16-step kk is mnmajor_base(col0, lrc, t) + mnmajor_delta(kk).
template <int W>
SEMISPARSE_BSR_HD int mnmajor_base(int col0, LaneRC l, int t) { return swz_off<W>(l.lr, col0 / 8 + 2 * t + l.hi); }
template <int W>
SEMISPARSE_BSR_HD int mnmajor_delta(int kk) { return 16 * kk * W; }

// Accumulator element i (0..3) of an m16n8 tile: row g + 8 (i >> 1), column 2 t + (i & 1).
SEMISPARSE_BSR_HD int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
SEMISPARSE_BSR_HD int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// Warp roles: warp -> (wk, warp_m, warp_n); warps with wk > 0 only help along k.
struct WarpRole {
  int wk, wmn, wm, wn;
};
template <class Tl>
SEMISPARSE_BSR_HD WarpRole warp_role(int warp) {
  const int wmn = warp % Tl::WARPS_MN;
  return {warp / Tl::WARPS_MN, wmn, wmn / Tl::WARPS_N, wmn % Tl::WARPS_N};
}

// Reduction segment of a forward / grad_input stage column k (0..63): block RW wide.
struct SegK {
  int seg, kk;
};
SEMISPARSE_BSR_HD SegK seg_of(int k, int rw) { return {k / rw, k % rw}; }

// ---- global addresses (elements): per-thread loader state, set up once per CTA.
// The staged block list holds {A block index, stored block id} per entry; entries from len
// up to the next multiple of 4 (>= nseg) read {-1, 0} (absent), so stage st, segment seg
// reads entry st * nseg + seg < kListCap + 4 with no bounds test.
constexpr int kListPad = 4;
SEMISPARSE_BSR_HD int list_entry(int st, int nseg, int seg) { return st * nseg + seg; }
SEMISPARSE_BSR_HD int list_padded(int len) { return (len + kListPad - 1) / kListPad * kListPad; }
// forward / grad_input A: the thread's loads are rows row(tid, i) of the token tile, all in
// one segment seg (its chunk is fixed): element off0 + key * rw + i * step of x / grad_y;
// rows at or beyond m are not loaded (i >= nvalid).
struct ALoad {
  int64_t off0, step;
  int seg, nvalid;
};
template <class Map>
SEMISPARSE_BSR_HD ALoad list_a_load(int tid, int64_t m0, int64_t m, int64_t lda, int rw) {
  const SegK sk = seg_of(Map::ch(tid) * 8, rw);
  const int row0 = Map::row(tid, 0);
  const int64_t left = m - m0 - row0;
  const int64_t nv = left <= 0 ? 0 : (left + Map::RSTEP - 1) / Map::RSTEP;
  return {(m0 + row0) * lda + sk.kk, Map::RSTEP * lda, sk.seg, static_cast<int>(nv < Map::L ? nv : Map::L)};
}
// forward B: rows row(tid, i) of block bid (segment seg): bid * bsz + off0 + i * step.
struct BLoad {
  int off0, step, seg;
};
template <class Map>
SEMISPARSE_BSR_HD BLoad fwd_b_load(int tid, int bw, int rw) {
  const SegK sk = seg_of(Map::ch(tid) * 8, rw);
  return {Map::row(tid, 0) * bw + sk.kk, Map::RSTEP * bw, sk.seg};
}
// grad_input B: load i is row kk of the block of segment seg_of(row(tid, i), bh), columns 8 ch ..
SEMISPARSE_BSR_HD int64_t gi_b_src(int32_t bid, int64_t bsz, int kk, int bw, int ch) {
  return static_cast<int64_t>(bid) * bsz + static_cast<int64_t>(kk) * bw + ch * 8;
}
// grad_values A (grad_y, ld = N, block column range r bh ..) and B (x, ld = K, c bw ..):
// stage st, load i reads element off0 + st * stage + i * step; it exists while
// i * RSTEP < t_end - (t_begin + st kBK) - row0.
struct TLoad {
  int64_t off0, step, stage;
  int row0;
};
template <class Map>
SEMISPARSE_BSR_HD TLoad gv_load(int tid, int64_t t_begin, int64_t ld, int64_t blk, int bsize) {
  return {(t_begin + Map::row(tid, 0)) * ld + blk * bsize + Map::ch(tid) * 8, Map::RSTEP * ld, kBK * ld,
          Map::row(tid, 0)};
}
// Output element of tile (row, col): forward y[m0 + row][lrow bh + col], grad_input
// dx[m0 + row][lrow bw + col], grad_values gv[blk][row][col].
SEMISPARSE_BSR_HD int64_t out_off(Mode mode, int64_t m0, int row, int col, int64_t lrow, int64_t blk, int64_t n,
                                  int64_t k, int bh, int bw) {
  if (mode == Mode::kForward) return (m0 + row) * n + lrow * bh + col;
  if (mode == Mode::kGradInput) return (m0 + row) * k + lrow * bw + col;
  return blk * bh * bw + static_cast<int64_t>(row) * bw + col;
}

// ---- work list (forward / grad_input)
// A work item: int32 {row, b0, b1, j, nch, ws_base, split_idx, 0}: blocks [b0, b1) of list
// row `row` (block row of W / block column in the CSC order), chunk j of nch; ws_base and
// split_idx index the partial workspace and the arrival counters when nch > 1 (else -1).
struct WorkItem {
  int32_t row, b0, b1, j, nch, ws_base, split_idx, pad;
};

// Chunks of a row of cnt blocks: one when it fits (or splitting is off), else ceil(cnt / C).
SEMISPARSE_BSR_HD int64_t chunk_count(int64_t cnt, int64_t c, bool allow_split) {
  return (!allow_split || cnt <= c) ? 1 : (cnt + c - 1) / c;
}
// Chunk j of nch over [lo, lo + cnt): nearly equal lengths (all <= ceil(cnt / nch)).
SEMISPARSE_BSR_HD int64_t chunk_begin(int64_t lo, int64_t cnt, int64_t nch, int64_t j) { return lo + (j * cnt) / nch; }
// LPT bucket of a chunk length (higher bucket = longer = earlier in the list).
SEMISPARSE_BSR_HD int bucket_of(int64_t len, int64_t c) {
  const int64_t b = (len * kBuckets) / (c + 1);
  return static_cast<int>(b < kBuckets - 1 ? b : kBuckets - 1);
}

// CTA id -> (token tile mt, work item w): groups of `group` token tiles; inside a group the
// CTAs walk the work list, the group's token tiles side by side. Valid for id < mtiles * nwork.
SEMISPARSE_BSR_HD void raster(int64_t id, int64_t nwork, int64_t mtiles, int64_t group, int64_t& mt, int64_t& w) {
  const int64_t per_group = group * nwork;
  const int64_t g = id / per_group, rem = id - g * per_group;
  const int64_t left = mtiles - g * group;
  const int64_t gsz = left < group ? left : group;
  w = rem / gsz;
  mt = g * group + rem % gsz;
}

// Block row of stored block b: the largest r in [0, nbr) with crow[r] <= b, crow values
// clamped to [0, nnz] (so any crow gives a row in range; nbr >= 1).
SEMISPARSE_BSR_HD int64_t row_of(const int64_t* crow, int64_t nbr, int64_t nnz, int64_t b) {
  int64_t lo = 0, hi = nbr - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    int64_t v = crow[mid];
    v = v < 0 ? 0 : v > nnz ? nnz : v;
    if (v <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// The same row found by one warp in 32-way rounds (grad_values kernel: ~2 dependent loads
// instead of ~log2(nbr)): lanes probe lo + lane * step; the last lane whose crow value is
// <= b gives the new lo. For a non-decreasing crow this is row_of; for any crow it stays in
// [0, nbr).
SEMISPARSE_BSR_HD int64_t search_step(int64_t lo, int64_t hi) { return (hi - lo + 32) / 32; }
SEMISPARSE_BSR_HD int last_lane(unsigned mask) {
#if defined(__CUDA_ARCH__)
  return 31 - __clz(static_cast<int>(mask));
#else
  return 31 - __builtin_clz(mask);
#endif
}
SEMISPARSE_BSR_HD void search_update(int64_t& lo, int64_t& hi, int64_t step, unsigned mask) {
  if (mask == 0) {
    hi = lo;
    return;
  }
  lo += last_lane(mask) * step;
  hi = hi < lo + step - 1 ? hi : lo + step - 1;
}

// Partial tiles (fp32) in the workspace: slot s holds TM * TN floats in fragment order:
// float4 number (i4 * WARPS_MN + wmn) * 32 + lane holds accumulators 4 i4 .. 4 i4 + 3 of
// lane `lane` of the k-warp-0 warp wmn, i4 = mt * NT + nt.
SEMISPARSE_BSR_HD int64_t ws_f4(int64_t slot, int tile_floats, int i4, int wmn, int warps_mn, int lane) {
  return slot * (tile_floats / 4) + static_cast<int64_t>((i4 * warps_mn + wmn) * 32 + lane);
}

// ---- CSC build (grad_input): blocks are cut into segments of S blocks; segment counters
// give each block its rank among the earlier blocks of its column (stable, deterministic).
SEMISPARSE_BSR_HD int64_t csc_segment(int64_t nnz) {
  int64_t s = (nnz + 63) / 64;
  s = (s + 31) / 32 * 32;
  return s < 256 ? 256 : s;
}

// ---- schedule sizes (host)
struct RowPlan {
  int64_t c = 1;           // chunk cap, blocks
  bool allow_split = false;
  int64_t work_bound = 0;  // >= number of work items
  int64_t ws_slots = 0;    // partial slots per token tile
  int64_t nsplit = 0;      // arrival counters per token tile
};

// rows: list rows (N/bh or K/bw); maxlen: most blocks a valid row can hold; nseg: blocks per
// stage; concurrent: resident CTAs of the kernel on the device.
// C = the work of one resident CTA slot if all work were spread evenly (total / concurrent,
// at least 4 stages): a chunk never holds more than that, so with the longest-first order
// the last CTA finishes at most about one chunk after the average (LPT); rows that fit are
// not split at all. The workspace bound follows: <= 2 total / C <= 2 concurrent tiles.
inline RowPlan plan_rows(int64_t rows, int64_t maxlen, int64_t nnz, int64_t mtiles, int64_t nseg,
                         int64_t concurrent) {
  RowPlan p;
  const int64_t total = mtiles * nnz;
  const int64_t target = concurrent > 0 ? concurrent : 1;
  int64_t c = (total + target - 1) / target;
  c = c < 4 * nseg ? 4 * nseg : c;
  c = (c + nseg - 1) / nseg * nseg;
  p.c = c;
  p.allow_split = c < maxlen;
  if (p.allow_split) {
    // sum over split rows (cnt > C) of ceil(cnt / C) <= 2 nnz / C; such rows <= nnz / (C + 1)
    p.ws_slots = 2 * nnz / c;
    p.nsplit = nnz / (c + 1);
    p.work_bound = rows + nnz / c;
  } else {
    p.work_bound = rows;
  }
  return p;
}

// grad_values token split: splits ranges of tok (multiple of kBK) tokens.
struct GvPlan {
  int splits = 1;
  int64_t tok = 0;
};
inline GvPlan plan_gv(int64_t m, int64_t nnz, int64_t concurrent) {
  GvPlan g;
  const int64_t target = 2 * (concurrent > 0 ? concurrent : 1);
  int64_t s = nnz >= target ? 1 : (target + nnz - 1) / nnz;
  const int64_t most = m / (4 * kBK);  // keep >= 4 stages per split
  s = s > most ? most : s;
  s = s > 64 ? 64 : s;
  s = s < 1 ? 1 : s;
  int64_t tok = (m + s - 1) / s;
  tok = (tok + kBK - 1) / kBK * kBK;
  g.tok = tok;
  g.splits = static_cast<int>((m + tok - 1) / tok);
  if (g.splits < 1) g.splits = 1;
  return g;
}

// ---- the interface between the front end and the per-dtype kernel TUs
struct MmaArgs {
  Mode mode = Mode::kForward;
  const void* a = nullptr;     // forward: x [M, K]; grad_input / grad_values: grad_y [M, N]
  const void* b = nullptr;     // forward / grad_input: values [nnz, bh, bw]; grad_values: x [M, K]
  const void* bias = nullptr;  // forward: [N] or null
  void* out = nullptr;
  const int64_t* crow = nullptr;   // grad_values (row lookup)
  const int64_t* col = nullptr;    // forward, grad_values
  const int32_t* perm = nullptr;   // grad_input: block ids in CSC order
  const int32_t* rowid = nullptr;  // grad_input: their block rows
  const int32_t* work = nullptr;   // forward / grad_input work list
  const int32_t* nwork = nullptr;  // its length (device)
  float* ws = nullptr;
  int32_t* sems = nullptr;
  int64_t m = 0, n = 0, k = 0, nnz = 0;
  int bh = 0, bw = 0;
  int64_t mtiles = 0, work_bound = 0, ws_slots = 0, nsplit = 0;
  int group = kGroupTiles;
  int splits = 1;
  int64_t tok_per_split = 0;
  int device = 0;
  void* stream = nullptr;  // cudaStream_t
};

// Per-dtype entry points (bsr_linear_mma_{f16,bf16}.cu). run: launches the main kernel of
// a.mode (the schedule / CSC kernels ran before); returns null, or why it cannot run.
// ctas_per_sm: resident CTAs of that kernel per multiprocessor (>= 1).
const char* run_mma_f16(const MmaArgs& a);
const char* run_mma_bf16(const MmaArgs& a);
int ctas_per_sm_f16(Mode mode, int bh, int bw, int device);
int ctas_per_sm_bf16(Mode mode, int bh, int bw, int device);

}  // namespace semisparse::bsr::cuda

#if defined(SEMISPARSE_BSR_MMA_IMPL) && !defined(SEMISPARSE_BSR_HOST_SIM)
// --------------------------------------------------------------------------- device code
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/mma_sm80.cuh"

namespace semisparse::bsr::cuda {
namespace {

struct Params {
  const void* a;
  const void* b;
  const void* bias;
  void* out;
  const int64_t* crow;
  const int64_t* col;
  const int32_t* perm;
  const int32_t* rowid;
  const int32_t* work;
  const int32_t* nwork;
  float* ws;
  int32_t* sems;
  int64_t m, n, k, nnz;
  int bh, bw;
  int64_t mtiles, ws_slots, nsplit;
  int group, splits;
  int64_t tok_per_split;
};

using common::ptx::cp_async16;  // (common/mma_sm80.cuh)
using common::ptx::cp_async_commit;
using common::ptx::cp_async_wait;
using common::ptx::mma16816;
using common::ptx::smem_u32;

template <bool TRANS>
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  uint32_t r[4];
  if constexpr (TRANS)
    common::ptx::ldsm_x4_t(r, addr);
  else
    common::ptx::ldsm_x4(r, addr);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

using common::ptx::pack2;
using common::ptx::to_f32;

// The kernel. TM x TN output tile of MODE (see the top of the file).
template <class T, Mode MODE, int TM, int TN>
__global__ void __launch_bounds__(kThreads, 2) bsr_mma_kernel(const Params p) {
  using Tl = TileCfg<MODE, TM, TN>;
  constexpr bool kList = MODE != Mode::kGradValues;
  constexpr int kST = Tl::STAGES;
  constexpr int kStageBytes = Tl::STAGE_ELEMS * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int2 s_list[kList ? kListCap + kListPad : 1];  // {A block index (-1: skip), block id}
  __shared__ int64_t s_rc[2];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31;
  const WarpRole role = warp_role<Tl>(tid >> 5);
  const T* __restrict__ ga = static_cast<const T*>(p.a);
  const T* __restrict__ gb = static_cast<const T*>(p.b);
  const int64_t bsz = static_cast<int64_t>(p.bh) * p.bw;

  // ---------------- what this CTA computes
  int64_t m0 = 0;         // first token of the tile (forward / grad_input)
  int64_t lrow = 0;       // list row (block row / block column); grad_values: block row r
  int64_t lcol = 0;       // grad_values: block column c
  int64_t blk = 0;        // grad_values: the stored block
  int64_t e_begin = 0, e_end = 0;  // list entries (forward / grad_input)
  int64_t t_begin = 0, t_end = 0;  // tokens (grad_values)
  int chunk_j = 0, nch = 1;
  int64_t slot0 = 0;               // workspace slot of chunk 0 (nch > 1)
  int32_t* sem = nullptr;
  if constexpr (kList) {
    const int64_t nwork = *p.nwork;
    if (static_cast<int64_t>(blockIdx.x) >= p.mtiles * nwork) return;
    int64_t mt, w;
    raster(blockIdx.x, nwork, p.mtiles, p.group, mt, w);
    const int4* wp = reinterpret_cast<const int4*>(p.work + w * kWorkInts);
    const int4 w0 = wp[0], w1 = wp[1];
    lrow = w0.x;
    e_begin = w0.y;
    e_end = w0.z;
    chunk_j = w0.w;
    nch = w1.x;
    m0 = mt * TM;
    if (nch > 1) {
      slot0 = mt * p.ws_slots + w1.y;
      sem = p.sems + mt * p.nsplit + w1.z;
    }
  } else {
    blk = blockIdx.x / p.splits;
    chunk_j = static_cast<int>(blockIdx.x % p.splits);
    nch = p.splits;
    if (tid < 32) {
      const int64_t nbr = p.n / p.bh, nbc = p.k / p.bw;
      const int64_t c = p.col[blk];
      int64_t lo = 0, hi = nbr - 1;
      while (lo < hi) {  // warp-uniform
        const int64_t step = search_step(lo, hi), idx = lo + lane * step;
        const bool ok = idx <= hi && cmax(cmin(p.crow[idx], p.nnz), 0) <= blk;
        search_update(lo, hi, step, __ballot_sync(0xffffffffu, ok));
      }
      if (lane == 0) {
        s_rc[0] = lo;
        s_rc[1] = (c >= 0 && c < nbc) ? c : -1;
      }
    }
    __syncthreads();
    lrow = s_rc[0];
    lcol = s_rc[1];
    t_begin = chunk_j * p.tok_per_split;
    t_end = cmin(p.m, t_begin + p.tok_per_split);
    if (lcol < 0) t_end = t_begin;  // invalid column index: the block's gradient is zero
    if (nch > 1) {
      slot0 = blk * p.splits;
      sem = p.sems + blk;
    }
  }

  float acc[Tl::MT][Tl::NT][4];
#pragma unroll
  for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
    for (int b = 0; b < Tl::NT; ++b)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[a][b][i] = 0.f;

  const uint32_t s_base = smem_u32(smem);
  const int rw = MODE == Mode::kForward ? p.bw : p.bh;  // block width along k (list modes)
  const int nseg = kBK / rw;
  const int64_t lda = MODE == Mode::kForward ? p.k : p.n;

  // ---------------- per-lane ldmatrix bases
  const int a_row0 = role.wm * Tl::WM, b_row0 = role.wn * Tl::WN;
  int a_base[4], b_base[4];
  {
    const LaneRC la = Tl::kAKMajor ? lane_a_kmajor(lane) : lane_a_mnmajor(lane);
    const LaneRC lb = Tl::kBKMajor ? lane_b_kmajor(lane) : lane_b_mnmajor(lane);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if constexpr (Tl::kAKMajor)
        a_base[q] = kmajor_base<Tl::A_W>(a_row0, la, q);
      else
        a_base[q] = q < Tl::MT ? mnmajor_base<Tl::A_W>(a_row0, la, q) : 0;
      if constexpr (Tl::kBKMajor)
        b_base[q] = kmajor_base<Tl::B_W>(b_row0, lb, q);
      else
        b_base[q] = q < Tl::NT / 2 ? mnmajor_base<Tl::B_W>(b_row0, lb, q) : 0;
    }
  }

  // ---------------- one stage: global -> shared (cp.async, zero-filled where absent)
  using MapA = LoadMap<Tl::A_ROWS, Tl::A_W>;
  using MapB = LoadMap<Tl::B_ROWS, Tl::B_W>;
  const uint32_t a_dst0 = 2 * MapA::dst(tid, 0), b_dst0 = 2 * MapB::dst(tid, 0);
  ALoad la{};
  BLoad lb{};
  TLoad ta{}, tb{};
  int gseg[MapB::L], goff[MapB::L];  // grad_input B: segment and in-block offset of load i
  if constexpr (kList) {
    la = list_a_load<MapA>(tid, m0, p.m, lda, rw);
    if constexpr (MODE == Mode::kForward) {
      lb = fwd_b_load<MapB>(tid, p.bw, rw);
    } else {
#pragma unroll
      for (int i = 0; i < MapB::L; ++i) {
        const SegK sk = seg_of(MapB::row(tid, i), rw);
        gseg[i] = sk.seg;
        goff[i] = static_cast<int>(gi_b_src(0, bsz, sk.kk, p.bw, MapB::ch(tid)));
      }
    }
  } else {
    ta = gv_load<MapA>(tid, t_begin, p.n, lrow, p.bh);
    tb = gv_load<MapB>(tid, t_begin, p.k, lcol, p.bw);
  }
  auto load_stage = [&](uint32_t sa, int st, int len) {
    const uint32_t sb = sa + Tl::A_ELEMS * 2;
    if constexpr (kList) {
      {  // A: tokens x stage k (K-major)
        const int key = s_list[list_entry(st, nseg, la.seg)].x;
        const T* src = ga + (la.off0 + static_cast<int64_t>(key) * rw);
#pragma unroll
        for (int i = 0; i < MapA::L; ++i) {
          const bool ok = key >= 0 && i < la.nvalid;
          cp_async16(sa + a_dst0 + i * (2 * MapA::DSTEP), src, ok);
          src += la.step;
        }
      }
      if constexpr (MODE == Mode::kForward) {  // B: W_blk rows x stage k (K-major)
        const int2 kb = s_list[list_entry(st, nseg, lb.seg)];
        const int key = kb.x;
        const T* src = gb + (static_cast<int64_t>(kb.y) * bsz + lb.off0);
#pragma unroll
        for (int i = 0; i < MapB::L; ++i)
          cp_async16(sb + b_dst0 + i * (2 * MapB::DSTEP), src + i * lb.step, key >= 0);
      } else {  // B: stage k (rows of W_blk, bh each) x bw (MN-major)
#pragma unroll
        for (int i = 0; i < MapB::L; ++i) {
          const int2 kb = s_list[list_entry(st, nseg, gseg[i])];
          cp_async16(sb + b_dst0 + i * (2 * MapB::DSTEP), gb + (static_cast<int64_t>(kb.y) * bsz + goff[i]), kb.x >= 0);
        }
      }
    } else {  // grad_values: A = gy[t][r bh + i] stored [t][i]; B = x[t][c bw + j] stored [t][j]
      const int64_t t0 = t_begin + static_cast<int64_t>(st) * kBK;
      {
        const int64_t left = t_end - t0 - ta.row0;
        const T* src = ga + (ta.off0 + st * ta.stage);
#pragma unroll
        for (int i = 0; i < MapA::L; ++i) {
          const bool ok = i * MapA::RSTEP < left;
          cp_async16(sa + a_dst0 + i * (2 * MapA::DSTEP), src, ok);
          src += ta.step;
        }
      }
      {
        const int64_t left = t_end - t0 - tb.row0;
        const T* src = gb + (tb.off0 + st * tb.stage);
#pragma unroll
        for (int i = 0; i < MapB::L; ++i) {
          const bool ok = i * MapB::RSTEP < left;
          cp_async16(sb + b_dst0 + i * (2 * MapB::DSTEP), src, ok);
          src += tb.step;
        }
      }
    }
  };

  // ---------------- one stage: shared -> registers -> tensor cores
  auto compute_stage = [&](uint32_t sa) {
    const uint32_t sb = sa + Tl::A_ELEMS * 2;
#pragma unroll
    for (int q = 0; q < 4 / Tl::WK; ++q) {
      const int kk = Tl::WK == 1 ? q : q * Tl::WK + role.wk;  // compile-time when WK == 1
      uint32_t af[Tl::MT][4];
      uint32_t bf[Tl::NT][2];
#pragma unroll
      for (int t = 0; t < Tl::MT; ++t) {
        int off;
        if constexpr (Tl::kAKMajor)
          off = a_base[kk] + kmajor_delta<Tl::A_W>(t);
        else
          off = a_base[t] + mnmajor_delta<Tl::A_W>(kk);
        ldsm_x4<!Tl::kAKMajor>(sa + 2 * off, af[t][0], af[t][1], af[t][2], af[t][3]);
      }
#pragma unroll
      for (int t = 0; t < Tl::NT / 2; ++t) {
        int off;
        if constexpr (Tl::kBKMajor)
          off = b_base[kk] + kmajor_delta<Tl::B_W>(t);
        else
          off = b_base[t] + mnmajor_delta<Tl::B_W>(kk);
        ldsm_x4<!Tl::kBKMajor>(sb + 2 * off, bf[2 * t][0], bf[2 * t][1], bf[2 * t + 1][0], bf[2 * t + 1][1]);
      }
#pragma unroll
      for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
        for (int b = 0; b < Tl::NT; ++b) mma16816<T>(acc[a][b], af[a], bf[b][0], bf[b][1]);
    }
  };

  // ---------------- the pipeline over nst stages (len list entries, or tokens)
  auto run_pipeline = [&](int nst, int len) {
#pragma unroll
    for (int s = 0; s < kST - 1; ++s) {
      if (s < nst) load_stage(s_base + s * kStageBytes, s, len);
      cp_async_commit();
    }
    int rd = 0, wr = kST - 1;  // slots of the stage computed / loaded in this iteration
    for (int it = 0; it < nst; ++it) {
      cp_async_wait<kST - 2>();
      __syncthreads();  // stage it landed for every thread; slot wr (stage it-1) is free
      if (it + kST - 1 < nst) load_stage(s_base + wr * kStageBytes, it + kST - 1, len);
      cp_async_commit();
      compute_stage(s_base + rd * kStageBytes);
      rd = rd + 1 == kST ? 0 : rd + 1;
      wr = wr + 1 == kST ? 0 : wr + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // shared memory free for the next pass / the epilogue
  };

  if constexpr (kList) {
    for (int64_t pb = e_begin; pb < e_end; pb += kListCap) {
      const int len = static_cast<int>(cmin(e_end - pb, static_cast<int64_t>(kListCap)));
      for (int e = tid; e < list_padded(len); e += kThreads) {
        int2 kb = make_int2(-1, 0);
        if (e < len) {
          if constexpr (MODE == Mode::kForward) {
            const int64_t c = p.col[pb + e];
            kb.x = (c >= 0 && c < p.k / p.bw) ? static_cast<int32_t>(c) : -1;
            kb.y = static_cast<int32_t>(pb + e);
          } else {
            kb.x = p.rowid[pb + e];
            kb.y = p.perm[pb + e];
          }
        }
        s_list[e] = kb;
      }
      __syncthreads();
      run_pipeline((len + nseg - 1) / nseg, len);
    }
  } else {
    run_pipeline(static_cast<int>((t_end - t_begin + kBK - 1) / kBK), 0);
  }

  // ---------------- k-warps: fixed-order sum into the wk == 0 warps
  if constexpr (Tl::WK > 1) {
    float* red = reinterpret_cast<float*>(smem);
    if (role.wk > 0) {
      float* dst = red + ((role.wk - 1) * Tl::WARPS_MN + role.wmn) * (32 * Tl::ACC);
#pragma unroll
      for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
        for (int b = 0; b < Tl::NT; ++b)
#pragma unroll
          for (int i = 0; i < 4; ++i) dst[((a * Tl::NT + b) * 4 + i) * 32 + lane] = acc[a][b][i];
    }
    __syncthreads();
    if (role.wk == 0) {
      for (int w = 1; w < Tl::WK; ++w) {
        const float* src = red + ((w - 1) * Tl::WARPS_MN + role.wmn) * (32 * Tl::ACC);
#pragma unroll
        for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
          for (int b = 0; b < Tl::NT; ++b)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][b][i] += src[((a * Tl::NT + b) * 4 + i) * 32 + lane];
      }
    }
  }

  // ---------------- split chunks: partials, the last CTA to arrive sums them in order
  if (nch > 1) {
    float4* ws = reinterpret_cast<float4*>(p.ws);
    if (role.wk == 0) {
#pragma unroll
      for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
        for (int b = 0; b < Tl::NT; ++b)
          ws[ws_f4(slot0 + chunk_j, TM * TN, a * Tl::NT + b, role.wmn, Tl::WARPS_MN, lane)] =
              make_float4(acc[a][b][0], acc[a][b][1], acc[a][b][2], acc[a][b][3]);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(sem, 1) == nch - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    if (role.wk == 0) {
#pragma unroll
      for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
        for (int b = 0; b < Tl::NT; ++b) {
          float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
          for (int j = 0; j < nch; ++j) {
            const float4 v = __ldcg(&ws[ws_f4(slot0 + j, TM * TN, a * Tl::NT + b, role.wmn, Tl::WARPS_MN, lane)]);
            s.x += v.x;
            s.y += v.y;
            s.z += v.z;
            s.w += v.w;
          }
          acc[a][b][0] = s.x;
          acc[a][b][1] = s.y;
          acc[a][b][2] = s.z;
          acc[a][b][3] = s.w;
        }
    }
  }

  // ---------------- epilogue: (+ bias), one rounding, 4-byte stores of column pairs
  if (role.wk != 0) return;
  T* out = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int a = 0; a < Tl::MT; ++a)
#pragma unroll
    for (int b = 0; b < Tl::NT; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = a_row0 + 16 * a + acc_row(lane, 2 * h);
        const int col = b_row0 + 8 * b + acc_col(lane, 2 * h);
        float v0 = acc[a][b][2 * h], v1 = acc[a][b][2 * h + 1];
        if constexpr (MODE != Mode::kGradValues) {
          if (m0 + row >= p.m) continue;
        }
        if constexpr (MODE == Mode::kForward) {
          if (bias != nullptr) {
            const int64_t n = lrow * p.bh + col;
            v0 += to_f32(bias[n]);
            v1 += to_f32(bias[n + 1]);
          }
        }
        const int64_t off = out_off(MODE, m0, row, col, lrow, blk, p.n, p.k, p.bh, p.bw);
        *reinterpret_cast<uint32_t*>(out + off) = pack2<T>(v0, v1);
      }
}

Params to_params(const MmaArgs& a) {
  Params p;
  p.a = a.a;
  p.b = a.b;
  p.bias = a.bias;
  p.out = a.out;
  p.crow = a.crow;
  p.col = a.col;
  p.perm = a.perm;
  p.rowid = a.rowid;
  p.work = a.work;
  p.nwork = a.nwork;
  p.ws = a.ws;
  p.sems = a.sems;
  p.m = a.m;
  p.n = a.n;
  p.k = a.k;
  p.nnz = a.nnz;
  p.bh = a.bh;
  p.bw = a.bw;
  p.mtiles = a.mtiles;
  p.ws_slots = a.ws_slots;
  p.nsplit = a.nsplit;
  p.group = a.group;
  p.splits = a.splits;
  p.tok_per_split = a.tok_per_split;
  return p;
}

template <class T, Mode MODE, int TM, int TN>
cudaError_t prepare(int device) {
  // dynamic shared memory above 48 KB needs the opt-in, once per device
  constexpr int kMaxDevices = 64;
  static bool done[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && done[device]) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(bsr_mma_kernel<T, MODE, TM, TN>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               TileCfg<MODE, TM, TN>::SMEM_BYTES);
  if (err == cudaSuccess && device >= 0 && device < kMaxDevices) done[device] = true;
  return err;
}

template <class T, Mode MODE, int TM, int TN>
const char* launch(const MmaArgs& a) {
  using Tl = TileCfg<MODE, TM, TN>;
  cudaError_t err = prepare<T, MODE, TM, TN>(a.device);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return "bsr tensor-core kernel: could not raise the shared-memory limit";
  }
  const int64_t grid = MODE == Mode::kGradValues ? a.nnz * a.splits : a.mtiles * a.work_bound;
  if (grid <= 0) return nullptr;
  if (grid > 0x7fffffffLL) return "bsr tensor-core kernel: grid too large";
  bsr_mma_kernel<T, MODE, TM, TN><<<static_cast<unsigned>(grid), kThreads, Tl::SMEM_BYTES,
                                    static_cast<cudaStream_t>(a.stream)>>>(to_params(a));
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class T, Mode MODE, int TM, int TN>
int occupancy(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices];
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int n = 0;
  if (prepare<T, MODE, TM, TN>(device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, bsr_mma_kernel<T, MODE, TM, TN>, kThreads,
                                                    TileCfg<MODE, TM, TN>::SMEM_BYTES) != cudaSuccess ||
      n < 1) {
    (void)cudaGetLastError();
    n = 1;
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = n;
  return n;
}

// (mode, bh, bw) -> instance: calls f.template operator()<MODE, TM, TN>() of the matching
// instance and returns true, or returns false (no instance).
template <class F>
bool dispatch(Mode mode, int bh, int bw, F&& f) {
  switch (mode) {
    case Mode::kForward:
      if (bh == 16) return f.template operator()<Mode::kForward, kTokTile, 16>(), true;
      if (bh == 32) return f.template operator()<Mode::kForward, kTokTile, 32>(), true;
      if (bh == 64) return f.template operator()<Mode::kForward, kTokTile, 64>(), true;
      break;
    case Mode::kGradInput:
      if (bw == 16) return f.template operator()<Mode::kGradInput, kTokTile, 16>(), true;
      if (bw == 32) return f.template operator()<Mode::kGradInput, kTokTile, 32>(), true;
      if (bw == 64) return f.template operator()<Mode::kGradInput, kTokTile, 64>(), true;
      break;
    case Mode::kGradValues:
#define SEMISPARSE_BSR_GV(H, W) \
  if (bh == H && bw == W) return f.template operator()<Mode::kGradValues, H, W>(), true;
      SEMISPARSE_BSR_GV(16, 16)
      SEMISPARSE_BSR_GV(16, 32)
      SEMISPARSE_BSR_GV(16, 64)
      SEMISPARSE_BSR_GV(32, 16)
      SEMISPARSE_BSR_GV(32, 32)
      SEMISPARSE_BSR_GV(32, 64)
      SEMISPARSE_BSR_GV(64, 16)
      SEMISPARSE_BSR_GV(64, 32)
      SEMISPARSE_BSR_GV(64, 64)
#undef SEMISPARSE_BSR_GV
      break;
  }
  return false;
}

template <class T>
const char* run_mma(const MmaArgs& a) {
  const char* r = "bsr tensor-core kernel: block sizes must be 16, 32 or 64";
  dispatch(a.mode, a.bh, a.bw, [&]<Mode M, int TM, int TN>() { r = launch<T, M, TM, TN>(a); });
  return r;
}

template <class T>
int ctas_per_sm(Mode mode, int bh, int bw, int device) {
  int n = 1;
  dispatch(mode, bh, bw, [&]<Mode M, int TM, int TN>() { n = occupancy<T, M, TM, TN>(device); });
  return n > 0 ? n : 1;
}

}  // namespace
}  // namespace semisparse::bsr::cuda
#endif  // SEMISPARSE_BSR_MMA_IMPL && !SEMISPARSE_BSR_HOST_SIM
