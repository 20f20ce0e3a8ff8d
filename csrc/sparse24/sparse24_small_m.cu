// Small-M (decode) 2:4 GEMM: y[M, N] = act(x[M, K] @ W^T + bias[N]) for 1 <= M <= 16, W in
// the cutlass_sm80 or cutlass_sm90 metadata layout (meta_layout.h), fp16 / bf16 with fp32
// accumulation. Entry point gemm_small_m (sparse24_gemm.h).
//
// Written for memory bandwidth: the compressed values and the metadata are streamed from
// memory exactly once, expanded to dense 2:4 in registers and fed to the ordinary (dense)
// tensor-core mma.sync.m16n8k16 -- the tensor cores make the M <= 16 arithmetic free, so
// the kernel costs what its bytes cost.
//
// Work split
//   * A warp owns 32 consecutive weight rows (two 16-row mma tiles) and walks 64-column
//     "chunks" of K. Lane (g = lane / 4, t = lane % 4) loads, for each of its 4 rows
//     r = r0 + 16 mt + 8 h + g, the 16-byte vector of values covering columns
//     64 c + 16 t .. +15 of the chunk (8 kept values = 4 groups) and the matching 16-bit
//     code word (sm80: word (r, 4c + t); sm90: bytes (r, 8c + 2t) and (r, 8c + 2t + 1)).
//     So each warp consumes, per chunk, 32 rows x 64 B of values (whole sectors) and one
//     contiguous 128-byte sm80 meta block per 32 columns (resp. one 256-byte half of an
//     sm90 64x64 E tile): every metadata sector is read once and fully used.
//   * K is permuted inside each chunk so the data a lane loads is exactly its mma operand:
//     in mma k-step s (0..3) the k slots {2t, 2t+1, 2t+8, 2t+9} that lane t owns (for A and
//     for B alike) stand for columns 64 c + 16 t + 4 s + {0, 1, 2, 3} = group s of its
//     16-byte vector. A is that group expanded to 4 dense halves (two PRMTs whose selectors
//     come from a 16-entry shared-memory table indexed by the 4-bit code: conflict-free);
//     B is x[token][64 c + 16 t + 4 s .. +3], i.e. lane (g, t) loads 32 contiguous bytes of
//     x row g (n-tile 0) and g + 8 (n-tile 1). A dot product does not care about the order
//     of its K terms, so no shuffles are needed.
//   * A block has 8 or 16 warps = wr row groups (32 wr rows) x wk K-warps; its grid.y
//     index picks the 32 wr rows and grid.x (<= 8) the K slice. Warps of one block that
//     share a K-warp index read the same x bytes (L1 hits), so x costs 2 M / (32 wr) of
//     the value bytes in L2 traffic; wr grows with M (1, 2, 4) when N leaves enough row
//     tiles.
//   * Reduction, in a fixed order (deterministic, no atomics): each warp stores its fp32
//     accumulators to shared memory, the block sums its K-warps in index order; when the
//     grid splits K (grid.x = S > 1: sm90 only, launched as a thread-block cluster of S
//     along K) each block of the cluster then sums row slice b of all S partials, reading
//     them in rank order through distributed shared memory. The same shapes on the same
//     device always use the same split, so results are reproducible bit for bit.
//   * Epilogue in fp32: + bias[n], activation (none / relu / exact-erf gelu / silu), one
//     rounding to the output dtype; stores are coalesced along N.
//   * Loads in flight: each warp iteration issues the loads of kU = 2 chunks (8 x 16 B of
//     values, 8 code words, the x of n-tile 0) before any math; 8-warp blocks at <= 128
//     registers run 2 per SM, i.e. ~64 KB of values in flight per SM.
//
// Dense mma.sync on the expanded tile, not mma.sp: the sparse tensor-core path would halve
// tensor work that is not the bottleneck here, and the expansion keeps every operand in the
// well-documented dense fragment layout (checked by the host simulation). Like a dense GEMM
// on decompress(W), a pruned position meets x as 0 * x, so an inf / NaN in x propagates
// into every output row (a gather-only CPU kernel would skip it).
//
// Index math that is not CUDA-specific lives in the host+device section below (guarded so
// a host program can include this file with SEMISPARSE_SMALL_M_HOST_SIM defined and check
// the thread -> (row, column, meta address) mapping against meta_layout.h).
#include <cstdint>

#include "sparse24/meta_layout.h"
#include "sparse24/sparse24_gemm.h"

namespace semisparse::sparse24::small_m {

// --------------------------------------------------------------- host + device index math
constexpr int kChunkCols = 64;    // K columns per chunk (one warp step)
constexpr int kRowsPerWarp = 32;  // two 16-row mma tiles
constexpr int kU = 2;             // chunks loaded per warp iteration (loads in flight)
constexpr int kMaxWarps = 16;
constexpr int kMaxCluster = 8;    // portable thread-block cluster size (sm90)

// Index, in 16-bit units of the meta buffer, of the code word of row r, columns
// 64 c + 16 t .. +15 (t in 0..3): base(r, t) + c * meta_step16(N).
//  sm80: int16 word (r, 4 c + t); the word index moves by 2 * (2 N) when c grows by 1.
//  sm90: bytes (r, 8 c + 2 t) (low byte) and (r, 8 c + 2 t + 1) (high byte), an aligned pair;
//        the byte index moves by 8 N (one 64-column E tile column of the matrix) per chunk.
SEMISPARSE_HD int64_t meta_base16(MetaLayout layout, int64_t r, int t, int64_t n) {
  return layout == MetaLayout::kSm80 ? sm80_meta_word(r, t, n) : sm90_meta_byte(r, 2 * t, n) / 2;
}
SEMISPARSE_HD int64_t meta_step16(int64_t n) { return 4 * n; }

// Element offset of the 16-byte value vector (8 values) of row r, chunk c, lane column t.
SEMISPARSE_HD int64_t values_offset(int64_t r, int64_t c, int t, int64_t k) {
  return r * (k / 2) + 32 * c + 8 * t;
}
// Element offset of the 16 x entries (columns 64 c + 16 t .. +15) of token m.
SEMISPARSE_HD int64_t x_offset(int64_t m, int64_t c, int t, int64_t k) { return m * k + 64 * c + 16 * t; }

// First chunk of K slice b of s slices over q chunks.
SEMISPARSE_HD int64_t slice_begin(int64_t b, int64_t s, int64_t q) { return (b * q) / s; }

// PRMT selectors that expand one group: the 32-bit word holding the group's two kept
// values (a: low half, at position i0; b: high half, at position i1) becomes the dense
// halves (p0, p1) (lo) and (p2, p3) (hi). Position p takes b if p == i1, else a if
// p == i0, else +0 -- the same rule as the CPU decompress, so any code decodes alike.
struct Selectors {
  uint32_t lo, hi;
};
SEMISPARSE_HD uint32_t half_selector(unsigned p, unsigned i0, unsigned i1) {
  return p == i1 ? 0x32u : p == i0 ? 0x10u : 0x44u;  // bytes 2,3 (b) / 0,1 (a) / 4,4 (zero)
}
SEMISPARSE_HD Selectors expand_selectors(unsigned code) {
  const unsigned i0 = code & 3u, i1 = (code >> 2) & 3u;
  return {half_selector(0, i0, i1) | half_selector(1, i0, i1) << 8,
          half_selector(2, i0, i1) | half_selector(3, i0, i1) << 8};
}

// __byte_perm (PTX prmt, default mode); the host version serves the simulation.
SEMISPARSE_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  // raw prmt: __byte_perm would first mask the selector (an extra LOP3 per call)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
#else
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned n = (sel >> (4 * i)) & 7u;  // sign-replicate bit never set here
    r |= static_cast<uint32_t>((src >> (8 * n)) & 0xffu) << (8 * i);
  }
  return r;
#endif
}

SEMISPARSE_HD uint32_t word_of(const uint4& v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

// The selector table: 16 entries of 8 bytes (lo, hi selectors of a code). On the device it
// sits in shared memory at a 128-byte aligned address, so entry (code of group s of word
// mw) is at base | lut_offset(mw, s): one shift and one LOP3 per lookup.
SEMISPARSE_HD uint32_t lut_offset(uint32_t mw, int s) {
  return (s == 0 ? mw << 3 : mw >> (4 * s - 3)) & 0x78u;
}
struct Lut {
#if defined(__CUDA_ARCH__)
  uint32_t base;  // shared-window address
#else
  const uint2* table;
#endif
};
SEMISPARSE_HD uint2 lut_get(const Lut& lut, uint32_t mw, int s) {
#if defined(__CUDA_ARCH__)
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(lut.base | lut_offset(mw, s)));
  return v;
#else
  return lut.table[lut_offset(mw, s) >> 3];
#endif
}

// mma.m16n8k16 A fragment of k-step s for one 16-row tile: va[h] / mw[h] are the value
// vector and code word of tile row g + 8 h. a[0] = (row g, k slots 2t, 2t+1),
// a[1] = (row g+8, same k), a[2] = (row g, k 2t+8, 2t+9), a[3] = (row g+8, same k); the
// four slots stand for columns 16 t + 4 s + 0 .. 3, so they are group s expanded.
SEMISPARSE_HD void a_fragment(const uint4 (&va)[2], const uint32_t (&mw)[2], int s, const Lut& lut,
                              uint32_t (&a)[4]) {
  for (int h = 0; h < 2; ++h) {
    const uint2 sel = lut_get(lut, mw[h], s);
    const uint32_t v = word_of(va[h], s);
    a[h] = byte_perm(v, 0u, sel.x);
    a[2 + h] = byte_perm(v, 0u, sel.y);
  }
}

// B fragment of k-step s for token g: b0 = k slots 2t, 2t+1 (x columns 16 t + 4 s + 0, 1),
// b1 = k slots 2t+8, 2t+9 (columns 16 t + 4 s + 2, 3); xa = the lane's 32 bytes of x.
SEMISPARSE_HD void b_fragment(const uint4 (&xa)[2], int s, uint32_t& b0, uint32_t& b1) {
  b0 = word_of(xa[s >> 1], 2 * (s & 1));
  b1 = word_of(xa[s >> 1], 2 * (s & 1) + 1);
}

// Chunk range of K slice b (of s_n) and the warp loop's bounds: full chunks (all 64
// columns inside K) end at ce_full; lane column t's 16 columns exist for chunks < lane_end.
struct SliceBounds {
  int cb, ce, ce_full;
};
SEMISPARSE_HD SliceBounds slice_bounds(int b, int s_n, int64_t k) {
  const int q = static_cast<int>((k + kChunkCols - 1) / kChunkCols);
  const int cb = static_cast<int>(slice_begin(b, s_n, q)), ce = static_cast<int>(slice_begin(b + 1, s_n, q));
  const int full = static_cast<int>(k / kChunkCols);
  return {cb, ce, ce < full ? ce : full};
}
SEMISPARSE_HD int lane_chunk_end(int ce, int64_t k, int t) {
  const int e = static_cast<int>((k - 16 * t + kChunkCols - 1) / kChunkCols);
  return ce < e ? ce : e;
}

// The launch shape. wr row groups of 32 rows and warps / wr K-warps per block; s K slices
// (a cluster of s blocks along grid.x; s > 1 only with cluster support); row_tiles blocks
// along grid.y.
struct Config {
  int wr = 1, warps = 8, s = 1;
  int64_t row_tiles = 0;
};

inline Config choose_config(int64_t m, int64_t n, int64_t k, int sms, bool cluster_ok) {
  const int64_t q = (k + kChunkCols - 1) / kChunkCols;
  const int64_t target = 2 * static_cast<int64_t>(sms);  // two resident blocks per SM
  const int smax = cluster_ok ? kMaxCluster : 1;
  auto tiles = [&](int wr) { return (n + kRowsPerWarp * wr - 1) / (kRowsPerWarp * wr); };
  Config c;
  // more rows per block share each x load (x traffic ~ 2 M / (32 wr) of the value bytes),
  // as long as N still gives at least one block per SM
  c.wr = m <= 4 ? 1 : m <= 8 ? 2 : 4;
  while (c.wr > 1 && tiles(c.wr) * smax < sms) c.wr /= 2;
  c.row_tiles = tiles(c.wr);
  const int64_t wk = c.warps / c.wr;
  // split K over a cluster (up to ~2 blocks per SM) while every K-warp keeps a chunk
  while (c.s < smax && c.row_tiles * (2 * c.s) <= target && q / (2 * c.s) >= wk) c.s *= 2;
  // few blocks: give each more warps (more bytes in flight per SM) if K has work for them
  if (c.row_tiles * c.s < sms && q / c.s >= (kMaxWarps / c.wr) * kU) c.warps = kMaxWarps;
  return c;
}

inline int tokens_for(int64_t m) { return m <= 8 ? 8 : 16; }

// floats of dynamic shared memory: per K-warp, tokens x (32 wr + 4) partial sums (the +4
// pad keeps the fragment stores free of bank conflicts)
inline int64_t smem_floats(const Config& c, int64_t m) {
  const int64_t wk = c.warps / c.wr;
  return wk * tokens_for(m) * (kRowsPerWarp * c.wr + 4);
}

}  // namespace semisparse::sparse24::small_m

#if !defined(SEMISPARSE_SMALL_M_HOST_SIM)
// ------------------------------------------------------------------------- device code
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/mma_sm80.cuh"

#include <torch/headeronly/util/Exception.h>

namespace semisparse::sparse24::small_m {
namespace {

struct Params {
  const void* x;
  const void* values;
  const void* meta;
  const void* bias;
  void* y;
  int64_t m, n, k;
  int wr;
  int act;
};

using common::ptx::from_f32;  // (common/mma_sm80.cuh)
using common::ptx::to_f32;
using common::ptx::mma16816;  // (common/mma_sm80.cuh)

// Values are read once: skip L1, and ask L2 to fetch the surrounding 256 bytes (the rest of
// the row segment is read by the neighbouring chunks of this block).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case static_cast<int>(Activation::kRelu): return v < 0.f ? 0.f : v;  // NaN stays NaN
    case static_cast<int>(Activation::kGelu): return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case static_cast<int>(Activation::kSilu): return v / (1.f + expf(-v));
    default: return v;
  }
}

__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#endif
}

__device__ __forceinline__ const float* cluster_smem(const float* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<const float*>(__cluster_map_shared_rank(p, rank));
#else
  return p;
#endif
}

// Per-lane pointers of one warp at its current chunk: the 16-byte value vectors of its 4
// rows, their code words, and the 32 bytes of x of its tokens.
template <int NT>
struct LanePtrs {
  const uint4* v[2][2];
  const uint16_t* m[2][2];
  const uint4* x[NT];
};

// kU chunks starting at the chunk the pointers are at: all loads first (independent, so
// they are in flight together), then 4 k-steps x 2 m-tiles x NT mma per chunk.
// kPred: the last, partial iteration -- chunk u exists only if u < live (warp-uniform) and
// the lane's 16 columns exist only if u < lane_live (K % 64 == 32); absent data is zero.
template <class T, int NT, bool kPred>
__device__ __forceinline__ void warp_step(const LanePtrs<NT>& ptr, int64_t mstep, int live, int lane_live,
                                          const bool (&tok_ok)[NT], const Lut& lut, float (&acc)[2][NT][4]) {
  // x of the second n-tile (M > 8) is loaded per chunk, just before use: it is L1/L2
  // resident, and holding it for all kU chunks would cost 16 more registers
  constexpr int kXU = NT == 1 ? kU : 1;
  uint4 va[kU][2][2];
  uint32_t mw[kU][2][2];
  uint4 xa[kXU][NT][2];
  const uint4 zero = make_uint4(0, 0, 0, 0);
  auto load_x = [&](int u, uint4 (&dst)[NT][2]) {
    const bool ok = !kPred || u < lane_live;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const bool xok = ok && tok_ok[nt];
      dst[nt][0] = xok ? __ldg(ptr.x[nt] + 8 * u) : zero;
      dst[nt][1] = xok ? __ldg(ptr.x[nt] + 8 * u + 1) : zero;
    }
  };
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const bool ok = !kPred || u < lane_live;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        va[u][mt][h] = ok ? load_stream(ptr.v[mt][h] + 4 * u) : zero;
        mw[u][mt][h] = ok ? static_cast<uint32_t>(__ldg(ptr.m[mt][h] + u * mstep)) : 0u;
      }
    if constexpr (kXU == kU) load_x(u, xa[u]);
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    if (kPred && u >= live) break;  // warp-uniform
    const int ux = kXU == kU ? u : 0;
    if constexpr (kXU != kU) load_x(u, xa[0]);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      uint32_t a[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) a_fragment(va[u][mt], mw[u][mt], s, lut, a[mt]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b0, b1;
        b_fragment(xa[ux][nt], s, b0, b1);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) mma16816<T>(acc[mt][nt], a[mt], b0, b1);
      }
    }
  }
}

// NT: mma n-tiles of 8 tokens (1 for M <= 8, 2 for M <= 16).
template <class T, MetaLayout L, int NT>
__global__ void __launch_bounds__(kMaxWarps * 32) small_m_kernel(const Params p) {
  extern __shared__ float red[];
  __shared__ __align__(128) uint2 lut_table[16];

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if (gridDim.x != 1) __trap();  // K slices need clusters (sm90); the host never asks here
#endif

  const int tid = threadIdx.x;
  if (tid < 16) {
    const Selectors s = expand_selectors(static_cast<unsigned>(tid));
    lut_table[tid] = make_uint2(s.lo, s.hi);
  }
  __syncthreads();
  const Lut lut{static_cast<uint32_t>(__cvta_generic_to_shared(lut_table))};

  constexpr int kTok = 8 * NT;
  const int nwarps = blockDim.x >> 5;
  const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wr_n = p.wr, wk_n = nwarps / wr_n;
  const int wr = warp % wr_n, wk = warp / wr_n;
  const int rb = kRowsPerWarp * wr_n, ld = rb + 4;
  const int64_t n = p.n, k = p.k, m = p.m;
  const int64_t tile_row0 = static_cast<int64_t>(blockIdx.y) * rb;
  const int64_t r0 = tile_row0 + kRowsPerWarp * wr;
  const int s_n = gridDim.x, b = blockIdx.x;
  // chunks [cb, ce) of this K slice; those below ce_full lie wholly inside K (all but a
  // trailing half chunk when K % 64 == 32); this lane's 16 columns exist below ce_lane
  const SliceBounds sb = slice_bounds(b, s_n, k);
  const int cb = sb.cb, ce = sb.ce, ce_full = sb.ce_full;
  const int ce_lane = lane_chunk_end(ce, k, t);

  float acc[2][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  if (r0 < n) {  // warp-uniform; n % 32 == 0, so a valid group has 32 valid rows
    const T* values = static_cast<const T*>(p.values);
    const uint16_t* meta = static_cast<const uint16_t*>(p.meta);
    const T* x = static_cast<const T*>(p.x);
    const int64_t mstep = meta_step16(n);
    int c = cb + wk * kU;
    const int cstride = wk_n * kU;

    LanePtrs<NT> ptr;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = r0 + 16 * mt + 8 * h + g;
        ptr.v[mt][h] = reinterpret_cast<const uint4*>(values + values_offset(r, c, t, k));
        ptr.m[mt][h] = meta + meta_base16(L, r, t, n) + c * mstep;
      }
    bool tok_ok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int64_t tok = 8 * nt + g;
      tok_ok[nt] = tok < m;
      ptr.x[nt] = reinterpret_cast<const uint4*>(x + x_offset(tok_ok[nt] ? tok : 0, c, t, k));
    }
    const int64_t vstride = 4 * static_cast<int64_t>(cstride), xstride = 8 * static_cast<int64_t>(cstride);
    const int64_t mstride = mstep * cstride;

    for (; c + kU <= ce_full; c += cstride) {
      warp_step<T, NT, false>(ptr, mstep, kU, kU, tok_ok, lut, acc);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          ptr.v[mt][h] += vstride;
          ptr.m[mt][h] += mstride;
        }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) ptr.x[nt] += xstride;
    }
    // at most one partial iteration remains (cstride >= kU)
    if (c < ce) warp_step<T, NT, true>(ptr, mstep, ce - c, ce_lane - c, tok_ok, lut, acc);
  }

  // ---- reduction: warps -> shared memory (slab wk), fixed-order sum over K-warps
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = kRowsPerWarp * wr + 16 * mt + g + 8 * (i >> 1);
        const int tok = 8 * nt + 2 * t + (i & 1);
        red[(wk * kTok + tok) * ld + row] = acc[mt][nt][i];
      }
  __syncthreads();

  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int mi = static_cast<int>(m);
  for (int idx = tid; idx < mi * rb; idx += blockDim.x) {
    const int tok = idx / rb, row = idx - tok * rb;
    float sum = 0.f;
    for (int w = 0; w < wk_n; ++w) sum += red[(w * kTok + tok) * ld + row];
    if (s_n == 1) {
      const int64_t rg = tile_row0 + row;
      if (rg < n) {
        float v = sum;
        if (bias) v += to_f32(bias[rg]);
        y[tok * n + rg] = from_f32<T>(activate(v, p.act));
      }
    } else {
      red[tok * ld + row] = sum;  // this thread's own element of slab 0
    }
  }
  if (s_n == 1) return;

  // ---- K slices of one cluster: block b finishes rows [b rb/S, (b+1) rb/S) of the tile
  cluster_sync_all();
  const int rows_per = rb / s_n;
  for (int idx = tid; idx < mi * rows_per; idx += blockDim.x) {
    const int tok = idx / rows_per, row = b * rows_per + (idx - tok * rows_per);
    float sum = 0.f;
    for (int src = 0; src < s_n; ++src) sum += cluster_smem(red, static_cast<unsigned>(src))[tok * ld + row];
    const int64_t rg = tile_row0 + row;
    if (rg < n) {
      float v = sum;
      if (bias) v += to_f32(bias[rg]);
      y[tok * n + rg] = from_f32<T>(activate(v, p.act));
    }
  }
  cluster_sync_all();  // keep this block's shared memory alive until every peer has read it
}

// ------------------------------------------------------------------------ host side
struct DeviceInfo {
  int sms = 0;
  int cc_major = 0;
};

DeviceInfo device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];  // filled once per device; races write equal values
  if (device >= 0 && device < kMaxDevices && cache[device].sms > 0) return cache[device];
  DeviceInfo d;
  if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || d.sms <= 0 ||
      cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return DeviceInfo{132, 0};  // unknown: assume many SMs, no clusters
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = d;
  return d;
}

template <class T, MetaLayout L, int NT>
cudaError_t launch(const Params& prm, const Config& c, size_t smem, cudaStream_t stream) {
  auto kernel = small_m_kernel<T, L, NT>;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(c.s), static_cast<unsigned>(c.row_tiles), 1);
  cfg.blockDim = dim3(static_cast<unsigned>(32 * c.warps), 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(c.s);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = c.s > 1 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, prm);
}

// Whether the image of this kernel that runs on the device has the cluster code (sm_90a
// cubin): a device of compute capability >= 9 running the compute_80 PTX does not.
template <class T, MetaLayout L, int NT>
bool cluster_capable(int device, const DeviceInfo& d) {
  if (d.cc_major < 9) return false;
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices];  // 0 unknown, 1 yes, 2 no (per instantiation)
  if (device >= 0 && device < kMaxDevices && cache[device] != 0) return cache[device] == 1;
  cudaFuncAttributes fa{};
  bool ok = cudaFuncGetAttributes(&fa, small_m_kernel<T, L, NT>) == cudaSuccess && fa.ptxVersion >= 90;
  if (!ok) (void)cudaGetLastError();
  if (device >= 0 && device < kMaxDevices) cache[device] = ok ? 1 : 2;
  return ok;
}

template <class T, MetaLayout L, int NT>
void run(const GemmArgs& a) {
  const DeviceInfo d = device_info(a.device);
  const bool cl = cluster_capable<T, L, NT>(a.device, d);
  Config c = choose_config(a.m, a.n, a.k, d.sms, cl);
  Params prm{a.x, a.values, a.meta, a.bias, a.y, a.m, a.n, a.k, c.wr, static_cast<int>(a.act)};
  size_t smem = static_cast<size_t>(smem_floats(c, a.m)) * sizeof(float);
  cudaError_t err = launch<T, L, NT>(prm, c, smem, a.stream);
  if (err != cudaSuccess && c.s > 1) {
    // the cluster could not be scheduled on this device: run the K range in one block
    (void)cudaGetLastError();
    c = choose_config(a.m, a.n, a.k, d.sms, false);
    prm.wr = c.wr;
    smem = static_cast<size_t>(smem_floats(c, a.m)) * sizeof(float);
    err = launch<T, L, NT>(prm, c, smem, a.stream);
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "semisparse: sparse24 small-M GEMM launch failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

template <class T, MetaLayout L>
void run_tokens(const GemmArgs& a) {
  if (a.m <= 8)
    run<T, L, 1>(a);
  else
    run<T, L, 2>(a);
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace semisparse::sparse24::small_m

namespace semisparse::sparse24 {

const char* gemm_small_m(const GemmArgs& a, MetaLayout layout) {
  using namespace small_m;
  if (layout != MetaLayout::kSm80 && layout != MetaLayout::kSm90)
    return "small-M kernel: meta layout must be cutlass_sm80 or cutlass_sm90";
  if (a.m < 1) return "small-M kernel: needs M >= 1";
  if (a.m > kSmallMMax) return "small-M kernel: needs M <= 16";
  if (a.n <= 0 || a.k <= 0) return "small-M kernel: needs N > 0 and K > 0";
  if (layout == MetaLayout::kSm80 && (a.n % kSm80RowMultiple != 0 || a.k % kSm80ColMultiple != 0))
    return "small-M kernel: layout cutlass_sm80 needs N % 32 == 0 and K % 32 == 0";
  if (layout == MetaLayout::kSm90 && (a.n % kSm90RowMultiple != 0 || a.k % kSm90ColMultiple != 0))
    return "small-M kernel: layout cutlass_sm90 needs N % 64 == 0 and K % 64 == 0";
  if (!a.x || !a.values || !a.meta || !a.y) return "small-M kernel: null x, values, meta or y pointer";
  if (!aligned(a.x, 16) || !aligned(a.values, 16))
    return "small-M kernel: x and values must be 16-byte aligned";
  if (!aligned(a.meta, 2) || !aligned(a.y, 2) || (a.bias && !aligned(a.bias, 2)))
    return "small-M kernel: meta, y and bias must be 2-byte aligned";
  if ((a.n + kRowsPerWarp - 1) / kRowsPerWarp > 65535) return "small-M kernel: N too large (grid.y limit)";
  if (a.dtype == GemmDType::kF16) {
    if (layout == MetaLayout::kSm80)
      run_tokens<__half, MetaLayout::kSm80>(a);
    else
      run_tokens<__half, MetaLayout::kSm90>(a);
  } else {
    if (layout == MetaLayout::kSm80)
      run_tokens<__nv_bfloat16, MetaLayout::kSm80>(a);
    else
      run_tokens<__nv_bfloat16, MetaLayout::kSm90>(a);
  }
  return nullptr;
}

}  // namespace semisparse::sparse24
#endif  // !SEMISPARSE_SMALL_M_HOST_SIM
