// CPU kernels: the inner loops of every layout on one tile row-block, without torch. The
// drivers in cpu_ops.cpp split tensors into row-blocks and run these in parallel.
//
// Every weight layout moves whole 16-byte runs (8-byte runs for w4a16), so the loops are
// plain vector loads and stores; the output of a row-block is written sequentially while
// the 16 source rows are read as 16 sequential streams.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.h"

namespace moeprep {
namespace cpu {

typedef uint64_t u64x2 __attribute__((vector_size(16)));

inline u64x2 load16(const uint8_t* p) {
  u64x2 v;
  memcpy(&v, p, 16);
  return v;
}
inline void store16(uint8_t* p, u64x2 v) { memcpy(p, &v, 16); }

// ---------------------------------------------------------------------------------------------
// (16,16) shuffle of one row-block. With chunk size C (bytes, multiple of 16), the 16 rows of
// nchunks * C bytes become [nchunks][16 rows][C]: tile = chunk-major, row-minor. For bytes
// C = 16 (two 16x16 blocks per 32-byte tile), for dtype size s it is 16 (Kin = 16/s elements),
// and C = 32*s for use_int4 or 16*s for the gate/up interleaved variant.
template <int64_t kC>
inline void rows_to_tiles_impl(const uint8_t* const* rows, uint8_t* out, int64_t nchunks, int64_t c) {
  const int64_t cb = kC ? kC : c;
  for (int64_t q = 0; q < nchunks; ++q) {
    for (int nl = 0; nl < kTileRows; ++nl) {
      const uint8_t* s = rows[nl] + q * cb;
      uint8_t* d = out + (q * kTileRows + nl) * cb;
      for (int64_t j = 0; j < cb; j += 16) store16(d + j, load16(s + j));
    }
  }
}
template <int64_t kC>
inline void tiles_to_rows_impl(const uint8_t* in, uint8_t* const* rows, int64_t nchunks, int64_t c) {
  const int64_t cb = kC ? kC : c;
  for (int64_t q = 0; q < nchunks; ++q) {
    for (int nl = 0; nl < kTileRows; ++nl) {
      const uint8_t* s = in + (q * kTileRows + nl) * cb;
      uint8_t* d = rows[nl] + q * cb;
      for (int64_t j = 0; j < cb; j += 16) store16(d + j, load16(s + j));
    }
  }
}
// rows[i] points at the first byte of row i that belongs to this call; `out` at the matching
// tile position (row-block base + 16 * byte offset).
inline void rows_to_tiles(const uint8_t* const* rows, uint8_t* out, int64_t nbytes, int64_t c) {
  if (c == 16) {
    rows_to_tiles_impl<16>(rows, out, nbytes / 16, 16);
  } else {
    rows_to_tiles_impl<0>(rows, out, nbytes / c, c);
  }
}
inline void tiles_to_rows(const uint8_t* in, uint8_t* const* rows, int64_t nbytes, int64_t c) {
  if (c == 16) {
    tiles_to_rows_impl<16>(in, rows, nbytes / 16, 16);
  } else {
    tiles_to_rows_impl<0>(in, rows, nbytes / c, c);
  }
}

// ---------------------------------------------------------------------------------------------
// w4a16 preshuffle of one row-block of canonical codes: shuffle_weight on the int8 expansion
// moves 16 values (8 code bytes) per chunk, so the block becomes [nbytes/8][16 rows][8] with
// each 32-bit word re-packed per 8 (per8_pack) and, for signed codes, every nibble ^ 8.
// nbytes is a multiple of 16: one 16-byte load per row covers chunks q and q+1.
inline void codes_to_w4a16(const uint8_t* const* rows, uint8_t* out, int64_t nbytes, uint64_t flip) {
  for (int64_t q = 0; q < nbytes / 8; q += 2) {
    uint8_t* d0 = out + q * kTileRows * 8;
    uint8_t* d1 = d0 + kTileRows * 8;
    for (int nl = 0; nl < kTileRows; nl += 2) {
      // rows nl and nl+1 are neighbours in the tile: their chunk q and chunk q+1 pair up
      const u64x2 a = per8_pack(load16(rows[nl] + q * 8)) ^ flip;
      const u64x2 b = per8_pack(load16(rows[nl + 1] + q * 8)) ^ flip;
      store16(d0 + nl * 8, u64x2{a[0], b[0]});
      store16(d1 + nl * 8, u64x2{a[1], b[1]});
    }
  }
}
inline void w4a16_to_codes(const uint8_t* in, uint8_t* const* rows, int64_t nbytes, uint64_t flip) {
  for (int64_t q = 0; q < nbytes / 8; q += 2) {
    const uint8_t* s0 = in + q * kTileRows * 8;
    const uint8_t* s1 = s0 + kTileRows * 8;
    for (int nl = 0; nl < kTileRows; nl += 2) {
      const u64x2 a = load16(s0 + nl * 8), b = load16(s1 + nl * 8);  // rows nl, nl+1 of chunk q, q+1
      store16(rows[nl] + q * 8, per8_unpack(u64x2{a[0], b[0]} ^ flip));
      store16(rows[nl + 1] + q * 8, per8_unpack(u64x2{a[1], b[1]} ^ flip));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// E8M0 scale shuffle of one 32-row x 8-column group into 256 bytes:
//   out[kl*64 + ml*4 + kp*2 + mp] = rows[16*mp + ml][4*kp + kl]
// The group's first column is `col` in every row.
inline void scale_group_fwd_scalar(const uint8_t* const* rows, int64_t col, uint8_t* out) {
  for (int kl = 0; kl < 4; ++kl)
    for (int ml = 0; ml < 16; ++ml)
      for (int kp = 0; kp < 2; ++kp)
        for (int mp = 0; mp < 2; ++mp) out[kl * 64 + ml * 4 + kp * 2 + mp] = rows[16 * mp + ml][col + 4 * kp + kl];
}
inline void scale_group_inv_scalar(const uint8_t* in, uint8_t* const* rows, int64_t col) {
  for (int kl = 0; kl < 4; ++kl)
    for (int ml = 0; ml < 16; ++ml)
      for (int kp = 0; kp < 2; ++kp)
        for (int mp = 0; mp < 2; ++mp) rows[16 * mp + ml][col + 4 * kp + kl] = in[kl * 64 + ml * 4 + kp * 2 + mp];
}

#if defined(__SSE2__)
// Transpose of a 4x4 matrix of 32-bit words held in 4 registers.
inline void transpose4x4_epi32(__m128i& a, __m128i& b, __m128i& c, __m128i& d) {
  const __m128i t0 = _mm_unpacklo_epi32(a, b), t1 = _mm_unpacklo_epi32(c, d);
  const __m128i t2 = _mm_unpackhi_epi32(a, b), t3 = _mm_unpackhi_epi32(c, d);
  a = _mm_unpacklo_epi64(t0, t1);
  b = _mm_unpackhi_epi64(t0, t1);
  c = _mm_unpacklo_epi64(t2, t3);
  d = _mm_unpackhi_epi64(t2, t3);
}

// For row ml: interleave rows ml and 16+ml byte-wise (words (a_j, b_j)), then pair word kl with
// word kl+4: dword kl = (a_kl, b_kl, a_kl+4, b_kl+4), the 4 bytes that land at kl*64 + ml*4.
inline __m128i scale_row_pair(const uint8_t* a, const uint8_t* b) {
  const __m128i w = _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)),
                                      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  return _mm_unpacklo_epi16(w, _mm_srli_si128(w, 8));
}

inline void scale_group_fwd(const uint8_t* const* rows, int64_t col, uint8_t* out) {
  for (int g = 0; g < 4; ++g) {
    __m128i d0 = scale_row_pair(rows[4 * g + 0] + col, rows[16 + 4 * g + 0] + col);
    __m128i d1 = scale_row_pair(rows[4 * g + 1] + col, rows[16 + 4 * g + 1] + col);
    __m128i d2 = scale_row_pair(rows[4 * g + 2] + col, rows[16 + 4 * g + 2] + col);
    __m128i d3 = scale_row_pair(rows[4 * g + 3] + col, rows[16 + 4 * g + 3] + col);
    transpose4x4_epi32(d0, d1, d2, d3);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 0 * 64 + g * 16), d0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 1 * 64 + g * 16), d1);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * 64 + g * 16), d2);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * 64 + g * 16), d3);
  }
}

inline void scale_row_unpair(__m128i d, uint8_t* a, uint8_t* b) {
  // words w0 w4 w1 w5 w2 w6 w3 w7 -> w0 .. w7
  d = _mm_shufflelo_epi16(d, _MM_SHUFFLE(3, 1, 2, 0));
  d = _mm_shufflehi_epi16(d, _MM_SHUFFLE(3, 1, 2, 0));
  d = _mm_shuffle_epi32(d, _MM_SHUFFLE(3, 1, 2, 0));
  const __m128i zero = _mm_setzero_si128();
  const __m128i lo = _mm_packus_epi16(_mm_and_si128(d, _mm_set1_epi16(0x00FF)), zero);
  const __m128i hi = _mm_packus_epi16(_mm_srli_epi16(d, 8), zero);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(a), lo);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(b), hi);
}

inline void scale_group_inv(const uint8_t* in, uint8_t* const* rows, int64_t col) {
  for (int g = 0; g < 4; ++g) {
    __m128i d0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 0 * 64 + g * 16));
    __m128i d1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 1 * 64 + g * 16));
    __m128i d2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * 64 + g * 16));
    __m128i d3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 3 * 64 + g * 16));
    transpose4x4_epi32(d0, d1, d2, d3);
    scale_row_unpair(d0, rows[4 * g + 0] + col, rows[16 + 4 * g + 0] + col);
    scale_row_unpair(d1, rows[4 * g + 1] + col, rows[16 + 4 * g + 1] + col);
    scale_row_unpair(d2, rows[4 * g + 2] + col, rows[16 + 4 * g + 2] + col);
    scale_row_unpair(d3, rows[4 * g + 3] + col, rows[16 + 4 * g + 3] + col);
  }
}
#else
inline void scale_group_fwd(const uint8_t* const* rows, int64_t col, uint8_t* out) {
  scale_group_fwd_scalar(rows, col, out);
}
inline void scale_group_inv(const uint8_t* in, uint8_t* const* rows, int64_t col) {
  scale_group_inv_scalar(in, rows, col);
}
#endif

// ---------------------------------------------------------------------------------------------
// repack_into. BlockWriter<L> puts canonical code bytes of one 16-row block straight into its
// place in layout L, so GPTQ and AWQ words are decoded in registers and written once:
//   kCanonical: row i at base + i * ld;  kShuffle: [kb/16][16 rows][16];
//   kW4a16: [kb/8][16 rows][8], each 8-byte unit per8-packed and sign-flipped.
// `finish` is applied once per vector before its 8- or 16-byte pieces are stored.
template <int kLayout>
struct BlockWriter {
  uint8_t* base;
  int64_t ld;
  uint64_t flip;

  u64x2 finish(u64x2 v) const {
    if constexpr (kLayout == kLayoutW4a16) {
      return per8_pack(v) ^ flip;
    } else {
      return v;
    }
  }
  // low 8 bytes of v = canonical bytes [kb, kb + 8) of row i (kb % 8 == 0)
  void store8(int i, int64_t kb, u64x2 v) const {
    uint8_t* d;
    if constexpr (kLayout == kLayoutCanonical) {
      d = base + i * ld + kb;
    } else if constexpr (kLayout == kLayoutW4a16) {
      d = base + ((kb >> 3) * kTileRows + i) * 8;
    } else {
      d = base + ((kb >> 4) * kTileRows + i) * 16 + (kb & 15);
    }
    memcpy(d, &v, 8);
  }
  // v = canonical bytes [kb, kb + 16) of row i (kb % 16 == 0)
  void store16(int i, int64_t kb, u64x2 v) const {
    if constexpr (kLayout == kLayoutW4a16) {
      uint8_t* d = base + ((kb >> 3) * kTileRows + i) * 8;
      memcpy(d, &v, 8);
      memcpy(d + kTileRows * 8, reinterpret_cast<const uint8_t*>(&v) + 8, 8);
    } else if constexpr (kLayout == kLayoutCanonical) {
      cpu::store16(base + i * ld + kb, v);
    } else {
      cpu::store16(base + ((kb >> 4) * kTileRows + i) * 16, v);
    }
  }
};

// Any source, with or without gathers, one nibble at a time: canonical bytes [kb0, kb1) of
// source rows [r0, r0 + nrows) into rows of `ld` bytes at buf.
inline void decode_generic(const NibbleSource& s, int64_t r0, int nrows, int64_t kb0, int64_t kb1,
                           uint8_t* buf, int64_t ld) {
  for (int i = 0; i < nrows; ++i) {
    uint8_t* d = buf + i * ld;
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      d[kb - kb0] = static_cast<uint8_t>(fetch_nibble(s, r0 + i, 2 * kb) | (fetch_nibble(s, r0 + i, 2 * kb + 1) << 4));
    }
  }
}

// GPTQ: word [w, o] holds k = 8w..8w+7 of column o, which in little-endian memory is exactly the
// 4 canonical bytes [4w, 4w+4) of row o. One step: canonical bytes [kb, kb + 16) of the 16
// columns at `words` (4 source rows, word stride `stride`), a transpose of 4x4 word blocks.
template <class W>
inline void gptq_step(const uint32_t* words, int64_t stride, int64_t kb, const W& out) {
  for (int c = 0; c < kTileRows; c += 4) {
#if defined(__SSE2__)
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + c));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + stride + c));
    __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 2 * stride + c));
    __m128i f = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 3 * stride + c));
    transpose4x4_epi32(a, b, e, f);
    const u64x2 col[4] = {(u64x2)a, (u64x2)b, (u64x2)e, (u64x2)f};
#else
    u64x2 col[4];
    for (int j = 0; j < 4; ++j) {
      uint32_t t[4] = {words[c + j], words[stride + c + j], words[2 * stride + c + j], words[3 * stride + c + j]};
      memcpy(&col[j], t, 16);
    }
#endif
    for (int j = 0; j < 4; ++j) out.store16(c + j, kb, out.finish(col[j]));
  }
}

#if defined(__SSE2__)
// AWQ: 16 columns (2 words, at `words`) x 16 inputs k (source rows, word stride `stride`) give
// canonical bytes [kb, kb + 8) of 16 rows. Per pair of inputs (k, k+1) the code bytes are
//   even nibble positions: (A & 0x0F) | (B << 4),  odd positions: (A >> 4) | (B & 0xF0)
// which are columns [0,4,1,5 | 8,12,9,13] and [2,6,3,7 | 10,14,11,15] of the 16. A byte
// transpose (8 input pairs x 16 columns) then gives each column its 8 bytes.
template <class W>
inline void awq_step(const uint32_t* words, int64_t stride, int64_t kb, const W& out) {
  const __m128i lo_mask = _mm_set1_epi8(0x0F), hi_mask = _mm_set1_epi8(static_cast<char>(0xF0));
  __m128i r[8];  // r[p]: 16 bytes of input pair p, columns in the order above
  for (int p = 0; p < 8; ++p) {
    const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + (2 * p) * stride));
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(words + (2 * p + 1) * stride));
    const __m128i even = _mm_or_si128(_mm_and_si128(a, lo_mask), _mm_and_si128(_mm_slli_epi16(b, 4), hi_mask));
    const __m128i odd = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), lo_mask), _mm_and_si128(b, hi_mask));
    r[p] = _mm_unpacklo_epi64(even, odd);
  }
  // 8 x 16 byte transpose in three unpack stages
  __m128i l[4], h[4];
  for (int i = 0; i < 4; ++i) {
    l[i] = _mm_unpacklo_epi8(r[2 * i], r[2 * i + 1]);
    h[i] = _mm_unpackhi_epi8(r[2 * i], r[2 * i + 1]);
  }
  __m128i m[8];
  m[0] = _mm_unpacklo_epi16(l[0], l[1]);  // r-bytes 0..3 of pairs 0..3
  m[1] = _mm_unpackhi_epi16(l[0], l[1]);  // r-bytes 4..7
  m[2] = _mm_unpacklo_epi16(h[0], h[1]);  // r-bytes 8..11
  m[3] = _mm_unpackhi_epi16(h[0], h[1]);  // r-bytes 12..15
  m[4] = _mm_unpacklo_epi16(l[2], l[3]);  // same for pairs 4..7
  m[5] = _mm_unpackhi_epi16(l[2], l[3]);
  m[6] = _mm_unpacklo_epi16(h[2], h[3]);
  m[7] = _mm_unpackhi_epi16(h[2], h[3]);
  static const int kCol[16] = {0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15};  // r-byte -> column
  for (int q = 0; q < 4; ++q) {
    const u64x2 lo = out.finish((u64x2)_mm_unpacklo_epi32(m[q], m[q + 4]));  // r-bytes 4q, 4q+1
    const u64x2 hi = out.finish((u64x2)_mm_unpackhi_epi32(m[q], m[q + 4]));  // r-bytes 4q+2, 4q+3
    out.store8(kCol[4 * q + 0], kb, lo);
    out.store8(kCol[4 * q + 1], kb, (u64x2)_mm_srli_si128((__m128i)lo, 8));
    out.store8(kCol[4 * q + 2], kb, hi);
    out.store8(kCol[4 * q + 3], kb, (u64x2)_mm_srli_si128((__m128i)hi, 8));
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Element-wise int4 helpers on canonical codes.
inline void int4_to_int8(const uint8_t* codes, int8_t* out, int64_t nbytes, bool is_signed) {
  const int off = is_signed ? 8 : 0;
  for (int64_t i = 0; i < nbytes; ++i) {
    out[2 * i] = static_cast<int8_t>((codes[i] & 0xF) - off);
    out[2 * i + 1] = static_cast<int8_t>((codes[i] >> 4) - off);
  }
}
inline void int8_to_int4(const int8_t* v, uint8_t* codes, int64_t nbytes, bool is_signed) {
  const int off = is_signed ? 8 : 0;
  for (int64_t i = 0; i < nbytes; ++i) {
    codes[i] = static_cast<uint8_t>(((v[2 * i] + off) & 0xF) | (((v[2 * i + 1] + off) & 0xF) << 4));
  }
}
// Per-8 packing: byte j of each group of 4 = v[j] | v[j+4] << 4 (low nibbles).
inline void pack_int4_per8(const int8_t* v, uint8_t* out, int64_t ngroups) {
  for (int64_t g = 0; g < ngroups; ++g) {
    for (int j = 0; j < 4; ++j) {
      out[4 * g + j] = static_cast<uint8_t>((v[8 * g + j] & 0xF) | ((v[8 * g + j + 4] & 0xF) << 4));
    }
  }
}
// Two groups of 4 bytes at once (SWAR): low nibbles are v[j], high nibbles v[j+4]; signed
// nibbles are sign-extended per byte by or-ing 0xF0 where bit 3 is set (8 * 0x1E = 0xF0, no carry).
inline void unpack_two_groups(uint64_t w, bool is_signed, int8_t* out, bool both) {
  constexpr uint64_t kLow = 0x0F0F0F0F0F0F0F0Full, kBit3 = 0x0808080808080808ull, kHalf = 0xFFFFFFFFull;
  uint64_t lo = w & kLow, hi = (w >> 4) & kLow;
  if (is_signed) {
    lo |= (lo & kBit3) * 0x1E;
    hi |= (hi & kBit3) * 0x1E;
  }
  const uint64_t first = (lo & kHalf) | (hi << 32), second = (lo >> 32) | (hi & ~kHalf);
  memcpy(out, &first, 8);
  if (both) memcpy(out + 8, &second, 8);
}
inline void unpack_int4_per8(const uint8_t* b, int8_t* out, int64_t ngroups, bool is_signed) {
  int64_t g = 0;
  for (; g + 2 <= ngroups; g += 2) {
    uint64_t w;
    memcpy(&w, b + 4 * g, 8);
    unpack_two_groups(w, is_signed, out + 8 * g, true);
  }
  if (g < ngroups) {
    uint32_t w;
    memcpy(&w, b + 4 * g, 4);
    unpack_two_groups(w, is_signed, out + 8 * g, false);
  }
}

}  // namespace cpu
}  // namespace moeprep
