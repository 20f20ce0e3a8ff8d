// The BSR linear kernels, written once over a small SIMD traits class V (V::T element type,
// V::W lanes) and included by each ISA's translation unit (generic scalar, AVX2+FMA,
// AVX-512), each compiled with its own flags. Not a public header.
//
// Forward (threads over block rows, work proportional to the stored blocks):
// * M <= 3 (decode): the stored blocks are streamed once, in memory order, against
//   per-row vector accumulators kept in an L1 buffer (forward_small);
// * otherwise (bh a multiple of the vector width): a block row is transposed into an
//   L2-resident buffer and (6 rows of x x 2 vectors of outputs) register tiles broadcast
//   x[m, j] against it, reusing each block across all rows of x (forward_bcast);
// * bh not a multiple of the vector width: dot-product tiles (forward_dot).
// GradInput: threads over block columns (CSC lists); (MR x JV vectors) tiles of grad x,
// broadcast grad_y. GradValues: threads over stored blocks; (IR x JV) tiles, sum over M.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blocksparse/bsr_linear_cpu.h"
#include "common/parallel.h"

namespace semisparse::bsr {
namespace BSR_KERNEL_NS {

// ---------------------------------------------------------------- forward
template <class V, int MR, int IR>
inline void fwd_tile(const Problem& p, int64_t r, int64_t m0, int64_t i0) {
  using T = typename V::T;
  using F = typename V::F;
  constexpr int W = V::W;
  const T* x = static_cast<const T*>(p.a);
  const T* vals = static_cast<const T*>(p.b);
  const int64_t K = p.K, bh = p.bh, bw = p.bw;
  F acc[MR][IR];
  T sacc[MR][IR];
  for (int mi = 0; mi < MR; ++mi)
    for (int ii = 0; ii < IR; ++ii) {
      acc[mi][ii] = V::zero();
      sacc[mi][ii] = T(0);
    }
  const int64_t s = p.crow[r], e = p.crow[r + 1];
  for (int64_t blk = s; blk < e; ++blk) {
    const T* bp = vals + blk * bh * bw + i0 * bw;
    const T* xp = x + m0 * K + p.col[blk] * bw;
    int64_t j = 0;
    for (; j + W <= bw; j += W) {
      F wv[IR];
      for (int ii = 0; ii < IR; ++ii) wv[ii] = V::loadu(bp + ii * bw + j);
      for (int mi = 0; mi < MR; ++mi) {
        const F xv = V::loadu(xp + mi * K + j);
        for (int ii = 0; ii < IR; ++ii) acc[mi][ii] = V::fmadd(xv, wv[ii], acc[mi][ii]);
      }
    }
    for (; j < bw; ++j)
      for (int mi = 0; mi < MR; ++mi)
        for (int ii = 0; ii < IR; ++ii) sacc[mi][ii] += xp[mi * K + j] * bp[ii * bw + j];
  }
  T* y = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  for (int mi = 0; mi < MR; ++mi)
    for (int ii = 0; ii < IR; ++ii) {
      const int64_t n = r * bh + i0 + ii;
      T v = V::hsum(acc[mi][ii]) + sacc[mi][ii];
      if (bias) v += bias[n];
      y[(m0 + mi) * p.N + n] = v;
    }
}

template <class V, int IR>
inline void fwd_tile_m(const Problem& p, int64_t r, int64_t m0, int mr, int64_t i0) {
  switch (mr) {
    case 1: fwd_tile<V, 1, IR>(p, r, m0, i0); break;
    case 2: fwd_tile<V, 2, IR>(p, r, m0, i0); break;
    case 3: fwd_tile<V, 3, IR>(p, r, m0, i0); break;
    case 4: fwd_tile<V, 4, IR>(p, r, m0, i0); break;
    case 5: fwd_tile<V, 5, IR>(p, r, m0, i0); break;
    case 6: fwd_tile<V, 6, IR>(p, r, m0, i0); break;
    case 7: fwd_tile<V, 7, IR>(p, r, m0, i0); break;
    default: fwd_tile<V, 8, IR>(p, r, m0, i0); break;
  }
}

// M <= 8 (decode): the stored blocks are streamed once, in memory order (block by block,
// row by row); the accumulators of a block row (M x bh vectors) live in a small
// thread-local buffer in L1 and are reduced once at the end of the row.
template <class V>
void forward_small(const Problem& p) {
  using T = typename V::T;
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t nbr = p.N / p.bh, M = p.M, K = p.K, bh = p.bh, bw = p.bw;
  const int64_t grain = std::max<int64_t>(1, 8 / M);
  parallel_for(0, nbr, grain, [&](int64_t ra, int64_t rb) {
    std::vector<T> accbuf(static_cast<size_t>(M * bh * W));
    std::vector<T> sacc(static_cast<size_t>(M * bh));
    const T* x = static_cast<const T*>(p.a);
    const T* vals = static_cast<const T*>(p.b);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.out);
    for (int64_t r = ra; r < rb; ++r) {
      std::fill(accbuf.begin(), accbuf.end(), T(0));
      std::fill(sacc.begin(), sacc.end(), T(0));
      T* acc = accbuf.data();
      for (int64_t blk = p.crow[r]; blk < p.crow[r + 1]; ++blk) {
        const T* bp = vals + blk * bh * bw;
        const T* xp = x + p.col[blk] * bw;
        for (int64_t i = 0; i < bh; ++i) {
          const T* wr = bp + i * bw;
          for (int64_t mi = 0; mi < M; ++mi) {
            const T* xr = xp + mi * K;
            T* ap = acc + (mi * bh + i) * W;
            F a = V::loadu(ap);
            int64_t j = 0;
            for (; j + W <= bw; j += W) a = V::fmadd(V::loadu(xr + j), V::loadu(wr + j), a);
            V::storeu(ap, a);
            if (j < bw) {
              T s = T(0);
              for (; j < bw; ++j) s += xr[j] * wr[j];
              sacc[mi * bh + i] += s;
            }
          }
        }
      }
      for (int64_t mi = 0; mi < M; ++mi)
        for (int64_t i = 0; i < bh; ++i) {
          const int64_t n = r * bh + i;
          T v = V::hsum(V::loadu(acc + (mi * bh + i) * W)) + sacc[mi * bh + i];
          if (bias) v += bias[n];
          y[mi * p.N + n] = v;
        }
    }
  });
}

// M > 8, bh a multiple of the vector width: each thread packs a block row's stored
// blocks transposed ([block][j][i], i contiguous) into a buffer that stays in L2, then
// runs (MR rows x IV vectors of output features) register tiles over all rows of x:
// broadcast x[m, j], FMA the packed weight row; no horizontal reductions.
template <class V, int MR, int IV>
inline void bc_tile(const Problem& p, const typename V::T* wt, int64_t r, int64_t m0, int64_t i0) {
  using T = typename V::T;
  using F = typename V::F;
  constexpr int W = V::W;
  const T* x = static_cast<const T*>(p.a);
  const int64_t K = p.K, bh = p.bh, bw = p.bw;
  F acc[MR][IV];
  for (int mi = 0; mi < MR; ++mi)
    for (int v = 0; v < IV; ++v) acc[mi][v] = V::zero();
  const int64_t s = p.crow[r], e = p.crow[r + 1];
  for (int64_t blk = s; blk < e; ++blk) {
    const T* wp = wt + (blk - s) * bh * bw + i0;
    const T* xp = x + m0 * K + p.col[blk] * bw;
    for (int64_t j = 0; j < bw; ++j) {
      F wv[IV];
      for (int v = 0; v < IV; ++v) wv[v] = V::loadu(wp + j * bh + v * W);
      for (int mi = 0; mi < MR; ++mi) {
        const F xb = V::set1(xp[mi * K + j]);
        for (int v = 0; v < IV; ++v) acc[mi][v] = V::fmadd(xb, wv[v], acc[mi][v]);
      }
    }
  }
  T* y = static_cast<T*>(p.out);
  const T* bias = static_cast<const T*>(p.bias);
  for (int mi = 0; mi < MR; ++mi)
    for (int v = 0; v < IV; ++v) {
      const int64_t n = r * bh + i0 + v * W;
      F a = acc[mi][v];
      if (bias) a = V::add(a, V::loadu(bias + n));
      V::storeu(y + (m0 + mi) * p.N + n, a);
    }
}

template <class V, int IV>
inline void bc_tile_m(const Problem& p, const typename V::T* wt, int64_t r, int64_t m0, int mr, int64_t i0) {
  switch (mr) {
    case 1: bc_tile<V, 1, IV>(p, wt, r, m0, i0); break;
    case 2: bc_tile<V, 2, IV>(p, wt, r, m0, i0); break;
    case 3: bc_tile<V, 3, IV>(p, wt, r, m0, i0); break;
    case 4: bc_tile<V, 4, IV>(p, wt, r, m0, i0); break;
    case 5: bc_tile<V, 5, IV>(p, wt, r, m0, i0); break;
    default: bc_tile<V, 6, IV>(p, wt, r, m0, i0); break;
  }
}

template <class V>
void forward_bcast(const Problem& p) {
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int MR = 6;
  const int64_t nbr = p.N / p.bh, bh = p.bh, bw = p.bw;
  parallel_for(0, nbr, 1, [&](int64_t ra, int64_t rb) {
    std::vector<T> wt;
    const T* vals = static_cast<const T*>(p.b);
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.out);
    for (int64_t r = ra; r < rb; ++r) {
      const int64_t s = p.crow[r], e = p.crow[r + 1];
      if (s == e) {  // empty block row: bias (or zeros)
        for (int64_t m = 0; m < p.M; ++m)
          for (int64_t i = 0; i < bh; ++i) y[m * p.N + r * bh + i] = bias ? bias[r * bh + i] : T(0);
        continue;
      }
      wt.resize(static_cast<size_t>((e - s) * bh * bw));
      for (int64_t blk = s; blk < e; ++blk) {
        const T* src = vals + blk * bh * bw;
        T* dst = wt.data() + (blk - s) * bh * bw;
        for (int64_t i0 = 0; i0 < bh; i0 += 8)  // 8 x 8 tiles
          for (int64_t j0 = 0; j0 < bw; j0 += 8) {
            const int64_t ie = std::min<int64_t>(bh, i0 + 8), je = std::min<int64_t>(bw, j0 + 8);
            for (int64_t j = j0; j < je; ++j)
              for (int64_t i = i0; i < ie; ++i) dst[j * bh + i] = src[i * bw + j];
          }
      }
      for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
        const int mr = int(std::min<int64_t>(MR, p.M - m0));
        int64_t i0 = 0;
        for (; i0 + 2 * W <= bh; i0 += 2 * W) bc_tile_m<V, 2>(p, wt.data(), r, m0, mr, i0);
        for (; i0 + W <= bh; i0 += W) bc_tile_m<V, 1>(p, wt.data(), r, m0, mr, i0);
      }
    }
  });
}

template <class V>
void forward_dot(const Problem& p);

template <class V>
void forward(const Problem& p) {
  // M <= 3 (or M <= 8 with bh not a multiple of the vector width): stream the stored blocks
  // once in memory order; otherwise transpose a block row into L2 and run register tiles
  // (measured on Zen 4: the latter wins from M = 4 on, 4096x4096, 32x32 blocks)
  if (p.M <= 3 || (p.M <= 8 && p.bh % V::W != 0)) {
    forward_small<V>(p);
    return;
  }
  if (p.bh % V::W == 0)
    forward_bcast<V>(p);
  else
    forward_dot<V>(p);
}

// M > 8 with bh not a multiple of the vector width: (4 x 4) dot-product tiles (vectorised
// along the block's columns) over chunks of 64 rows of x.
template <class V>
void forward_dot(const Problem& p) {
  const int64_t nbr = p.N / p.bh;
  const bool small = p.M <= 8;
  const int MR = small ? int(p.M) : 4;
  const int IR = small ? 2 : 4;
  const int64_t mchunk = 64;
  const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, p.M));
  parallel_for(0, nbr, grain, [&](int64_t ra, int64_t rb) {
    for (int64_t mc = 0; mc < p.M; mc += mchunk) {
      const int64_t me = std::min(p.M, mc + mchunk);
      for (int64_t r = ra; r < rb; ++r) {
        if (p.crow[r] == p.crow[r + 1]) {  // empty block row: bias (or zeros)
          for (int64_t m = mc; m < me; ++m)
            for (int64_t i = 0; i < p.bh; ++i) {
              using T = typename V::T;
              const T* bias = static_cast<const T*>(p.bias);
              static_cast<T*>(p.out)[m * p.N + r * p.bh + i] = bias ? bias[r * p.bh + i] : T(0);
            }
          continue;
        }
        for (int64_t m0 = mc; m0 < me; m0 += MR) {
          const int mr = int(std::min<int64_t>(MR, me - m0));
          int64_t i0 = 0;
          if (IR == 4)
            for (; i0 + 4 <= p.bh; i0 += 4) fwd_tile_m<V, 4>(p, r, m0, mr, i0);
          for (; i0 + 2 <= p.bh; i0 += 2) fwd_tile_m<V, 2>(p, r, m0, mr, i0);
          for (; i0 < p.bh; ++i0) fwd_tile_m<V, 1>(p, r, m0, mr, i0);
        }
      }
    }
  });
}

// ------------------------------------------------------------- grad input
template <class V, int MR, int JV>
inline void gin_tile(const Problem& p, int64_t c, int64_t m0, int64_t j0) {
  using T = typename V::T;
  using F = typename V::F;
  constexpr int W = V::W;
  const T* gy = static_cast<const T*>(p.a);
  const T* vals = static_cast<const T*>(p.b);
  const int64_t N = p.N, bh = p.bh, bw = p.bw;
  F acc[MR][JV];
  for (int mi = 0; mi < MR; ++mi)
    for (int v = 0; v < JV; ++v) acc[mi][v] = V::zero();
  for (int64_t q = p.ccol[c]; q < p.ccol[c + 1]; ++q) {
    const int64_t blk = p.cblk[q];
    const T* bp = vals + blk * bh * bw + j0;
    const T* gp = gy + m0 * N + p.rows[blk] * bh;
    for (int64_t i = 0; i < bh; ++i) {
      F wv[JV];
      for (int v = 0; v < JV; ++v) wv[v] = V::loadu(bp + i * bw + v * W);
      for (int mi = 0; mi < MR; ++mi) {
        const F g = V::set1(gp[mi * N + i]);
        for (int v = 0; v < JV; ++v) acc[mi][v] = V::fmadd(g, wv[v], acc[mi][v]);
      }
    }
  }
  T* gx = static_cast<T*>(p.out);
  for (int mi = 0; mi < MR; ++mi)
    for (int v = 0; v < JV; ++v) V::storeu(gx + (m0 + mi) * p.K + c * bw + j0 + v * W, acc[mi][v]);
}

template <class V, int JV>
inline void gin_tile_m(const Problem& p, int64_t c, int64_t m0, int mr, int64_t j0) {
  switch (mr) {
    case 1: gin_tile<V, 1, JV>(p, c, m0, j0); break;
    case 2: gin_tile<V, 2, JV>(p, c, m0, j0); break;
    case 3: gin_tile<V, 3, JV>(p, c, m0, j0); break;
    case 4: gin_tile<V, 4, JV>(p, c, m0, j0); break;
    case 5: gin_tile<V, 5, JV>(p, c, m0, j0); break;
    default: gin_tile<V, 6, JV>(p, c, m0, j0); break;
  }
}

template <class V>
void grad_input(const Problem& p) {
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int MR = 6;
  const int64_t nbc = p.K / p.bw;
  const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, p.M));
  parallel_for(0, nbc, grain, [&](int64_t ca, int64_t cb) {
    T* gx = static_cast<T*>(p.out);
    const T* gy = static_cast<const T*>(p.a);
    const T* vals = static_cast<const T*>(p.b);
    for (int64_t c = ca; c < cb; ++c) {
      for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
        const int mr = int(std::min<int64_t>(MR, p.M - m0));
        int64_t j0 = 0;
        for (; j0 + 2 * W <= p.bw; j0 += 2 * W) gin_tile_m<V, 2>(p, c, m0, mr, j0);
        for (; j0 + W <= p.bw; j0 += W) gin_tile_m<V, 1>(p, c, m0, mr, j0);
        for (; j0 < p.bw; ++j0)  // scalar tail columns
          for (int mi = 0; mi < mr; ++mi) {
            T s = T(0);
            for (int64_t q = p.ccol[c]; q < p.ccol[c + 1]; ++q) {
              const int64_t blk = p.cblk[q];
              const T* bp = vals + blk * p.bh * p.bw + j0;
              const T* gp = gy + (m0 + mi) * p.N + p.rows[blk] * p.bh;
              for (int64_t i = 0; i < p.bh; ++i) s += gp[i] * bp[i * p.bw];
            }
            gx[(m0 + mi) * p.K + c * p.bw + j0] = s;
          }
      }
    }
  });
}

// ------------------------------------------------------------ grad values
template <class V, int IR, int JV>
inline void gval_tile(const Problem& p, int64_t blk, int64_t i0, int64_t j0) {
  using T = typename V::T;
  using F = typename V::F;
  constexpr int W = V::W;
  const T* gy = static_cast<const T*>(p.a);
  const T* x = static_cast<const T*>(p.b);
  F acc[IR][JV];
  for (int ii = 0; ii < IR; ++ii)
    for (int v = 0; v < JV; ++v) acc[ii][v] = V::zero();
  const T* gp = gy + p.rows[blk] * p.bh + i0;
  const T* xp = x + p.col[blk] * p.bw + j0;
  for (int64_t m = 0; m < p.M; ++m) {
    F xv[JV];
    for (int v = 0; v < JV; ++v) xv[v] = V::loadu(xp + m * p.K + v * W);
    for (int ii = 0; ii < IR; ++ii) {
      const F g = V::set1(gp[m * p.N + ii]);
      for (int v = 0; v < JV; ++v) acc[ii][v] = V::fmadd(g, xv[v], acc[ii][v]);
    }
  }
  T* out = static_cast<T*>(p.out) + blk * p.bh * p.bw;
  for (int ii = 0; ii < IR; ++ii)
    for (int v = 0; v < JV; ++v) V::storeu(out + (i0 + ii) * p.bw + j0 + v * W, acc[ii][v]);
}

template <class V, int JV>
inline void gval_rows(const Problem& p, int64_t blk, int64_t j0) {
  int64_t i0 = 0;
  for (; i0 + 6 <= p.bh; i0 += 6) gval_tile<V, 6, JV>(p, blk, i0, j0);
  for (; i0 + 2 <= p.bh; i0 += 2) gval_tile<V, 2, JV>(p, blk, i0, j0);
  for (; i0 < p.bh; ++i0) gval_tile<V, 1, JV>(p, blk, i0, j0);
}

template <class V>
void grad_values(const Problem& p) {
  using T = typename V::T;
  constexpr int W = V::W;
  parallel_for(0, p.nnz, 1, [&](int64_t ba, int64_t bb) {
    const T* gy = static_cast<const T*>(p.a);
    const T* x = static_cast<const T*>(p.b);
    for (int64_t blk = ba; blk < bb; ++blk) {
      int64_t j0 = 0;
      for (; j0 + 2 * W <= p.bw; j0 += 2 * W) gval_rows<V, 2>(p, blk, j0);
      for (; j0 + W <= p.bw; j0 += W) gval_rows<V, 1>(p, blk, j0);
      T* out = static_cast<T*>(p.out) + blk * p.bh * p.bw;
      for (; j0 < p.bw; ++j0)
        for (int64_t i = 0; i < p.bh; ++i) {
          T s = T(0);
          const T* gp = gy + p.rows[blk] * p.bh + i;
          const T* xp = x + p.col[blk] * p.bw + j0;
          for (int64_t m = 0; m < p.M; ++m) s += gp[m * p.N] * xp[m * p.K];
          out[i * p.bw + j0] = s;
        }
    }
  });
}

template <class V>
void run(const Problem& p) {
  switch (p.op) {
    case Op::Forward: forward<V>(p); break;
    case Op::GradInput: grad_input<V>(p); break;
    case Op::GradValues: grad_values<V>(p); break;
  }
}

}  // namespace BSR_KERNEL_NS
}  // namespace semisparse::bsr
