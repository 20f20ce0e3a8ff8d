// Tensor-core (mma.sync m16n8k16) block-sparse attention, FlashAttention-2 style: the shared
// definitions of the CUDA fast path of semisparse::block_sparse_attention{,_backward}
// (fp16 / bf16, head dims D = Dv in {64, 128}, block sizes multiples of 16). The math is
// defined in python/semisparse/ops/block_attention.py; the front end and the SIMT fallback
// are in block_attention_cuda.cu, the instantiations in block_attention_fwd_cuda.cu and
// block_attention_bwd_cuda.cu.
//
// Work lists (built on the device by block_attention_cuda.cu, see pair_info below): for a
// tiling of the [Lq, Lk] score matrix into TM x TN tiles, list row o (one per (mask batch,
// mask head, outer tile)) holds the inner tiles whose pair is active -- some element
// allowed by block_mask (broadcast over batch / heads) and the causal rule -- in
// increasing order, each entry `inner | kPartial` when the tile also holds an element that
// is not allowed (a mask block off, the causal diagonal, or keys past Lk). Kernels visit
// only listed tiles and apply the element mask only to kPartial ones. Since block_q and
// block_k are multiples of 16 and tiles start at multiples of 16, every 16 x 16 group of a
// tile lies in one mask block: inside a partial tile a warp reads one mask byte per group
// (4 lanes, one ballot) and tests element (i, j) as bit(group) && j < Lk && !(causal && j > i).
//
// Kernels (all: fp32 accumulation and softmax, exp2 with the scale folded into log2(e)):
//  * forward: one CTA of 8 warps per (batch, query head, 128-row query tile), each warp 16
//    query rows; it loops over the listed 64-key tiles (list 128 x 64). K and V tiles are
//    double buffered in shared memory with cp.async (tile t + 1 loads while t computes);
//    S = Q K^T (ldmatrix + mma), online softmax in registers (row max / sum over the 4 lanes
//    of a quad), P re-packed from the accumulator layout straight into A fragments, O += P V
//    (V through ldmatrix.trans). Rows with no allowed key: out = 0, lse = -inf.
//  * backward, 3 kernels: prep (per row: dsum = rowsum(dO * O), lse2 = lse * log2(e), +inf
//    for dead rows and the padding up to a multiple of 64, so P = exp2(s - lse2) = 0 there);
//    dq: one CTA of 4 warps per (batch, query head, 64-row query tile) over its listed key
//    tiles (list 64 x 64): S, dP = dO V^T, P, dS = P (dP - dsum), dQ += dS K;
//    dkdv: one CTA of 4 warps per (batch, kv head, 64-key tile), each warp 16 keys, over the
//    query heads of its GQA group and, per head, the listed query tiles of the transposed
//    list: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T, dK += dS^T Q. Every output
//    element is written by one thread once: deterministic, no atomics (S and dP are computed
//    twice, once per kernel, as FlexAttention's backward does).
// The scale is applied before the mask (scale may be 0 or negative: -inf * scale would not
// stay -inf). Occupancy (ptxas, sm_90a): forward D = 64 127 registers, 48 KB shared memory,
// 2 CTAs (16 warps) per SM; D = 128 ~190 registers, 96 KB, 1 CTA (8 warps); dq and dkdv
// 4 warps, 219-255 registers, up to 97 KB, 2 CTAs (8 warps) per SM.
// Shared memory tiles are [rows][D] 16-bit elements, the 16-byte chunk c of row r stored at
// chunk c ^ (r & 7) (swz): cp.async stores and every ldmatrix read are free of bank
// conflicts.
//
// The first section (index math, work lists, fragment maps) is host + device code: the host
// simulation tests/host_sim/sim_block_attention.cpp includes this file with
// SEMISPARSE_BLOCK_ATTN_HOST_SIM defined and replays the kernels' thread -> data mapping
// with emulated ldmatrix / mma against a reference.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define BA_HD __host__ __device__ __forceinline__
#else
#define BA_HD inline
#endif

namespace semisparse::blockattn::flash {

// ------------------------------------------------------------- host + device section
constexpr int kBN = 64;                  // key tile of every kernel
constexpr int kFwdWarps = 8;             // forward: 8 warps, 128 query rows per CTA
constexpr int kFwdBM = 16 * kFwdWarps;
constexpr int kBwdWarps = 4;             // backward kernels: 4 warps
constexpr int kBwdBM = 16 * kBwdWarps;   // dq: 64 query rows per CTA; dkdv: 64-row query tiles
constexpr uint32_t kPartial = 0x80000000u;
// dkdv: query columns per sub-step (32 for D = 128 keeps the live accumulators at 2 x 64
// + 2 x 16 floats per thread)
constexpr int dkdv_qs(int D) { return D == 128 ? 32 : 64; }
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

BA_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][D] tile.
BA_HD int swz(int row, int chunk, int D) { return row * D + ((chunk ^ (row & 7)) << 3); }

struct RC {
  int row, chunk;
};
// ldmatrix.x4 row address supplied by `lane`:
//  pattern A (A operand of a 16-row tile, k chunks chunk0, chunk0 + 1; also the B operand
//  read with .trans from a [k][n] tile: rows = k, chunks = n): matrices (rows 0-7, c0),
//  (rows 8-15, c0), (rows 0-7, c0 + 1), (rows 8-15, c0 + 1) -> registers a0..a3 (resp.
//  b0, b1 of n-tile c0 and b0, b1 of n-tile c0 + 1).
BA_HD RC ldsm_rc_a(int lane, int row0, int chunk0) {
  return {row0 + (lane & 7) + 8 * ((lane >> 3) & 1), chunk0 + (lane >> 4)};
}
//  pattern Bn (B operand from an [n][k] tile, two n-tiles of 8 rows): matrices (n 0-7, c0),
//  (n 0-7, c0 + 1), (n 8-15, c0), (n 8-15, c0 + 1) -> b0, b1 of n-tile 0, b0, b1 of n-tile 1.
BA_HD RC ldsm_rc_bn(int lane, int row0, int chunk0) {
  return {row0 + (lane & 7) + 8 * (lane >> 4), chunk0 + ((lane >> 3) & 1)};
}

// The same addresses as byte offsets from one per-lane offset: for row0 % 8 == 0 and an
// even chunk0, 2 swz(ldsm_rc_*(lane, row0, chunk0)) == at(lane_off_*(lane), row0, chunk0)
// (the swizzle XORs the chunk with row & 7 == lane & 7; chunk0 only flips chunk bits above
// bit 0), so an unrolled loop needs one register per chunk0, not one per address.
BA_HD uint32_t lane_off_a(int lane, int D) {
  const RC rc = ldsm_rc_a(lane, 0, 0);
  return 2u * uint32_t(swz(rc.row, rc.chunk, D));
}
BA_HD uint32_t lane_off_bn(int lane, int D) {
  const RC rc = ldsm_rc_bn(lane, 0, 0);
  return 2u * uint32_t(swz(rc.row, rc.chunk, D));
}
BA_HD uint32_t at(uint32_t lane_off, int row0, int chunk0, int D) {
  return (lane_off ^ (uint32_t(chunk0) << 4)) + uint32_t(row0) * uint32_t(D) * 2u;
}

// Accumulator element i (0..3) of n-tile nt held by `lane`: row and column inside the
// warp's 16 x (8 NT) tile.
BA_HD int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
BA_HD int c_col(int lane, int nt, int i) { return 8 * nt + 2 * (lane & 3) + (i & 1); }

// The A fragment (16 x 16, k-step ks) taken from accumulators of a 16 x 16 KS product:
// register r packs accumulator elements (a_src_nt, a_src_i) and (a_src_nt, a_src_i + 1).
BA_HD int a_src_nt(int ks, int r) { return 2 * ks + (r >> 1); }
BA_HD int a_src_i(int r) { return 2 * (r & 1); }

// cp.async: 16-byte chunk `idx` of a [rows][D] tile copy (thread tid issues idx = tid +
// k * threads): consecutive threads take consecutive chunks of a row (coalesced).
BA_HD RC load_rc(int idx, int D) { return {idx / (D / 8), idx % (D / 8)}; }

// Block order. Forward / dq: query tiles of one (batch, head) are consecutive CTAs, last
// tile first (with causal masks the last tiles have the most work); dkdv: key tiles in
// increasing order (with causal masks the first have the most work).
struct RowTile {
  int64_t bh, tile;
};
BA_HD RowTile q_tile_of_block(int64_t bid, int64_t ntiles) { return {bid / ntiles, ntiles - 1 - bid % ntiles}; }
BA_HD RowTile k_tile_of_block(int64_t bid, int64_t ntiles) { return {bid / ntiles, bid % ntiles}; }

// Problem geometry for the work lists.
struct Geometry {
  int64_t Lq, Lk, bq, bk, nqb, nkb;
  bool causal;
};

// Pair (query tile qt of TM rows, key tile kt of TN columns) against one mask head's
// [nqb][nkb] blocks: bit 0 = active (an allowed element exists), bit 1 = partial (some
// element with query row < Lq and key column in [kt TN, kt TN + TN) is not allowed).
BA_HD uint32_t pair_info(const bool* mask, const Geometry& g, int64_t TM, int64_t TN, int64_t qt, int64_t kt) {
  const int64_t r0 = qt * TM, c0 = kt * TN;
  const int64_t r1 = r0 + TM < g.Lq ? r0 + TM : g.Lq;
  const int64_t c1 = c0 + TN < g.Lk ? c0 + TN : g.Lk;
  if (r0 >= r1 || c0 >= c1) return 0u;
  if (g.causal && c0 > r1 - 1) return 0u;
  bool any = false, full = true;
  for (int64_t qb = r0 / g.bq; qb <= (r1 - 1) / g.bq; ++qb) {
    const int64_t re = (qb + 1) * g.bq < r1 ? (qb + 1) * g.bq : r1;  // rows [.., re) of this block
    for (int64_t kb = c0 / g.bk; kb <= (c1 - 1) / g.bk; ++kb) {
      const int64_t ca = kb * g.bk > c0 ? kb * g.bk : c0;  // first column of this block
      const bool m = mask[qb * g.nkb + kb];
      full = full && m;
      if (m && (!g.causal || ca <= re - 1)) any = true;
    }
  }
  if (!any) return 0u;
  const bool partial = !full || (g.causal && c1 - 1 > r0) || (c0 + TN > g.Lk);
  return 1u | (partial ? 2u : 0u);
}

// List entry of an active pair.
BA_HD uint32_t list_entry(int64_t inner, uint32_t info) { return uint32_t(inner) | ((info & 2u) ? kPartial : 0u); }

// Mask bit of the 16 x 16 group whose first element is (query row, key col); false outside.
BA_HD bool group_bit(const bool* mask, const Geometry& g, int64_t row, int64_t col) {
  return row < g.Lq && col < g.Lk && mask[(row / g.bq) * g.nkb + col / g.bk];
}

// Element test inside a partial tile: the group's mask bit, the key inside Lk, causality.
BA_HD bool elem_ok(bool bit, int64_t q, int64_t k, int64_t Lk, bool causal) {
  return bit && k < Lk && !(causal && k > q);
}
// The same test in 32-bit tile coordinates, as the kernels evaluate it: an element at row
// rr (0..15 inside the warp's rows starting at q0 (queries) / k0 (keys)) and column cc
// (0..63 of the tile's columns starting at c0). MaskRel holds, per warp and tile:
//  forward / dq (rows = queries q0 + rr, columns = keys c0 + cc):
//    klim = clamp(Lk - c0), diff = clamp(c0 - q0): ok = cc < klim && !(causal && diff + cc > rr)
//  dkdv (rows = keys k0 + rr, columns = queries c0 + cc):
//    klim = clamp(Lk - k0) tested against rr, diff = clamp(k0 - c0): ok = rr < klim &&
//    !(causal && diff + rr > cc)
// Clamping to [-128, 128] keeps every comparison's outcome (|cc|, |rr| < 64).
BA_HD int clamp128(int64_t x) { return x < -128 ? -128 : x > 128 ? 128 : int(x); }
struct MaskRel {
  int klim, diff;
};
BA_HD MaskRel mask_rel_q(int64_t q0, int64_t c0, int64_t Lk) { return {clamp128(Lk - c0), clamp128(c0 - q0)}; }
BA_HD MaskRel mask_rel_k(int64_t k0, int64_t c0, int64_t Lk) { return {clamp128(Lk - k0), clamp128(k0 - c0)}; }
BA_HD bool elem_ok_q(bool bit, const MaskRel& m, int rr, int cc, bool causal) {
  return bit && cc < m.klim && !(causal && m.diff + cc > rr);
}
BA_HD bool elem_ok_k(bool bit, const MaskRel& m, int rr, int cc, bool causal) {
  return bit && rr < m.klim && !(causal && m.diff + rr > cc);
}

// Online softmax step for one row: m_old the running max (log2 domain, -inf at start),
// tmax this tile's max. m_use is what exp2 subtracts (0 while the row has seen no allowed
// key, so exp2(-inf - m_use) = 0, never NaN); alpha rescales the running sum and output.
struct SoftmaxStep {
  float m_new, m_use, alpha;
};
template <class Ex2>
BA_HD SoftmaxStep softmax_step(float m_old, float tmax, Ex2 ex2) {
  SoftmaxStep s;
  s.m_new = m_old > tmax ? m_old : tmax;
  s.m_use = s.m_new == -__builtin_huge_valf() ? 0.f : s.m_new;
  s.alpha = ex2(m_old - s.m_use);
  return s;
}

// Everything the fast-path kernels read (all tensors contiguous, 16-byte aligned).
struct Params {
  const void *q, *k, *v;       // [B, Hq, Lq, D], [B, Hkv, Lk, D] x2
  const bool* mask;            // [mB, mH, nqb, nkb]
  void* out;                   // forward: [B, Hq, Lq, D]
  float* lse;                  // forward: [B, Hq, Lq]
  const void *o, *go;          // backward: out, grad_out
  const float* lse_in;         // backward: lse [B, Hq, Lq]
  float *lse2, *dsum;          // backward workspace [B, Hq, Lq_pad]
  void *dq, *dk, *dv;          // backward outputs
  const int32_t* cnt;          // forward / dq: row list counts [mB mH nqt]
  const uint32_t* idx;         //   entries [mB mH nqt][nkt]
  const int32_t* tcnt;         // dkdv: transposed list counts [mB mH nkt]
  const uint32_t* tidx;        //   entries [mB mH nkt][nqt64]
  int64_t B, Hq, Hkv, Lq, Lk, Lq_pad;
  int64_t mB, mH;
  Geometry geo;
  int D;
  float scale, scale_log2;
  int is_bf16;
};

// The dkdv kernel's walk over (query head hh of the GQA group of G heads, entry n of that
// head's transposed list row for key tile kt). Start from {-1, 0, 0, nullptr}; after a
// call, hh == G means no step is left.
struct StepCursor {
  int hh, n, cnt;
  const uint32_t* list;
};
BA_HD void cursor_next(StepCursor& c, const Params& p, int64_t b, int64_t hkv, int64_t kt, int64_t nqt, int64_t nkt,
                       int G) {
  ++c.n;
  while (c.n >= c.cnt && c.hh < G) {
    if (++c.hh >= G) break;
    const int64_t h = hkv * G + c.hh;
    const int64_t lrow = ((p.mB == 1 ? 0 : b) * p.mH + (p.mH == 1 ? 0 : h)) * nkt + kt;
    c.cnt = p.tcnt[lrow];
    c.list = p.tidx + lrow * nqt;
    c.n = 0;
  }
}

// dkdv: per step, threads tid < 32 each copy 4 floats of lse2 (tid < 16) or dsum (16..31)
// rows qt 64 + stat_row(tid) into float stat_smem(tid, stage) of the stats area
// [lse2 stage 0, lse2 stage 1, dsum stage 0, dsum stage 1] x 64; column c of a stage is
// read at stat_lse(stage, c) and stat_dsum(stage, c).
BA_HD int stat_row(int tid) { return 4 * (tid & 15); }
BA_HD int stat_smem(int tid, int stage) { return ((tid < 16 ? 0 : 2) + stage) * kBwdBM + stat_row(tid); }
BA_HD int stat_lse(int stage, int c) { return stage * kBwdBM + c; }
BA_HD int stat_dsum(int stage, int c) { return (2 + stage) * kBwdBM + c; }

}  // namespace semisparse::blockattn::flash

#if !defined(SEMISPARSE_BLOCK_ATTN_HOST_SIM)
// -------------------------------------------------------------------------- device code
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/mma_sm80.cuh"

namespace semisparse::blockattn::flash {

// Host entry points (the .cu files of the fast path; they return a CUDA error code).
cudaError_t run_forward(const Params& p, cudaStream_t stream);   // block_attention_fwd_cuda.cu
cudaError_t run_backward(const Params& p, cudaStream_t stream);  // block_attention_bwd_cuda.cu
// Shared memory bytes per CTA (the front end checks the device's opt-in limit).
inline size_t fwd_smem_bytes(int D) { return size_t(kFwdBM + 4 * kBN) * D * 2; }
inline size_t dq_smem_bytes(int D) { return size_t(2 * kBwdBM + 4 * kBN) * D * 2; }
inline size_t dkdv_smem_bytes(int D) { return size_t(2 * kBN + 4 * kBwdBM) * D * 2 + 4 * kBwdBM * 4; }

namespace dev {

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

using common::ptx::cp_async16;  // (common/mma_sm80.cuh)
using common::ptx::cp_async_commit;
using common::ptx::cp_async_wait;
using common::ptx::ldsm_x4;
using common::ptx::ldsm_x4_t;
using common::ptx::smem_u32;
template <class T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  common::ptx::mma16816<T>(d, a, b0, b1);
}

using common::ptx::pack2;

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Copy rows [r0, r0 + R) of a [L][D] matrix g into a swizzled smem tile; rows >= L are
// zero-filled (g must have at least one row).
template <class T, int R, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(uint32_t s, const T* g, int64_t r0, int64_t L, int tid) {
  constexpr int kChunks = R * (D / 8);
  static_assert(kChunks % NTHREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int it = 0; it < kChunks / NTHREADS; ++it) {
    const RC rc = load_rc(tid + it * NTHREADS, D);
    const int64_t r = r0 + rc.row;
    const bool ok = r < L;
    cp_async16(s + 2u * swz(rc.row, rc.chunk, D), g + (ok ? r : 0) * D + rc.chunk * 8, ok);
  }
}

// acc[NT][4] += A (16 x D, rows arow0.. of smem tile sA) * B^T where B is NT * 8 rows
// (brow0..) of smem tile sB, both [rows][D] (k = D). la / lb: lane_off_a / lane_off_bn.
template <class T, int D, int NT>
__device__ __forceinline__ void gemm_ss(float (&acc)[NT][4], uint32_t sA, int arow0, uint32_t sB, int brow0,
                                        uint32_t la, uint32_t lb) {
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t a[4];
    ldsm_x4(a, sA + at(la, arow0, 2 * ks, D));
#pragma unroll
    for (int p = 0; p < NT / 2; ++p) {
      uint32_t b[4];
      ldsm_x4(b, sB + at(lb, brow0 + 16 * p, 2 * ks, D));
      mma<T>(acc[2 * p], a, b[0], b[1]);
      mma<T>(acc[2 * p + 1], a, b[2], b[3]);
    }
  }
}

// acc[D/8][4] += P (16 x 16 KS, accumulator fragments p[2 KS][4]) * B where B is rows
// brow0 .. brow0 + 16 KS of smem tile sB [k][D] (read with ldmatrix.trans). la: lane_off_a.
template <class T, int D, int KS>
__device__ __forceinline__ void gemm_rs(float (&acc)[D / 8][4], const float (&p)[2 * KS][4], uint32_t sB, int brow0,
                                        uint32_t la) {
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
      a[r] = pack2<T>(p[a_src_nt(ks, r)][a_src_i(r)], p[a_src_nt(ks, r)][a_src_i(r) + 1]);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b[4];
      ldsm_x4_t(b, sB + at(la, brow0 + 16 * ks, 2 * np, D));
      mma<T>(acc[2 * np], a, b[0], b[1]);
      mma<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

template <int NT>
__device__ __forceinline__ void scale_tile(float (&s)[NT][4], float f) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) s[n][i] *= f;
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;
}

// Mask bits of the 4 16-wide column groups of a 64-column tile for a warp whose 16 rows
// share one mask row: lane c < 4 tests group c; warp-uniform result in bits 0..3.
// Forward / dq: rows = queries (row fixed), groups along keys. dkdv: the transposed tile.
__device__ __forceinline__ uint32_t warp_bits(const bool* mask, const Geometry& g, int64_t row, int64_t col0,
                                              bool transposed, int lane) {
  bool bit = false;
  if (lane < 4) {
    bit = transposed ? group_bit(mask, g, col0 + 16 * lane, row) : group_bit(mask, g, row, col0 + 16 * lane);
  }
  return __ballot_sync(0xffffffffu, bit) & 0xfu;
}

// ------------------------------------------------------------------------ forward
template <class T, int D>
__global__ void __launch_bounds__(kFwdWarps * 32, D == 64 ? 2 : 1) fwd_kernel(const Params p) {
  constexpr int NT = kFwdWarps * 32;
  constexpr int DT = D / 8;  // n-tiles of the output
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK0 = sQ + 2u * kFwdBM * D;
  const uint32_t sV0 = sK0 + 2u * 2 * kBN * D;
  constexpr uint32_t kStage = 2u * kBN * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t la = lane_off_a(lane, D), lb = lane_off_bn(lane, D);
  const int64_t nqt = cdiv(p.Lq, kFwdBM), nkt = cdiv(p.Lk, kBN);
  const RowTile bt = q_tile_of_block(blockIdx.x, nqt);
  const int64_t bh = bt.bh, qt = bt.tile, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t bkv = b * p.Hkv + h / (p.Hq / p.Hkv);
  const int64_t mrow = ((p.mB == 1 ? 0 : b) * p.mH + (p.mH == 1 ? 0 : h));
  const bool* mask = p.mask + mrow * p.geo.nqb * p.geo.nkb;
  const int64_t lrow = mrow * nqt + qt;
  const int cnt = p.cnt[lrow];
  const uint32_t* list = p.idx + lrow * nkt;
  const T* q = static_cast<const T*>(p.q) + bh * p.Lq * D;
  const T* k = static_cast<const T*>(p.k) + bkv * p.Lk * D;
  const T* v = static_cast<const T*>(p.v) + bkv * p.Lk * D;

  const int64_t row0 = qt * kFwdBM + 16 * warp;  // this warp's first query row
  float acc[DT][4];
  zero(acc);
  float m_run[2] = {-__builtin_huge_valf(), -__builtin_huge_valf()};
  float l_run[2] = {0.f, 0.f};

  if (cnt > 0) {
    load_tile<T, kFwdBM, D, NT>(sQ, q, qt * kFwdBM, p.Lq, tid);
    uint32_t e = list[0];
    load_tile<T, kBN, D, NT>(sK0, k, int64_t(e & ~kPartial) * kBN, p.Lk, tid);
    load_tile<T, kBN, D, NT>(sV0, v, int64_t(e & ~kPartial) * kBN, p.Lk, tid);
    cp_async_commit();
    uint32_t e_next = cnt > 1 ? list[1] : 0u;
    for (int it = 0; it < cnt; ++it) {
      const uint32_t st = uint32_t(it & 1) * kStage;
      if (it + 1 < cnt) {
        const int64_t r = int64_t(e_next & ~kPartial) * kBN;
        load_tile<T, kBN, D, NT>(sK0 + (kStage - st), k, r, p.Lk, tid);
        load_tile<T, kBN, D, NT>(sV0 + (kStage - st), v, r, p.Lk, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      const uint32_t e_cur = e;
      e = e_next;
      if (it + 2 < cnt) e_next = list[it + 2];
      __syncthreads();

      float s[8][4];
      zero(s);
      gemm_ss<T, D, 8>(s, sQ, 16 * warp, sK0 + st, 0, la, lb);
      scale_tile(s, p.scale_log2);  // before the mask: scale may be <= 0

      const int64_t col0 = int64_t(e_cur & ~kPartial) * kBN;
      if (e_cur & kPartial) {
        const uint32_t bits = warp_bits(mask, p.geo, row0, col0, false, lane);
        const MaskRel mr = mask_rel_q(row0, col0, p.Lk);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (!elem_ok_q((bits >> (nt >> 1)) & 1u, mr, c_row(lane, i), c_col(lane, nt, i), p.geo.causal))
              s[nt][i] = -__builtin_huge_valf();
      }
      // online softmax (log2 domain), rows g (h = 0) and g + 8 (h = 1)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -__builtin_huge_valf();
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) mx = fmaxf(mx, s[nt][2 * hr + j]);
        mx = quad_max(mx);
        const SoftmaxStep ss = softmax_step(m_run[hr], mx, [](float x) { return ex2(x); });
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float e2 = ex2(s[nt][2 * hr + j] - ss.m_use);
            s[nt][2 * hr + j] = e2;
            sum += e2;
          }
        l_run[hr] = l_run[hr] * ss.alpha + sum;  // per-lane partial sum (quad-reduced at the end)
        m_run[hr] = ss.m_new;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc[dt][2 * hr] *= ss.alpha;
          acc[dt][2 * hr + 1] *= ss.alpha;
        }
      }
      gemm_rs<T, D, 4>(acc, s, sV0 + st, 0, la);
      __syncthreads();  // the next iteration's cp.async overwrites this stage
    }
  }

  // epilogue: out = acc / l (0 for rows without an allowed key), lse = m ln2 + ln l
  T* out = static_cast<T*>(p.out) + bh * p.Lq * D;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float l = quad_sum(l_run[hr]);
    const int64_t qi = row0 + c_row(lane, 2 * hr);
    if (qi < p.Lq) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int c = c_col(lane, dt, 2 * hr);
        *reinterpret_cast<uint32_t*>(out + qi * D + c) = pack2<T>(acc[dt][2 * hr] * inv, acc[dt][2 * hr + 1] * inv);
      }
      if ((lane & 3) == 0)
        p.lse[bh * p.Lq + qi] = l > 0.f ? (m_run[hr] + __log2f(l)) * kLn2 : -__builtin_huge_valf();
    }
  }
}

// ----------------------------------------------------------------------- backward
// prep: one warp per padded row (bh, i < Lq_pad)
template <class T>
__global__ void __launch_bounds__(256) bwd_prep_kernel(const Params p) {
  const int64_t rows = p.B * p.Hq * p.Lq_pad;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
    const int64_t bh = r / p.Lq_pad, i = r % p.Lq_pad;
    float ds = 0.f, l2 = __builtin_huge_valf();
    if (i < p.Lq) {
      const int64_t off = (bh * p.Lq + i) * p.D;
      const T* go = static_cast<const T*>(p.go) + off;
      const T* o = static_cast<const T*>(p.o) + off;
      for (int d = 2 * lane; d < p.D; d += 64) {
        float2 a, c;
        if constexpr (std::is_same_v<T, __half>) {
          a = __half22float2(*reinterpret_cast<const __half2*>(go + d));
          c = __half22float2(*reinterpret_cast<const __half2*>(o + d));
        } else {
          a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(go + d));
          c = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + d));
        }
        ds += a.x * c.x + a.y * c.y;
      }
#pragma unroll
      for (int o2 = 16; o2 > 0; o2 >>= 1) ds += __shfl_xor_sync(0xffffffffu, ds, o2);
      const float l = p.lse_in[bh * p.Lq + i];
      if (l != -__builtin_huge_valf()) l2 = l * kLog2e;
    }
    if (lane == 0) {
      p.dsum[r] = ds;
      p.lse2[r] = l2;
    }
  }
}

// dq: per (b, h, 64-row query tile)
template <class T, int D>
__global__ void __launch_bounds__(kBwdWarps * 32, 2) bwd_dq_kernel(const Params p) {
  constexpr int NT = kBwdWarps * 32;
  constexpr int DT = D / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sO = sQ + 2u * kBwdBM * D;  // dO
  const uint32_t sK0 = sO + 2u * kBwdBM * D;
  const uint32_t sV0 = sK0 + 2u * 2 * kBN * D;
  constexpr uint32_t kStage = 2u * kBN * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t la = lane_off_a(lane, D), lb = lane_off_bn(lane, D);
  const int64_t nqt = cdiv(p.Lq, kBwdBM), nkt = cdiv(p.Lk, kBN);
  const RowTile bt = q_tile_of_block(blockIdx.x, nqt);
  const int64_t bh = bt.bh, qt = bt.tile, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t bkv = b * p.Hkv + h / (p.Hq / p.Hkv);
  const int64_t mrow = ((p.mB == 1 ? 0 : b) * p.mH + (p.mH == 1 ? 0 : h));
  const bool* mask = p.mask + mrow * p.geo.nqb * p.geo.nkb;
  const int64_t lrow = mrow * nqt + qt;
  const int cnt = p.cnt[lrow];
  const uint32_t* list = p.idx + lrow * nkt;
  const T* q = static_cast<const T*>(p.q) + bh * p.Lq * D;
  const T* go = static_cast<const T*>(p.go) + bh * p.Lq * D;
  const T* k = static_cast<const T*>(p.k) + bkv * p.Lk * D;
  const T* v = static_cast<const T*>(p.v) + bkv * p.Lk * D;

  const int64_t row0 = qt * kBwdBM + 16 * warp;
  float lse2[2], dsum[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {  // padded buffers: rows up to Lq_pad exist
    lse2[hr] = p.lse2[bh * p.Lq_pad + row0 + c_row(lane, 2 * hr)];
    dsum[hr] = p.dsum[bh * p.Lq_pad + row0 + c_row(lane, 2 * hr)];
  }
  float acc[DT][4];
  zero(acc);

  if (cnt > 0) {
    load_tile<T, kBwdBM, D, NT>(sQ, q, qt * kBwdBM, p.Lq, tid);
    load_tile<T, kBwdBM, D, NT>(sO, go, qt * kBwdBM, p.Lq, tid);
    uint32_t e = list[0];
    load_tile<T, kBN, D, NT>(sK0, k, int64_t(e & ~kPartial) * kBN, p.Lk, tid);
    load_tile<T, kBN, D, NT>(sV0, v, int64_t(e & ~kPartial) * kBN, p.Lk, tid);
    cp_async_commit();
    uint32_t e_next = cnt > 1 ? list[1] : 0u;
    for (int it = 0; it < cnt; ++it) {
      const uint32_t st = uint32_t(it & 1) * kStage;
      if (it + 1 < cnt) {
        const int64_t r = int64_t(e_next & ~kPartial) * kBN;
        load_tile<T, kBN, D, NT>(sK0 + (kStage - st), k, r, p.Lk, tid);
        load_tile<T, kBN, D, NT>(sV0 + (kStage - st), v, r, p.Lk, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      const uint32_t e_cur = e;
      e = e_next;
      if (it + 2 < cnt) e_next = list[it + 2];
      __syncthreads();

      float s[8][4], dp[8][4];
      zero(s);
      zero(dp);
      gemm_ss<T, D, 8>(s, sQ, 16 * warp, sK0 + st, 0, la, lb);
      gemm_ss<T, D, 8>(dp, sO, 16 * warp, sV0 + st, 0, la, lb);
      scale_tile(s, p.scale_log2);
      const int64_t col0 = int64_t(e_cur & ~kPartial) * kBN;
      if (e_cur & kPartial) {
        const uint32_t bits = warp_bits(mask, p.geo, row0, col0, false, lane);
        const MaskRel mr = mask_rel_q(row0, col0, p.Lk);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            if (!elem_ok_q((bits >> (nt >> 1)) & 1u, mr, c_row(lane, i), c_col(lane, nt, i), p.geo.causal))
              s[nt][i] = -__builtin_huge_valf();
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pr = ex2(s[nt][i] - lse2[i >> 1]);
          s[nt][i] = pr * (dp[nt][i] - dsum[i >> 1]);  // dS (unscaled)
        }
      gemm_rs<T, D, 4>(acc, s, sK0 + st, 0, la);
      __syncthreads();
    }
  }
  T* dq = static_cast<T*>(p.dq) + bh * p.Lq * D;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t qi = row0 + c_row(lane, 2 * hr);
    if (qi < p.Lq) {
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int c = c_col(lane, dt, 2 * hr);
        *reinterpret_cast<uint32_t*>(dq + qi * D + c) =
            pack2<T>(acc[dt][2 * hr] * p.scale, acc[dt][2 * hr + 1] * p.scale);
      }
    }
  }
}

// dk, dv: per (b, kv head, 64-key tile); each warp owns 16 keys. The 64 queries of a
// step are processed in sub-tiles of dkdv_qs(D) columns.
template <class T, int D>
__global__ void __launch_bounds__(kBwdWarps * 32, 2) bwd_dkdv_kernel(const Params p) {
  constexpr int NT = kBwdWarps * 32;
  constexpr int DT = D / 8;
  constexpr int QS = dkdv_qs(D);  // query columns per sub-step
  constexpr int QNT = QS / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sK = smem_u32(smem);
  const uint32_t sV = sK + 2u * kBN * D;
  const uint32_t sQ0 = sV + 2u * kBN * D;
  const uint32_t sO0 = sQ0 + 2u * 2 * kBwdBM * D;
  const uint32_t sL0 = sO0 + 2u * 2 * kBwdBM * D;  // lse2 [2][64] then dsum [2][64]
  const float* fL = reinterpret_cast<const float*>(smem + (sL0 - sK));
  constexpr uint32_t kStage = 2u * kBwdBM * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const uint32_t la = lane_off_a(lane, D), lb = lane_off_bn(lane, D);
  const int64_t nqt = cdiv(p.Lq, kBwdBM), nkt = cdiv(p.Lk, kBN);
  const RowTile bt = k_tile_of_block(blockIdx.x, nkt);
  const int64_t bkv = bt.bh, kt = bt.tile, b = bkv / p.Hkv, hkv = bkv % p.Hkv;
  const int G = int(p.Hq / p.Hkv);
  const T* k = static_cast<const T*>(p.k) + bkv * p.Lk * D;
  const T* v = static_cast<const T*>(p.v) + bkv * p.Lk * D;
  const int64_t key0 = kt * kBN + 16 * warp;  // this warp's first key

  float adk[DT][4], adv[DT][4];
  zero(adk);
  zero(adv);

  StepCursor cur{-1, 0, 0, nullptr};
  cursor_next(cur, p, b, hkv, kt, nqt, nkt, G);  // first step (or cur.hh == G: none)
  auto issue = [&](const StepCursor& c, uint32_t stage) {
    const int64_t h = hkv * G + c.hh, bh = b * p.Hq + h;
    const int64_t qt = c.list[c.n] & ~kPartial;
    load_tile<T, kBwdBM, D, NT>(sQ0 + stage * kStage, static_cast<const T*>(p.q) + bh * p.Lq * D, qt * kBwdBM, p.Lq,
                                tid);
    load_tile<T, kBwdBM, D, NT>(sO0 + stage * kStage, static_cast<const T*>(p.go) + bh * p.Lq * D, qt * kBwdBM,
                                p.Lq, tid);
    if (tid < 32) {  // 16 chunks of lse2, 16 of dsum (padded buffers: always in range)
      const float* src = (tid < 16 ? p.lse2 : p.dsum) + bh * p.Lq_pad + qt * kBwdBM + stat_row(tid);
      cp_async16(sL0 + 4u * uint32_t(stat_smem(tid, int(stage))), src, true);
    }
  };
  // cursor_next leaves hh == G (and cnt == 0 for an empty first head) when there is no step
  const bool any = cur.hh < G && cur.n < cur.cnt;
  if (any) {
    load_tile<T, kBN, D, NT>(sK, k, kt * kBN, p.Lk, tid);
    load_tile<T, kBN, D, NT>(sV, v, kt * kBN, p.Lk, tid);
    issue(cur, 0);
    cp_async_commit();
    for (int it = 0; cur.hh < G; ++it) {
      const uint32_t stage = uint32_t(it & 1);
      StepCursor nxt = cur;
      cursor_next(nxt, p, b, hkv, kt, nqt, nkt, G);
      if (nxt.hh < G) {
        issue(nxt, stage ^ 1u);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      const int64_t h = hkv * G + cur.hh;
      const uint32_t e = cur.list[cur.n];
      const int64_t qcol0 = int64_t(e & ~kPartial) * kBwdBM;
      uint32_t bits = 0xfu;
      const MaskRel mr = mask_rel_k(key0, qcol0, p.Lk);
      if (e & kPartial) {
        const int64_t mrow = (p.mB == 1 ? 0 : b) * p.mH + (p.mH == 1 ? 0 : h);
        bits = warp_bits(p.mask + mrow * p.geo.nqb * p.geo.nkb, p.geo, key0, qcol0, true, lane);
      }
      const uint32_t sQ = sQ0 + stage * kStage, sO = sO0 + stage * kStage;
#pragma unroll
      for (int qs = 0; qs < kBwdBM / QS; ++qs) {
        float s[QNT][4], dp[QNT][4];
        zero(s);
        gemm_ss<T, D, QNT>(s, sK, 16 * warp, sQ, qs * QS, la, lb);  // S^T: rows keys, cols queries
        scale_tile(s, p.scale_log2);
        if (e & kPartial) {
#pragma unroll
          for (int nt = 0; nt < QNT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int qc = qs * QS + c_col(lane, nt, i);
              if (!elem_ok_k((bits >> (qc >> 4)) & 1u, mr, c_row(lane, i), qc, p.geo.causal))
                s[nt][i] = -__builtin_huge_valf();
            }
        }
#pragma unroll
        for (int nt = 0; nt < QNT; ++nt) {
          const float2 l2 = *reinterpret_cast<const float2*>(fL + stat_lse(int(stage), qs * QS + c_col(lane, nt, 0)));
#pragma unroll
          for (int i = 0; i < 4; ++i) s[nt][i] = ex2(s[nt][i] - ((i & 1) ? l2.y : l2.x));
        }
        gemm_rs<T, D, QS / 16>(adv, s, sO, qs * QS, la);  // dV += P^T dO
        zero(dp);
        gemm_ss<T, D, QNT>(dp, sV, 16 * warp, sO, qs * QS, la, lb);  // dP^T = V dO^T
#pragma unroll
        for (int nt = 0; nt < QNT; ++nt) {
          const float2 ds2 = *reinterpret_cast<const float2*>(fL + stat_dsum(int(stage), qs * QS + c_col(lane, nt, 0)));
#pragma unroll
          for (int i = 0; i < 4; ++i) s[nt][i] *= dp[nt][i] - ((i & 1) ? ds2.y : ds2.x);  // dS^T
        }
        gemm_rs<T, D, QS / 16>(adk, s, sQ, qs * QS, la);  // dK += dS^T Q
      }
      __syncthreads();
      cur = nxt;
    }
  }
  T* dk = static_cast<T*>(p.dk) + bkv * p.Lk * D;
  T* dv = static_cast<T*>(p.dv) + bkv * p.Lk * D;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int64_t kj = key0 + c_row(lane, 2 * hr);
    if (kj < p.Lk) {
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int c = c_col(lane, dt, 2 * hr);
        *reinterpret_cast<uint32_t*>(dk + kj * D + c) =
            pack2<T>(adk[dt][2 * hr] * p.scale, adk[dt][2 * hr + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv + kj * D + c) = pack2<T>(adv[dt][2 * hr], adv[dt][2 * hr + 1]);
      }
    }
  }
}

}  // namespace dev
}  // namespace semisparse::blockattn::flash
#endif  // !SEMISPARSE_BLOCK_ATTN_HOST_SIM
