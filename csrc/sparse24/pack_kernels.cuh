// Private helpers of sparse24_pack_cuda.cu (semisparse::sparse24_pack / sparse24_unpack):
// the per-group 2:4 encode / decode on raw bits and the inverse of the GPU metadata
// placements. Plain C++ marked host+device (SEMISPARSE_HD), so a host program can check
// them against meta_layout.h and a reference pruning rule.
//
// Entries are raw bits (uint16 for fp16/bf16, uint32 for fp32, uint64 for fp64): copies
// are exact and "zero of either sign" is "all bits but the sign bit zero", as on the CPU.
#pragma once

#include <cstdint>

#include "sparse24/meta_layout.h"
#include "sparse24/sparse24_cpu.h"  // kCodeFromMask (one definition, shared with the CPU)

namespace semisparse::sparse24::pack {

// kCodeFromMask packed into one 64-bit constant (nibble m = code of mask m), usable in
// device code without a __constant__ copy.
constexpr uint64_t pack_code_table() {
  uint64_t p = 0;
  for (int m = 0; m < 16; ++m) p |= static_cast<uint64_t>(kCodeFromMask[m] & 15u) << (4 * m);
  return p;
}
constexpr uint64_t kPackedCodes = pack_code_table();

SEMISPARSE_HD unsigned code_from_mask(unsigned mask) {
  return static_cast<unsigned>(kPackedCodes >> (4u * (mask & 15u))) & 15u;
}

template <class T>
SEMISPARSE_HD T magnitude_bits(T v) {
  return static_cast<T>(v & static_cast<T>(~(T(1) << (8 * sizeof(T) - 1))));
}

template <class T>
SEMISPARSE_HD bool is_nonzero(T v) {
  return magnitude_bits(v) != 0;
}

// Prune rank of an entry: larger |value| ranks higher; NaN (magnitude bits above those of
// +inf) ranks below everything, zeros included. For non-NaN floats the magnitude bits are
// ordered like |value|, so integer compares are exact.
template <class T>
SEMISPARSE_HD T prune_key(T v, T inf_bits) {
  const T mag = magnitude_bits(v);
  return mag > inf_bits ? T(0) : static_cast<T>(mag + 1);
}

// Bit i set = entry i is among the 2 kept: the two highest keys, ties to the lower index.
template <class T>
SEMISPARSE_HD unsigned keep_mask(T e0, T e1, T e2, T e3, T inf_bits) {
  const T k0 = prune_key(e0, inf_bits), k1 = prune_key(e1, inf_bits), k2 = prune_key(e2, inf_bits),
          k3 = prune_key(e3, inf_bits);
  // bij (i < j): entry i beats entry j
  const int b01 = k0 >= k1, b02 = k0 >= k2, b03 = k0 >= k3, b12 = k1 >= k2, b13 = k1 >= k3, b23 = k2 >= k3;
  const int beaten0 = (1 - b01) + (1 - b02) + (1 - b03);
  const int beaten1 = b01 + (1 - b12) + (1 - b13);
  const int beaten2 = b02 + b12 + (1 - b23);
  const int beaten3 = b03 + b13 + b23;
  return unsigned(beaten0 < 2) | unsigned(beaten1 < 2) << 1 | unsigned(beaten2 < 2) << 2 | unsigned(beaten3 < 2) << 3;
}

template <class T>
SEMISPARSE_HD T pick4(T e0, T e1, T e2, T e3, unsigned i) {
  return i == 0 ? e0 : i == 1 ? e1 : i == 2 ? e2 : e3;  // selects, not a dynamic array index
}

// One group of 4 entries -> its 2 stored values (v0, v1) and its 4-bit code idx0 | idx1 << 2.
// prune: first zero all but the 2 kept entries (keep_mask), i.e. encode dense * mask. Then
// the code is kCodeFromMask of the non-zero mask (a group with > 2 non-zeros keeps its
// first two); stored zeros of either sign become +0.
template <class T>
SEMISPARSE_HD unsigned pack_group(T e0, T e1, T e2, T e3, bool prune, T inf_bits, T& v0, T& v1) {
  if (prune) {
    const unsigned keep = keep_mask(e0, e1, e2, e3, inf_bits);
    e0 = (keep & 1u) ? e0 : T(0);
    e1 = (keep & 2u) ? e1 : T(0);
    e2 = (keep & 4u) ? e2 : T(0);
    e3 = (keep & 8u) ? e3 : T(0);
  }
  const unsigned mask = unsigned(is_nonzero(e0)) | unsigned(is_nonzero(e1)) << 1 | unsigned(is_nonzero(e2)) << 2 |
                        unsigned(is_nonzero(e3)) << 3;
  const unsigned code = code_from_mask(mask);
  const T a = pick4(e0, e1, e2, e3, code & 3u);
  const T b = pick4(e0, e1, e2, e3, code >> 2);
  v0 = is_nonzero(a) ? a : T(0);
  v1 = is_nonzero(b) ? b : T(0);
  return code;
}

// 2 stored values + code -> the 4 dense entries; pruned positions are +0. The second
// index wins when a (malformed) code names one position twice, as on the CPU.
template <class T>
SEMISPARSE_HD void unpack_group(T v0, T v1, unsigned code, T (&out)[4]) {
  const unsigned i0 = code & 3u, i1 = (code >> 2) & 3u;
  for (unsigned i = 0; i < 4; ++i) out[i] = i == i1 ? v1 : i == i0 ? v0 : T(0);
}

// A 16-column unit of a row: row r, columns 16 c .. 16 c + 15 (4 groups, one 16-bit code
// word: group j in bits 4j .. 4j+3).
struct RowChunk {
  int64_t r, c;
};

// cutlass_sm80: the (row, 16-column chunk) whose code word is int16 word q of the buffer,
// i.e. the inverse of sm80_meta_word (rows % 32 == 0).
SEMISPARSE_HD RowChunk sm80_word_coords(int64_t q, int64_t rows) {
  const int64_t c2 = q / (2 * rows), rem = q - c2 * (2 * rows);
  int64_t rr = rem >> 1, c = 2 * c2 + (rem & 1);
  // undo the 2x2 transpose: slot (odd rr, even c) holds (rr-1, c+1), slot (even rr, odd c) holds (rr+1, c-1)
  if ((rr & 1) == 1 && (c & 1) == 0) {
    rr -= 1;
    c += 1;
  } else if ((rr & 1) == 0 && (c & 1) == 1) {
    rr += 1;
    c -= 1;
  }
  const int64_t u = rr & 31;  // rr = 32 (r / 32) + 4 (r % 8) + (r % 32) / 8
  return {(rr - u) + (u & 3) * 8 + (u >> 2), c};
}

// cutlass_sm90: the (row, 16-column chunk) whose code bytes are the aligned byte pair
// 2q, 2q+1 of the buffer (bytes (r, 2c) and (r, 2c + 1)), i.e. the inverse of
// sm90_meta_byte (rows % 64 == 0). Byte index bits inside a 512-byte 64x64 tile:
// 0: j % 2, 1: (m / 8) % 2, 2: (j % 8) / 4, 3-5: m % 8, 6: (j / 2) % 2, 7-8: m / 16.
SEMISPARSE_HD RowChunk sm90_pair_coords(int64_t q, int64_t rows) {
  const int64_t tile = q >> 8, t = (2 * q) & 511;
  const int64_t row_tiles = rows / 64;
  const int64_t rb = tile % row_tiles, kb = tile / row_tiles;
  const int64_t m_in = ((t >> 1) & 1) * 8 + ((t >> 3) & 7) + ((t >> 7) & 3) * 16;
  const int64_t j_in = ((t >> 6) & 1) * 2 + ((t >> 2) & 1) * 4;  // even: the pair's lower byte
  return {rb * 64 + m_in, (kb * 8 + j_in) / 2};
}

}  // namespace semisparse::sparse24::pack
