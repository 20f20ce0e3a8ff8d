// Host checks of pack_kernels.cuh (used by sparse24_pack_cuda.cu):
//  * sm80_word_coords / sm90_pair_coords are the exact inverses of sm80_meta_word /
//    sm90_meta_byte: every storage unit q maps to one (row, 16-col chunk) and back;
//  * pack_group's prune rule equals an independent float reference (sort by |v|, NaN
//    lowest, ties to the lower index) on fp16 / bf16 / fp32 / fp64 groups with zeros of both
//    signs, infinities, NaNs and ties; the non-prune path equals kCodeFromMask compress;
//  * the kernels' loops (storage-order units -> rows/cols) replayed on the host give the
//    same values/meta as a straightforward reference pack into each layout, and unpack
//    returns dense * mask with +0 at pruned positions.
#include "sparse24/pack_kernels.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace semisparse::sparse24;
using namespace semisparse::sparse24::pack;

#include "sim_check.h"

// ---- float views of raw bits (independent of the kernel's integer tricks)
static double f16_val(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 31) v = m ? NAN : INFINITY;
  else if (e == 0) v = std::ldexp(double(m), -24);
  else v = std::ldexp(double(m + 1024), e - 25);
  return s ? -v : v;
}
static double bf16_val(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static double f32_val(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static double f64_val(uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

enum class Fmt { F16, BF16, F32, F64 };
template <class T>
static double value_of(T bits, Fmt f) {
  switch (f) {
    case Fmt::F16: return f16_val(uint16_t(bits));
    case Fmt::BF16: return bf16_val(uint16_t(bits));
    case Fmt::F32: return f32_val(uint32_t(bits));
    default: return f64_val(uint64_t(bits));
  }
}
static uint64_t inf_of(Fmt f) {
  switch (f) {
    case Fmt::F16: return 0x7c00;
    case Fmt::BF16: return 0x7f80;
    case Fmt::F32: return 0x7f800000u;
    default: return 0x7ff0000000000000ull;
  }
}

// reference prune: keep the 2 largest |v|, NaN lowest, ties to the lower index
template <class T>
static unsigned ref_keep(const T e[4], Fmt f) {
  int idx[4] = {0, 1, 2, 3};
  auto key = [&](int i) {
    const double v = value_of(e[i], f);
    return std::isnan(v) ? -1.0 : std::fabs(v);
  };
  std::stable_sort(idx, idx + 4, [&](int a, int b) { return key(a) > key(b); });
  return (1u << idx[0]) | (1u << idx[1]);
}

// reference encode of a (masked) group: kCodeFromMask of the non-zero mask
template <class T>
static unsigned ref_pack(const T in[4], bool prune, Fmt f, T& v0, T& v1) {
  T e[4] = {in[0], in[1], in[2], in[3]};
  if (prune) {
    const unsigned keep = ref_keep(in, f);
    for (int i = 0; i < 4; ++i)
      if (!(keep >> i & 1)) e[i] = 0;
  }
  unsigned mask = 0;
  for (int i = 0; i < 4; ++i) mask |= unsigned(value_of(e[i], f) != 0.0 || std::isnan(value_of(e[i], f))) << i;
  const unsigned code = kCodeFromMask[mask];
  const T a = e[code & 3], b = e[code >> 2];
  v0 = (value_of(a, f) == 0.0) ? T(0) : a;
  v1 = (value_of(b, f) == 0.0) ? T(0) : b;
  return code;
}

template <class T>
static T random_entry(std::mt19937_64& rng, Fmt f) {
  // a small pool with ties, both zeros, infinities and NaNs
  static const double pool[] = {0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5, 3.0, -3.0, INFINITY, -INFINITY, NAN};
  const int pick = int(rng() % 14);
  if (pick >= 12) {  // random bits (any value, incl. other NaNs / subnormals)
    T bits = T(rng());
    return bits;
  }
  const double d = pool[pick];
  uint64_t out = 0;
  if (f == Fmt::F64) {
    std::memcpy(&out, &d, 8);
    if (std::isnan(d)) out = 0x7ff8000000000001ull | (rng() & 1 ? 0x8000000000000000ull : 0);
  } else {
    float fl = float(d);
    uint32_t u;
    std::memcpy(&u, &fl, 4);
    if (std::isnan(d)) u = 0x7fc00001u | (rng() & 1 ? 0x80000000u : 0);
    if (f == Fmt::F32) out = u;
    else if (f == Fmt::BF16) out = u >> 16;
    else {  // f16 of these exact values
      const uint32_t sign = (u >> 16) & 0x8000;
      if (std::isnan(d)) out = sign | 0x7e01;
      else if (std::isinf(d)) out = sign | 0x7c00;
      else if (d == 0.0) out = sign;
      else {
        const int e = int((u >> 23) & 0xff) - 127 + 15;
        out = sign | uint32_t(e) << 10 | ((u >> 13) & 0x3ff);
      }
    }
  }
  return T(out);
}

template <class T>
static void check_groups(Fmt f, const char* name) {
  std::mt19937_64 rng(42);
  const T inf = T(inf_of(f));
  for (int it = 0; it < 400000; ++it) {
    T e[4];
    for (auto& x : e) x = random_entry<T>(rng, f);
    for (bool prune : {false, true}) {
      T v0, v1, r0, r1;
      const unsigned code = pack_group(e[0], e[1], e[2], e[3], prune, inf, v0, v1);
      const unsigned rcode = ref_pack(e, prune, f, r0, r1);
      CHECK(code == rcode && v0 == r0 && v1 == r1, "%s prune=%d: code %u vs %u", name, prune, code, rcode);
      if (prune) {
        CHECK(keep_mask(e[0], e[1], e[2], e[3], inf) == ref_keep(e, f), "%s keep mask", name);
        // unpack gives dense * mask, +0 at every other position
        T out[4];
        unpack_group(v0, v1, code, out);
        const unsigned keep = ref_keep(e, f);
        for (int i = 0; i < 4; ++i) {
          const bool kept_nz = (keep >> i & 1) && (value_of(e[i], f) != 0.0 || std::isnan(value_of(e[i], f)));
          const T want = kept_nz ? e[i] : T(0);
          CHECK(out[i] == want, "%s unpack position %d", name, i);
        }
      }
    }
  }
  std::printf("groups %s: checked\n", name);
}

// ---- layouts: inverse placements
static void check_inverse(int64_t N, int64_t K) {
  std::vector<int> seen80(N * K / 16, 0), seen90(N * K / 16, 0);
  for (int64_t q = 0; q < N * K / 16; ++q) {
    const RowChunk a = sm80_word_coords(q, N);
    CHECK(a.r >= 0 && a.r < N && a.c >= 0 && a.c < K / 16, "sm80 coords range");
    CHECK(sm80_meta_word(a.r, a.c, N) == q, "sm80 inverse q=%lld", (long long)q);
    seen80[a.r * (K / 16) + a.c]++;
    if (N % 64 == 0 && K % 64 == 0) {
      const RowChunk b = sm90_pair_coords(q, N);
      CHECK(b.r >= 0 && b.r < N && b.c >= 0 && b.c < K / 16, "sm90 coords range");
      CHECK(sm90_meta_byte(b.r, 2 * b.c, N) == 2 * q && sm90_meta_byte(b.r, 2 * b.c + 1, N) == 2 * q + 1,
            "sm90 inverse q=%lld", (long long)q);
      seen90[b.r * (K / 16) + b.c]++;
    }
  }
  for (size_t i = 0; i < seen80.size(); ++i) CHECK(seen80[i] == 1, "sm80 unit visited %d times", seen80[i]);
  if (N % 64 == 0 && K % 64 == 0)
    for (size_t i = 0; i < seen90.size(); ++i) CHECK(seen90[i] == 1, "sm90 unit visited %d times", seen90[i]);
}

// ---- replay the kernels' loops and compare with a reference pack
template <class T>
static void check_layout_pack(MetaLayout l, int64_t N, int64_t K, Fmt f, bool prune, std::mt19937_64& rng) {
  std::vector<T> dense(N * K);
  for (auto& x : dense) x = random_entry<T>(rng, f);
  const T inf = T(inf_of(f));
  // reference: row-major walk, forward placement
  std::vector<T> rv(N * K / 2);
  const int64_t meta_bytes = l == MetaLayout::kCpu ? N * ((K + 7) / 8) : N * K / 8;
  std::vector<uint8_t> rm(meta_bytes, 0);
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      const unsigned code = ref_pack(&dense[r * K + 4 * g], prune, f, rv[r * K / 2 + 2 * g], rv[r * K / 2 + 2 * g + 1]);
      int64_t byte;
      int shift;
      if (l == MetaLayout::kCpu) {
        byte = r * ((K + 7) / 8) + g / 2, shift = 4 * (g % 2);
      } else if (l == MetaLayout::kSm80) {
        const int64_t w = sm80_meta_word(r, g / 4, N);
        byte = 2 * w + (g % 4) / 2, shift = 4 * (g % 2);  // little-endian int16
      } else {
        byte = sm90_meta_byte(r, g / 2, N), shift = 4 * (g % 2);
      }
      rm[byte] |= uint8_t(code << shift);
    }
  // kernel replay
  std::vector<T> kv(N * K / 2, T(0x5a5a));
  std::vector<uint8_t> km(meta_bytes, 0xa5);
  if (l == MetaLayout::kCpu) {
    const int64_t mc = (K + 7) / 8, groups = K / 4;
    for (int64_t p = 0; p < N * mc; ++p) {
      const int64_t r = p / mc, g = 2 * (p - r * mc);
      const T* src = &dense[r * K + 4 * g];
      T* dst = &kv[r * (K / 2) + 2 * g];
      unsigned byte = pack_group(src[0], src[1], src[2], src[3], prune, inf, dst[0], dst[1]);
      if (g + 1 < groups) byte |= pack_group(src[4], src[5], src[6], src[7], prune, inf, dst[2], dst[3]) << 4;
      km[p] = uint8_t(byte);
    }
  } else {
    for (int64_t q = 0; q < N * (K / 16); ++q) {
      const RowChunk rc = l == MetaLayout::kSm80 ? sm80_word_coords(q, N) : sm90_pair_coords(q, N);
      const T* src = &dense[rc.r * K + 16 * rc.c];
      T* dst = &kv[rc.r * (K / 2) + 8 * rc.c];
      unsigned word = 0;
      for (int j = 0; j < 4; ++j)
        word |= pack_group(src[4 * j], src[4 * j + 1], src[4 * j + 2], src[4 * j + 3], prune, inf, dst[2 * j],
                           dst[2 * j + 1])
                << (4 * j);
      km[2 * q] = uint8_t(word), km[2 * q + 1] = uint8_t(word >> 8);  // little-endian uint16 store
    }
  }
  CHECK(kv == rv, "values differ (layout %d N=%lld K=%lld)", int(l), (long long)N, (long long)K);
  CHECK(km == rm, "meta differs (layout %d N=%lld K=%lld)", int(l), (long long)N, (long long)K);
  // unpack replay: dense * mask (+0 elsewhere)
  std::vector<T> back(N * K, T(0x3c3c));
  if (l == MetaLayout::kCpu) {
    const int64_t mc = (K + 7) / 8, groups = K / 4;
    for (int64_t p = 0; p < N * mc; ++p) {
      const int64_t r = p / mc, g = 2 * (p - r * mc);
      for (int i = 0; i < 2 && g + i < groups; ++i) {
        T out[4];
        unpack_group(kv[r * (K / 2) + 2 * (g + i)], kv[r * (K / 2) + 2 * (g + i) + 1], (km[p] >> (4 * i)) & 15u, out);
        for (int j = 0; j < 4; ++j) back[r * K + 4 * (g + i) + j] = out[j];
      }
    }
  } else {
    for (int64_t q = 0; q < N * (K / 16); ++q) {
      const RowChunk rc = l == MetaLayout::kSm80 ? sm80_word_coords(q, N) : sm90_pair_coords(q, N);
      const unsigned word = km[2 * q] | unsigned(km[2 * q + 1]) << 8;
      for (int j = 0; j < 4; ++j) {
        T out[4];
        unpack_group(kv[rc.r * (K / 2) + 8 * rc.c + 2 * j], kv[rc.r * (K / 2) + 8 * rc.c + 2 * j + 1],
                     (word >> (4 * j)) & 15u, out);
        for (int i = 0; i < 4; ++i) back[rc.r * K + 16 * rc.c + 4 * j + i] = out[i];
      }
    }
  }
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < K / 4; ++g) {
      const T* e = &dense[r * K + 4 * g];
      const unsigned keep = prune ? ref_keep(e, f) : 15u;
      unsigned nzmask = 0;
      for (int i = 0; i < 4; ++i) {
        const double v = value_of(e[i], f);
        if ((keep >> i & 1) && (v != 0.0 || std::isnan(v))) nzmask |= 1u << i;
      }
      for (int i = 0; i < 4; ++i) {
        // when <= 2 entries survive, unpack restores them exactly; else the first two (kCodeFromMask)
        const unsigned code = kCodeFromMask[nzmask];
        const bool stored = (i == int(code & 3) || i == int(code >> 2)) && (nzmask >> i & 1);
        const T want = stored ? e[i] : T(0);
        CHECK(back[r * K + 4 * g + i] == want, "unpack r=%lld g=%lld i=%d", (long long)r, (long long)g, i);
      }
    }
}

int main() {
  check_groups<uint16_t>(Fmt::F16, "f16");
  check_groups<uint16_t>(Fmt::BF16, "bf16");
  check_groups<uint32_t>(Fmt::F32, "f32");
  check_groups<uint64_t>(Fmt::F64, "f64");
  for (int64_t N : {32, 64, 96, 128, 192, 256})
    for (int64_t K : {32, 64, 96, 128, 256}) check_inverse(N, K);
  std::printf("inverse placements: checked\n");
  std::mt19937_64 rng(7);
  for (bool prune : {false, true}) {
    for (int64_t N : {32, 64, 160})
      for (int64_t K : {32, 64, 96, 192}) {
        check_layout_pack<uint16_t>(MetaLayout::kSm80, N, K, Fmt::F16, prune, rng);
        check_layout_pack<uint16_t>(MetaLayout::kSm80, N, K, Fmt::BF16, prune, rng);
        if (N % 64 == 0 && K % 64 == 0) {
          check_layout_pack<uint16_t>(MetaLayout::kSm90, N, K, Fmt::F16, prune, rng);
          check_layout_pack<uint16_t>(MetaLayout::kSm90, N, K, Fmt::BF16, prune, rng);
        }
      }
    for (int64_t N : {1, 3, 17})
      for (int64_t K : {4, 8, 12, 20, 64}) {
        check_layout_pack<uint16_t>(MetaLayout::kCpu, N, K, Fmt::F16, prune, rng);
        check_layout_pack<uint16_t>(MetaLayout::kCpu, N, K, Fmt::BF16, prune, rng);
        check_layout_pack<uint32_t>(MetaLayout::kCpu, N, K, Fmt::F32, prune, rng);
        check_layout_pack<uint64_t>(MetaLayout::kCpu, N, K, Fmt::F64, prune, rng);
      }
  }
  std::printf("layout pack/unpack replays: checked\n");
  std::printf("%s (%d failures)\n", failures ? "PACK SIMULATION FAILED" : "PACK SIMULATION PASSED", failures);
  return failures ? 1 : 0;
}
