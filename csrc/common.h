// Layout facts shared by the CPU kernels and the GPU kernels (no torch here, so
// nvcc, hipcc and the host compiler can all include it). See docs in
// docs/layouts.md and moeprep/ops/reference.py for the formulas.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MOEPREP_HD __host__ __device__ __forceinline__
#else
#define MOEPREP_HD inline
#endif

namespace moeprep {

// Rows per tile of every (16,16) layout.
constexpr int kTileRows = 16;

// How 4-bit codes are stored in a repack_into source.
enum SrcPacking : int {
  kPackCanonical = 0,  // uint8 [n, K/2], low nibble = even k (also compressed-tensors int32 viewed as bytes)
  kPackGptq = 1,       // int32 [K/8, n]: k-th input of column o = nibble k%8 of word [k/8, o]
  kPackAwq = 2,        // int32 [K, n/8]: column 8w + kAwqOrder[p] = nibble p of word [k, w]
};

// What repack_into writes into the destination.
enum RepackLayout : int {
  kLayoutCanonical = 0,
  kLayoutShuffle = 1,        // shuffle_weight on bytes
  kLayoutGuInterleave = 2,   // shuffle_weight(is_guinterleave=True): row blocks of gate and up alternate
  kLayoutW4a16 = 3,          // preshuffle_int4
};

// Gate/up interleave (shuffle_weight(is_guinterleave=True, gate_up=True)) of an expert with nb
// row-blocks: gate blocks [0, nb/2) and up blocks [nb/2, nb) alternate in the output.
MOEPREP_HD int64_t gu_tile_block(int64_t canonical_block, int64_t nb) {
  const int64_t half = nb / 2;
  return canonical_block < half ? 2 * canonical_block : 2 * (canonical_block - half) + 1;
}
MOEPREP_HD int64_t gu_canonical_block(int64_t tile_block, int64_t nb) {
  return (tile_block & 1) ? nb / 2 + tile_block / 2 : tile_block / 2;
}

// E8M0 scale shuffle: source row (within its expert) of row i (0..31) of shuffled 32-row block m1.
// Plain: rows 32*m1 + i. Gate/up: the block pairs 16 gate rows with the 16 matching up rows.
MOEPREP_HD int64_t scale_source_row(bool gate_up, int64_t rows_in, int64_t m1, int i) {
  const int mp = i / 16, ml = i % 16;
  return gate_up ? mp * (rows_in / 2) + m1 * 16 + ml : m1 * 32 + mp * 16 + ml;
}

// AWQ packs the 8 columns of a word in the order [0, 2, 4, 6, 1, 3, 5, 7]; this is the nibble
// position that holds column c % 8.
MOEPREP_HD int awq_nibble_pos(int c) { return (c & 1) * 4 + (c >> 1); }

// Where the 4-bit codes of a repack_into source live. Strides are in bytes for canonical
// sources and in 32-bit words for GPTQ/AWQ sources.
struct NibbleSource {
  const uint8_t* data;
  int packing;
  int64_t stride;
  const int64_t* row_index;  // optional gathers (GPTQ desc_act); null when absent
  const int64_t* col_index;
};

// Unsigned 4-bit code of logical row r, logical element k.
MOEPREP_HD uint32_t fetch_nibble(const NibbleSource& s, int64_t r, int64_t k) {
  const int64_t sr = s.row_index ? s.row_index[r] : r;
  const int64_t sk = s.col_index ? s.col_index[k] : k;
  if (s.packing == kPackCanonical) {
    return (s.data[sr * s.stride + (sk >> 1)] >> (4 * (sk & 1))) & 0xF;
  }
  const uint32_t* w = reinterpret_cast<const uint32_t*>(s.data);
  if (s.packing == kPackGptq) {
    return (w[(sk >> 3) * s.stride + sr] >> (4 * (sk & 7))) & 0xF;
  }
  return (w[sk * s.stride + (sr >> 3)] >> (4 * awq_nibble_pos(static_cast<int>(sr & 7)))) & 0xF;
}

// w4a16 per-8 packing applied to canonical codes: each 32-bit word holds 8 consecutive values
// v0..v7 as nibbles (LSB first); the kernels want them as bytes (v0|v4<<4, v1|v5<<4, ...), i.e.
// nibble order v0 v4 v1 v5 v2 v6 v3 v7. Two involutive swaps do it: bytes 1<->2, then nibbles
// 1<->2 (and 5<->6). T is uint32_t, uint64_t or a vector of them (masks replicate per word).
template <typename T>
MOEPREP_HD T swap_bytes_12(T x) {
  T t = (x ^ (x >> 8)) & 0x0000FF000000FF00ull;
  return x ^ t ^ (t << 8);
}
template <typename T>
MOEPREP_HD T swap_nibbles_12(T x) {
  T t = (x ^ (x >> 4)) & 0x00F000F000F000F0ull;
  return x ^ t ^ (t << 4);
}
template <typename T>
MOEPREP_HD T per8_pack(T x) { return swap_nibbles_12(swap_bytes_12(x)); }
template <typename T>
MOEPREP_HD T per8_unpack(T x) { return swap_bytes_12(swap_nibbles_12(x)); }

// Signed w4a16 stores v = q - 8 as a nibble, which is q ^ 8.
constexpr uint64_t kSignFlip = 0x8888888888888888ull;

}  // namespace moeprep
