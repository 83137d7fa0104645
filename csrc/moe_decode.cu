// Decode-size grouped GEMMs of the 4-bit MoE targets (w4a16_preshuffle, w4a16_preshuffle_zp,
// mxfp4_preshuffle, mxfp4_moe) on CUDA tensor cores: mma.sync m16n8k16 with bf16 operands
// (sm_80+), fp32 accumulation.
//
// Why a hand-written kernel: at a few tokens per expert the GEMMs stream the weights once, and
// what bounds them is the instructions spent per weight. Triton 3.6 moves every decoded bf16 tile
// through shared memory to reach the MMA's operand layout (5.4 instructions per weight in all).
// Here the packed codes, activations and scales are copied into a per-warp shared-memory ring by
// cp.async, a few 64-k windows ahead, and each lane reads exactly the codes of its mma.sync
// fragments.
//
// The decode is one `lop3` per two weights: it drops each code u into the mantissa of the bf16
// 128 (unit in the last place 1), so the MMA takes the exact 128 + u. The offset and the scale
// are applied per 32-k half window (one quantization group, group sizes >= 32) in fp32: the MMA
// of a half window starts from -(128 + z) * sum(a), which another MMA of the activations with a
// constant operand computes once per warp (signed codes: z = 8 for every row), and the sum is
// scaled into the accumulator. fp32 holds each product and the offset's cancellation loses a
// few of its 24 bits, so the result stays far closer to sum((q - z) * s * a) than a bf16 rounding
// of (q - z) * s would.
//
// The (16,16) preshuffle (LAYOUTS.md) stores each 16-row block of an int4 matrix as 16-k chunks
// of 16 rows x 8 bytes; row r of chunk c is the int32 pair at word (c * 16 + r) * 2 of the block,
// value j of a word (k = 8 * word + j) in bits 8 * (j % 4) + 4 * (j / 4). Lane (g, t) of a warp
// takes rows g and g + 8 of a block and, for half window h, word t % 2 of chunk 2 h + t / 2:
// k = 32 h + 8 t + j. A dot product may run over k in any order as long as both operands use the
// same one, so the MMA's k slots are assigned to whatever pairs one `lop3` decodes (values j and
// j + 2 of a word), and the activations are paired the same way with `prmt`.
//
// MXFP4 (E2M1 codes, one E8M0 scale per 32 k) stores 32-k chunks of 16 rows x 16 bytes, value j
// of a word in bits 4 j; lane (g, t) takes word t of chunk h, the same k = 32 h + 8 t + j. Its
// decode cannot be one lop3 (the value is not affine in the code): the magnitude bits move to the
// bottom of a bf16's exponent and the sign to its top, which makes the value times 2^-126
// (subnormal for 0 and 0.5, which the MMA takes exactly). The activations are multiplied by 2^63
// so that the products stay clear of fp32's subnormals, and the scale 2^(e - 127) by 2^63 in fp32
// undoes both. Pairs are values j and j + 4 (bits 4 j and 4 j + 16: one multiply moves both).
//
// CUDA only: HIP builds and other GPUs take the Triton kernels (moeprep/kernels/moe_gemm.py).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>

#include "cuda_asm.cuh"
#include "kernel_facts.cuh"
#include "moe_decode.h"

namespace moeprep {
namespace {

constexpr int kWindow = kDecodeWindow;  // k per warp step: two quantization groups of 32 at most
constexpr int kBlocks = kDecodeBlocks;  // 16-row blocks per warp (w13: two of gate rows, then their two of up rows)

// bf16 MMAs need sm_80; builds for older GPUs keep the kernels as traps (the Python side only
// launches them on sm_80+)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MOEPREP_BF16_MMA 0
#else
#define MOEPREP_BF16_MMA 1
#endif

// d = a b + c
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         const float* c) {
#if MOEPREP_BF16_MMA
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#else
  __trap();
#endif
}

// Programmatic dependent launch (sm_90): the routing kernel, w13_kernel and w2_kernel form a
// chain in which each kernel is launched while the one before still runs, so that its CTAs are
// resident and set up when their inputs are ready. wait_for_primary blocks until the kernel
// launched before has finished and its writes are visible (a kernel launched the ordinary way
// returns from it at once); allow_dependents lets the next kernel start once every CTA has called
// it or exited. The routing kernel allows at its start. w13_kernel waits for the routing before
// anything else, and then allows at once in its last `resident` CTAs (by linear index, as many as
// the GPU holds at a time: they start as the earlier ones end) and past their main loop in the
// others, so that w2_kernel's CTAs take the slots that w13_kernel's tail frees and request their
// first windows there. (Allowing at every CTA's start made Mixtral T = 1 13% slower; this rule
// gained 2-6% over allowing past the main loop where the gate/up grid takes more than one
// wave.) Every w13_kernel CTA has waited for the routing before
// it allows, so w2_kernel may read the routing's results before it waits for h.
__device__ __forceinline__ void wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// How the codes are stored: int4 with zero point 8 (signed) or per-group zero points, or E2M1
enum class Codes { kSigned, kZeroPoint, kE2m1 };

// The bf16 pairs (v_j, v_j+4) * 2^-126 of the E2M1 codes at bits 4 j and 4 j + 16 of `word` for
// j = 2 i (pair[0]) and j = 2 i + 1 (pair[1]), i < 2 a constant once unrolled. Per pair the two
// nibbles are masked out and one multiply by 2^a + 2^b leaves two copies of each: one with the
// magnitude bits e1 e0 m at bits 8..6, one with the sign at bit 15, which the last mask keeps (the
// copies do not overlap, so the product carries nothing into them). i = 1 starts from word >> 8,
// a multiply-high by `shift` = 2^24 (on the FMA pipe, as in the int4 decode): 13 instructions per
// 8 codes, where a shift for each field and a mask to merge them took 15.
__device__ __forceinline__ void e2m1_pairs(uint32_t word, int i, uint32_t shift, uint32_t (&pair)[2]) {
  const uint32_t x = i ? __umulhi(word, shift) : word;
  pair[0] = ((x & 0x000F000Fu) * 4160u) & 0x81C081C0u;  // 2^6 + 2^12
  pair[1] = ((x & 0x00F000F0u) * 260u) & 0x81C081C0u;   // 2^2 + 2^8
}

// x * 2^63 for a bf16 pair (exact unless |x| >= 2^65)
__device__ __forceinline__ uint32_t times_2_63(uint32_t x) {
  uint32_t y;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(y) : "r"(x), "r"(0x5F005F00u), "r"(0x80008000u));
  return y;
}

struct Problem {
  const __nv_bfloat16* act;  // activation rows; pair p reads row p / act_div
  int64_t act_stride;
  int act_div;
  const uint32_t* words;  // [E, N, K / 8] in the preshuffled order
  // int4: bf16 [E, G / 2, N, 2] read as one word per (row, group pair); E2M1: E8M0 bytes in 32-row
  // tiles of `groups` (padded) columns, (LAYOUTS.md, e8m0_shuffle)
  const void* scale;
  const uint16_t* zero;  // uint8 in the scales' layout, or null (signed codes, zero point 8)
  int64_t n, k;
  int groups, group_size;
  int gu_interleaved;  // w13 of mxfp4_moe: the 16-row blocks of gate and up alternate
  const int32_t* sorted_ids;  // the routed pairs, in blocks of 8 per expert
  const int32_t* expert_ids;
  const int32_t* num_padded;
  int num_pairs;
  int k_warps;  // warps of a CTA that split K for the same rows (the others take further rows)
  // int4: 2^28, 2^20, the decode's right shifts by 4 and 12 as multiply-highs (E2M1: 2^24, by 8).
  // Read from the kernel's parameters, the compiler cannot turn them back into shifts, and they
  // run on the FMA pipe beside the lop3s on the integer pipe; int4's shift by 8 stays there, which
  // balances the two. exp_mul = 2^23 likewise builds E2M1's fp32 scales with an FMA-pipe multiply.
  uint32_t shift_mul[2];
  uint32_t exp_mul;
};

// x, hidden from the compiler behind an identity shuffle: left visible, ptxas recomputes a lane's
// shared-memory offsets from its lane id in every window (tens of instructions per window)
// instead of keeping them in registers
__device__ __forceinline__ uint32_t opaque(uint32_t x) { return __shfl_sync(0xffffffffu, x, threadIdx.x % 32); }

// A warp's shared-memory copy of one 64-k window (bytes): the codes of its 16-row blocks (512
// bytes each), its 8 tokens' activations, and the blocks' scales of the window. int4: the scale and
// zero-point words of the window's group pair (group sizes >= 32 keep a window inside one pair);
// E2M1: 128 bytes of each block's scale tile, both groups of the window for its 32-row tile.
template <Codes C>
struct Stage {
  static constexpr int kCodes = 0;
  static constexpr int kAct = kBlocks * 512;
  static constexpr int kScale = kAct + 1024;
  static constexpr int kZero = kScale + kBlocks * 64;
  static constexpr int kBytes = C == Codes::kE2m1 ? kScale + kBlocks * 128 : kZero + kBlocks * 32;
};

template <int WARPS, int STAGES, Codes C>
constexpr int ring_bytes() {
  return WARPS * STAGES * Stage<C>::kBytes;
}

// Where 16-byte unit `unit` of a 128-byte row of 8 units lands: units are xor-swizzled so that
// the fragment reads of a warp hit distinct banks (odd chunks and odd tokens take the other half).
// E2M1 codes need no swizzle: a warp's reads of one 16-row chunk cover 128 consecutive bytes.
__device__ __forceinline__ int code_unit(int chunk, int unit) { return chunk * 8 + (unit ^ (4 * (chunk & 1))); }
__device__ __forceinline__ int act_unit(int token, int unit) { return token * 8 + (unit ^ (4 * (token & 1))); }

// One warp's product of kBlocks 16-row blocks of an expert's matrix with the 8 routed rows of a
// block, over a range of 64-k windows. Lane (g, t) ends with acc[b] = rows g and g + 8 of block b
// times tokens 2t and 2t + 1 (the mma.sync accumulator layout).
template <int STAGES, Codes C, bool G32>
struct WarpGemm {
  using S = Stage<C>;
  static constexpr bool ZP = C == Codes::kZeroPoint;
  static constexpr bool E2M1 = C == Codes::kE2m1;
  // copies issued by this lane, at window 0
  const char* codes_src[kBlocks];  // unit `lane` of each block's 512 bytes
  const char* act_src[2];          // units lane and lane + 32 of the 8 token rows
  // int4: lanes 0 to 4 kBlocks - 1: 16 bytes of scales; from lane 16: of zero points. E2M1: unit
  // lane % 8 of block lane / 8's 128 bytes
  const char* meta_src;
  int meta_dst;
  int log2_group;
  uint64_t meta_pair_stride;  // int4: meta_src's step from one group pair to the next, in bytes
  // this lane's shared-memory addresses in stage 0 (the warp's ring included): its copies'
  // destinations (meta_dst: -1 for none), and its reads of rows g and g + 8 (codes of half window 0),
  // of half windows 0 and 1 (activations) and of row g's int4 scale word and zero point in block 0
  uint32_t code_dst, act_dst[2], code_rd[2], act_rd[2], scale_row, zero_row;
  uint32_t scale_rd[kBlocks];  // E2M1: row g's scale byte of half window 0 in each block's copy
  uint32_t konst_frag[4];      // int4: the constant MMA operand of multiply_int4

  // rows[b]: the first stored row of the warp's b-th block
  __device__ void init(const Problem& p, int64_t expert, const int64_t (&rows)[kBlocks], const int32_t* ids,
                       uint32_t ring) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    log2_group = __ffs(p.group_size) - 1;
    const uint32_t* words = p.words + expert * (p.n * p.k / 8);
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      codes_src[b] = reinterpret_cast<const char*>(words + rows[b] / 16 * (2 * p.k) + lane * 4);
    }
    code_dst = E2M1 ? lane * 16 : code_unit(lane / 8, lane % 8) * 16;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int unit = lane + 32 * h;
      const int pair = __ldg(ids + unit / 8);
      // padding reads row 0: it only feeds its own column of the product, which is never stored
      const int64_t row = pair < p.num_pairs ? pair / p.act_div : 0;
      act_src[h] = reinterpret_cast<const char*>(p.act + row * p.act_stride + (unit % 8) * 8);
      act_dst[h] = S::kAct + act_unit(unit / 8, unit % 8) * 16;
      act_rd[h] = S::kAct + act_unit(g, 4 * h + t) * 16;
      const int row_in_block = g + 8 * h;
      code_rd[h] = E2M1 ? S::kCodes + row_in_block * 16 + t * 4
                        : S::kCodes + code_unit(t / 2, row_in_block / 2) * 16 + (row_in_block % 2) * 8 + (t % 2) * 4;
    }
    meta_src = nullptr;
    meta_dst = -1;
    meta_pair_stride = 0;
    if (E2M1) {
      // a 32-row tile of the scales holds two 16-row blocks (counted over all experts): row r of
      // block m, group c at tile m / 2, byte (c / 8) * 256 + (c % 4) * 64 + r * 4 + ((c / 4) % 2) * 2 + m % 2
      const unsigned char* scale = static_cast<const unsigned char*>(p.scale);
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) {
        const int64_t block = expert * (p.n / 16) + rows[b] / 16;
        scale_rd[b] = S::kScale + b * 128 + g * 4 + static_cast<uint32_t>(block % 2);
        if (b == lane / 8) {
          meta_src = reinterpret_cast<const char*>(scale + block / 2 * (32 * p.groups) + (lane % 8) * 16);
        }
      }
      meta_dst = S::kScale + lane * 16;
    } else {
      const int64_t scale_words = expert * p.groups * p.n / 2;
      if (lane < 4 * kBlocks) {
        meta_src = reinterpret_cast<const char*>(static_cast<const uint32_t*>(p.scale) + scale_words +
                                                 rows[lane / 4] + (lane % 4) * 4);
        meta_dst = S::kScale + lane * 16;
        meta_pair_stride = p.n * 4;
      } else if (ZP && lane >= 16 && lane < 16 + 2 * kBlocks) {
        meta_src = reinterpret_cast<const char*>(p.zero + scale_words + rows[(lane - 16) / 2] + (lane % 2) * 8);
        meta_dst = S::kZero + (lane - 16) * 16;
        meta_pair_stride = p.n * 2;
      }
    }
    // the lane's shared-memory addresses from here on: absolute, and opaque (see there)
    code_dst = opaque(ring + code_dst);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      act_dst[h] = opaque(ring + act_dst[h]);
      act_rd[h] = opaque(ring + act_rd[h]);
      code_rd[h] = opaque(ring + code_rd[h]);
    }
    const uint32_t meta_at = opaque(ring + meta_dst);  // by every lane: a shuffle takes the whole warp
    meta_dst = meta_dst < 0 ? -1 : static_cast<int>(meta_at);
    if (E2M1) {
#pragma unroll
      for (int b = 0; b < kBlocks; ++b) scale_rd[b] = opaque(ring + scale_rd[b]);
    } else {
      scale_row = opaque(ring + S::kScale + g * 4);
      if (ZP) zero_row = opaque(ring + S::kZero + g * 2);
#pragma unroll
      for (int i = 0; i < 4; ++i) konst_frag[i] = opaque(ZP ? 0xBF80BF80u : 0xC308C308u);  // bf16 -1, -136
    }
  }

  __device__ void copy(int window, int stage) const {
    copy_weights(window, stage);
    copy_act(window, stage);
  }

  __device__ void copy_act(int window, int stage) const {
    const uint32_t base = stage * S::kBytes, act = static_cast<uint32_t>(window) * (kWindow * 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) copy16(base + act_dst[h], act_src[h] + act);
  }

  // the codes and scales of a window
  __device__ void copy_weights(int window, int stage) const {
    const uint32_t base = stage * S::kBytes, codes = static_cast<uint32_t>(window) * 512u;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) copy16_evict_first(base + S::kCodes + b * 512 + code_dst, codes_src[b] + codes);
    if (E2M1) {
      // groups 2 w and 2 w + 1 sit at (c % 4) * 64 = (w % 2) * 128 + h * 64 of the 256 bytes of c / 8
      copy16_evict_first(base + meta_dst, meta_src + (window >> 2) * 256 + (window & 1) * 128);
    } else if (meta_dst >= 0) {
      const uint32_t pair = G32 ? window : (static_cast<uint32_t>(window) * kWindow >> log2_group) >> 1;
      copy16_evict_first(base + meta_dst, meta_src + static_cast<uint64_t>(pair) * meta_pair_stride);
    }
  }

  // The MMAs' B fragments (the 8 tokens' activations) of half windows h = 0, 1 and their two MMAs
  // m, paired as the decode pairs the codes: int4 values j, j + 2 (m = 0: j = 0, 4; m = 1: j = 1,
  // 5); E2M1 values j, j + 4 (m = 0: j = 0, 1; m = 1: j = 2, 3), times 2^63.
  __device__ void b_fragments(uint32_t base, uint32_t (&bfrag)[2][2][2]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t a[4];
      lds128(base + act_rd[h], a);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (E2M1) {
          bfrag[h][m][0] = times_2_63(__byte_perm(a[m], a[m + 2], 0x5410u));
          bfrag[h][m][1] = times_2_63(__byte_perm(a[m], a[m + 2], 0x7632u));
        } else {
          const uint32_t sel = m ? 0x7632u : 0x5410u;
          bfrag[h][m][0] = __byte_perm(a[0], a[1], sel);
          bfrag[h][m][1] = __byte_perm(a[2], a[3], sel);
        }
      }
    }
  }

  __device__ void multiply(const Problem& p, float (&acc)[kBlocks][4], int window, int stage) const {
    if (E2M1) {
      multiply_e2m1(p, acc, window, stage);
    } else {
      multiply_int4(p, acc, window, stage);
    }
  }

  // acc += this window's products for int4 codes. Per half window h: the MMAs' starting value. The
  // constant operand makes that -136 sum(a) for signed codes (offset 128 + 8), and -sum(a) for zero
  // points, multiplied by each row's 128 + z below. With groups of 32 each half window has its own
  // scale; larger groups cover the whole window, which then takes one scale.
  __device__ void multiply_int4(const Problem& p, float (&acc)[kBlocks][4], int window, int stage) const {
    constexpr int kRuns = G32 ? 2 : 1;
    const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint32_t base = stage * S::kBytes;
    uint32_t bfrag[2][2][2];
    b_fragments(base, bfrag);
    float start[kRuns][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        float(&st)[4] = start[G32 ? h : 0];
        mma_bf16(st, konst_frag, bfrag[h][m][0], bfrag[h][m][1], (m == 0 && (G32 || h == 0)) ? zeros : st);
      }
    }
    // which half of a scale or zero-point word holds the window's group (larger groups)
    const uint32_t half = ((window * kWindow) >> log2_group) & 1;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      uint32_t sw[2], zw[2] = {0, 0}, w[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sw[r] = lds32(base + scale_row + b * 64 + r * 32);
        if (ZP) {
          asm volatile("ld.shared.u16 %0, [%1];" : "=r"(zw[r]) : "r"(base + zero_row + b * 32 + r * 16));
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) w[h][r] = lds32(base + code_rd[r] + b * 512 + h * 256);
      }
#pragma unroll
      for (int run = 0; run < kRuns; ++run) {
        const uint32_t which = G32 ? run : half;
        float s[2], c[4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          // the row's bf16 scale as fp32: its 16 bits on top of a zero half
          if (G32) {
            s[r] = __uint_as_float(run ? sw[r] & 0xFFFF0000u : sw[r] << 16);
          } else {
            s[r] = __uint_as_float(__byte_perm(sw[r], 0, half ? 0x3244u : 0x1044u));
          }
          float offset = 1.0f;
          if (ZP) {
            // 2^23 + z from the byte under the float 2^23's bits, less 2^23 - 128: the row's 128 + z
            offset = __uint_as_float(__byte_perm(zw[r], 0x4B000000u, 0x7440u | which)) - 8388480.0f;
          }
          c[2 * r] = ZP ? start[run][2 * r] * offset : start[run][2 * r];
          c[2 * r + 1] = ZP ? start[run][2 * r + 1] * offset : start[run][2 * r + 1];
        }
        float sum[4];
#pragma unroll
        for (int i = 0; i < 2 / kRuns; ++i) {
          const int h = G32 ? run : i;
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            // values j, j + 2 (m = 0: j = 0; m = 1: j = 1) and j + 4, j + 6 of each row's word
            uint32_t lo[2], hi[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              lo[r] = m ? w[h][r] >> 8 : w[h][r];
              hi[r] = __umulhi(w[h][r], p.shift_mul[m]);
            }
            const uint32_t frag[4] = {codes_pair<ZP>(lo[0]), codes_pair<ZP>(lo[1]), codes_pair<ZP>(hi[0]),
                                      codes_pair<ZP>(hi[1])};
            mma_bf16(sum, frag, bfrag[h][m][0], bfrag[h][m][1], (i == 0 && m == 0) ? c : sum);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[b][i] = fmaf(s[i / 2], sum[i], acc[b][i]);
      }
    }
  }

  // acc += this window's products for E2M1 codes: per block and half window h (one group), the
  // MMAs from zero, scaled into the accumulator by 2^(e - 64).
  __device__ void multiply_e2m1(const Problem& p, float (&acc)[kBlocks][4], int window, int stage) const {
    const float zeros[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const uint32_t base = stage * S::kBytes;
    const uint32_t half_word = ((window >> 1) & 1) * 2;  // which half of each row's 4 scale bytes
    uint32_t scale_at[kBlocks];  // one add per block per window; stage, h and r become immediates
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) scale_at[b] = scale_rd[b] + half_word;
    uint32_t bfrag[2][2][2];
    b_fragments(base, bfrag);
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      uint32_t w[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int h = 0; h < 2; ++h) w[h][r] = lds32(base + code_rd[r] + b * 512 + h * 256);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float s[2], sum[4];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          uint32_t e;
          asm volatile("ld.shared.u8 %0, [%1];" : "=r"(e) : "r"(scale_at[b] + (base + h * 64 + r * 32)));
          s[r] = __uint_as_float(e * p.exp_mul + (63u << 23));
        }
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          uint32_t row[2][2];
#pragma unroll
          for (int r = 0; r < 2; ++r) e2m1_pairs(w[h][r], m, p.shift_mul[0], row[r]);
          const uint32_t frag[4] = {row[0][0], row[1][0], row[0][1], row[1][1]};
          mma_bf16(sum, frag, bfrag[h][m][0], bfrag[h][m][1], m == 0 ? zeros : sum);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[b][i] = fmaf(s[i / 2], sum[i], acc[b][i]);
      }
    }
  }

  // acc += windows first, first + step, ... (< last), each copied STAGES - 1 windows ahead of its
  // product; the i-th sits in stage i % STAGES, so the loop runs STAGES windows per turn. The
  // first windows' weights are requested before the kernel waits for the one launched before it
  // (which wrote the activations, see wait_for_primary), and land in the first copy group.
  __device__ void run(const Problem& p, float (&acc)[kBlocks][4], int first, int last, int step) const {
    const int count = first < last ? (last - first + step - 1) / step : 0;
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < count) copy_weights(first + i * step, i);
    }
    wait_for_primary();
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (i < count) copy_act(first + i * step, i);
      copies_done();  // empty groups keep the count uniform
    }
    for (int j = 0; j < count; j += STAGES) {
#pragma unroll
      for (int i = 0; i < STAGES; ++i) {
        if (j + i < count) {
          wait_copies<STAGES - 2>();  // window j + i has landed (this lane's part) ...
          __syncwarp();               // ... every lane's, and the stage refilled next is read out
          if (j + i + STAGES - 1 < count) copy(first + (j + i + STAGES - 1) * step, (i + STAGES - 1) % STAGES);
          copies_done();
          multiply(p, acc, first + (j + i) * step, i);
        }
      }
    }
  }
};

// Runs a CTA's GEMM: warp w takes the blocks `rows(w / k_warps)` (skipped past n) and every
// k_warps-th window, from the (w % k_warps)-th on, of CTA-split `part` of `parts` of K. The
// k_warps partial products of each row group are summed in warp order (results do not depend on
// timing) into the group's first warp, which gets true and the sums.
template <int STAGES, Codes C, bool G32, typename Rows>
__device__ bool cta_gemm(const Problem& p, int mb, int part, int parts, Rows rows_of, float (&acc)[kBlocks][4]) {
  extern __shared__ __align__(16) unsigned char ring[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / p.k_warps, kpart = warp % p.k_warps;
  int64_t rows[kBlocks];
  rows_of(group, rows);
  const bool in_range = rows[0] < p.n;
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.0f;
  }
  if (in_range) {
    WarpGemm<STAGES, C, G32> gemm;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
    gemm.init(p, __ldg(p.expert_ids + mb), rows, p.sorted_ids + mb * 8, base + warp * STAGES * Stage<C>::kBytes);
    // the CTA's share of K, its windows dealt out to the k_warps warps in turn: together they read
    // k_warps consecutive windows of each block at a time, longer runs of DRAM than a quarter each
    const int64_t windows = p.k / kWindow;
    const int first = static_cast<int>(windows * part / parts), last = static_cast<int>(windows * (part + 1) / parts);
    gemm.run(p, acc, first + kpart, last, p.k_warps);
  }
  wait_copies<0>();
  __syncthreads();  // every warp is done with its ring: the partial sums reuse it
  float* sums = reinterpret_cast<float*>(ring);
  if (kpart > 0) {
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int c = 0; c < 4; ++c) sums[(warp * kBlocks * 4 + b * 4 + c) * 32 + lane] = acc[b][c];
    }
  }
  __syncthreads();
  if (kpart > 0 || !in_range) return false;
  for (int w = warp + 1; w < warp + p.k_warps; ++w) {
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[b][c] += sums[(w * kBlocks * 4 + b * 4 + c) * 32 + lane];
    }
  }
  return true;
}

// The routed pairs of lane (g, t)'s accumulator columns, tokens 2t and 2t + 1 of block mb
__device__ __forceinline__ void lane_pairs(const Problem& p, int mb, int (&pairs)[2]) {
  const int32_t* ids = p.sorted_ids + mb * 8 + 2 * (threadIdx.x % 4);
  pairs[0] = __ldg(ids);
  pairs[1] = __ldg(ids + 1);
}

// Calls f(b, c, pair, row) for lane (g, t)'s accumulator values acc[b][c], b < BLOCKS, of real routed
// pairs: c is token 2t + c % 2 of block mb and weight row g + 8 (c / 2) of the b-th block from `first`.
template <int BLOCKS, typename F>
__device__ __forceinline__ void for_each_output(const Problem& p, int mb, int64_t first, F f) {
  int pairs[2];
  lane_pairs(p, mb, pairs);
#pragma unroll
  for (int b = 0; b < BLOCKS; ++b) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (pairs[c % 2] < p.num_pairs) f(b, c, pairs[c % 2], first + 16 * b + threadIdx.x % 32 / 4 + 8 * (c / 2));
    }
  }
}

// h[p, c] = act(x W_gate^T + b_gate, x W_up^T + b_up)[c]: each warp group takes kBlocks / 2 blocks
// of 16 columns (their gate rows, then their up rows). Also zeroes `out` for w2_kernel. CTAs from
// the linear index `early_from` on let the down projection start as soon as the routing is done
// (see wait_for_primary).
// (Both kernels ask for 20 warps per SM with 4-warp CTAs, 16 with 8: 96 or 128 registers.)
template <int WARPS, int STAGES, Codes C, bool G32>
__global__ void __launch_bounds__(WARPS * 32, kDecodeWarpsPerSm / WARPS)
    w13_kernel(Problem p, const __nv_bfloat16* bias, MoeDecodeActivation act, __nv_bfloat16* h, uint4* out,
               int64_t out_units, int64_t early_from) {
  wait_for_primary();  // the routing, and whatever used `out` before
  const int64_t cta = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const bool early = cta >= early_from;
  if (early) allow_dependents();
  zero_units(out, out_units, cta, ctas);

  const int mb = blockIdx.x;
  if (mb * 8 >= __ldg(p.num_padded)) return;
  constexpr int CB = kBlocks / 2;  // column blocks per warp
  const int64_t inter = p.n / 2, groups = WARPS / p.k_warps;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * groups * CB * 16;
  // stored rows of the blocks: [gate; up], or gate and up blocks alternating
  auto rows_of = [&](int group, int64_t (&rows)[kBlocks]) {
    const int64_t first = col0 + group * CB * 16;
#pragma unroll
    for (int b = 0; b < CB; ++b) {
      const int64_t col = first + 16 * b;
      rows[b] = first >= inter ? p.n : p.gu_interleaved ? 2 * col : col;  // past the end: skipped
      rows[CB + b] = p.gu_interleaved ? 2 * col + 16 : inter + col;
    }
  };
  float acc[kBlocks][4];
  const bool first = cta_gemm<STAGES, C, G32>(p, mb, 0, 1, rows_of, acc);
  if (!early) allow_dependents();
  if (!first) return;
  if (bias) bias += __ldg(p.expert_ids + mb) * p.n;
  for_each_output<CB>(p, mb, col0 + (threadIdx.x / 32 / p.k_warps) * CB * 16, [&](int b, int c, int pair, int64_t col) {
    float gate = acc[b][c], up = acc[CB + b][c];
    if (bias) {
      gate += __bfloat162float(bias[col]);
      up += __bfloat162float(bias[inter + col]);
    }
    h[pair * inter + col] = __float2bfloat16_rn(activate(gate, up, act));
  });
}

// out[p / top_k, c] += topk_weight[p] * (h[p] W_down^T + b)[c]: each warp group takes kBlocks
// blocks of 16 output columns, and each CTA along z its share of K (the first adds the bias).
template <int WARPS, int STAGES, Codes C, bool G32>
__global__ void __launch_bounds__(WARPS * 32, kDecodeWarpsPerSm / WARPS)
    w2_kernel(Problem p, const __nv_bfloat16* bias, __nv_bfloat16* out, int64_t stride_out, const float* topk_weights,
              int top_k) {
  const int mb = blockIdx.x;
  if (mb * 8 >= __ldg(p.num_padded)) return;
  const int64_t groups = WARPS / p.k_warps;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * groups * kBlocks * 16;
  auto rows_of = [&](int group, int64_t (&rows)[kBlocks]) {
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) rows[b] = row0 + (group * kBlocks + b) * 16;
  };
  float acc[kBlocks][4];
  if (!cta_gemm<STAGES, C, G32>(p, mb, blockIdx.z, gridDim.z, rows_of, acc)) return;
  // even g adds two adjacent output columns of token 2t, odd g of token 2t + 1 (adjacent_columns)
  const int lane = threadIdx.x % 32, g = lane / 4, odd = g & 1;
  int pairs[2];
  lane_pairs(p, mb, pairs);
  float weight[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) weight[i] = pairs[i] < p.num_pairs ? __ldg(topk_weights + pairs[i]) : 0.0f;
  const int pair = pairs[odd];
  const int64_t col = row0 + (threadIdx.x / 32 / p.k_warps) * kBlocks * 16 + g;  // of acc[0][0]
  __nv_bfloat16* dst = out + (pair / top_k) * stride_out + (col & ~1);
  if (blockIdx.z > 0) bias = nullptr;
  if (bias) bias += __ldg(p.expert_ids + mb) * p.n + col;
#pragma unroll
  for (int b = 0; b < kBlocks; ++b) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float add = bias ? __bfloat162float(bias[16 * b + 8 * r]) : 0.0f;
      const float v0 = (acc[b][2 * r] + add) * weight[0], v1 = (acc[b][2 * r + 1] + add) * weight[1];
      const float2 v = adjacent_columns(v0, v1, odd);
      if (pair < p.num_pairs) add_bf16x2(dst + 16 * b + 8 * r, v.x, v.y);
    }
  }
}

Problem make_problem(const MoeGemmArgs& a, const void* act, int64_t act_stride, int act_div) {
  return Problem{static_cast<const __nv_bfloat16*>(act), act_stride, act_div, a.words, a.scale,
                 static_cast<const uint16_t*>(a.zero), a.n, a.k, a.groups, a.group_size, a.gu_interleaved,
                 a.sorted_ids, a.expert_ids, a.num_padded, a.num_pairs, a.k_warps,
                 {a.e2m1 ? 1u << 24 : 1u << 28, 1u << 20}, 1u << 23};
}

// Launches KERNEL, as a programmatic dependent of the stream's previous kernel if the kernel was
// compiled for sm_90+: one compiled for an older GPU (run through PTX JIT) has no wait_for_primary
// and must not start early. EARLY_FROM: the kernel's last parameter is the first
// CTA (linear index) of its last `resident` ones, which start after every earlier one has.
template <int WARPS, int STAGES, Codes C, bool EARLY_FROM, auto KERNEL, typename... Args>
int launch(dim3 grid, void* stream, Args... args) {
  constexpr int smem = ring_bytes<WARPS, STAGES, C>();
  static_assert(smem >= WARPS * kBlocks * 4 * 32 * 4, "the ring holds the partial sums");
  const KernelFacts facts = facts_of<KERNEL, WARPS * 32, smem>();
  if (facts.error != cudaSuccess) return static_cast<int>(facts.error);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(WARPS * 32);
  config.dynamicSmemBytes = smem;
  config.stream = static_cast<cudaStream_t>(stream);
  config.attrs = &attr;
  config.numAttrs = facts.ptx_version >= 90 ? 1 : 0;
  if constexpr (EARLY_FROM) {
    const int64_t ctas = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    const int64_t early_from = std::max<int64_t>(0, ctas - facts.resident_ctas);
    return static_cast<int>(cudaLaunchKernelEx(&config, KERNEL, args..., early_from));
  } else {
    return static_cast<int>(cudaLaunchKernelEx(&config, KERNEL, args...));
  }
}

// KERNEL instantiated for the supported (warps per CTA, stages, codes, groups of 32)
#define MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, C, G32, GRID, ...) \
  return launch<W, S, C, EARLY_FROM, &KERNEL<W, S, C, G32>>(GRID, stream, __VA_ARGS__)
#define MOEPREP_LAUNCH(KERNEL, EARLY_FROM, W, S, GRID, ...)                                                   \
  do {                                                                                                        \
    if (a.e2m1) MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, Codes::kE2m1, true, GRID, __VA_ARGS__);        \
    if (a.group_size == 32) {                                                                                 \
      if (a.zero) MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, Codes::kZeroPoint, true, GRID, __VA_ARGS__); \
      MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, Codes::kSigned, true, GRID, __VA_ARGS__);                \
    }                                                                                                         \
    if (a.zero) MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, Codes::kZeroPoint, false, GRID, __VA_ARGS__);  \
    MOEPREP_LAUNCH_CODES(KERNEL, EARLY_FROM, W, S, Codes::kSigned, false, GRID, __VA_ARGS__);                 \
  } while (0)
#define MOEPREP_DISPATCH(KERNEL, EARLY_FROM, GRID, ...)                                             \
  do {                                                                                              \
    if (a.warps == 4 && a.stages == 2) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 4, 2, GRID, __VA_ARGS__); \
    if (a.warps == 4 && a.stages == 3) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 4, 3, GRID, __VA_ARGS__); \
    if (a.warps == 4 && a.stages == 4) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 4, 4, GRID, __VA_ARGS__); \
    if (a.warps == 8 && a.stages == 2) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 8, 2, GRID, __VA_ARGS__); \
    if (a.warps == 8 && a.stages == 3) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 8, 3, GRID, __VA_ARGS__); \
    if (a.warps == 8 && a.stages == 4) MOEPREP_LAUNCH(KERNEL, EARLY_FROM, 8, 4, GRID, __VA_ARGS__); \
    return static_cast<int>(cudaErrorInvalidValue);                                                 \
  } while (0)

}  // namespace
}  // namespace moeprep

extern "C" {

int moeprep_moe_decode_w13(MoeGemmArgs a, const void* x, int64_t stride_x, int top_k, MoeDecodeActivation act,
                           void* h, void* out, int64_t out_numel, void* stream) {
  using namespace moeprep;
  const Problem p = make_problem(a, x, stride_x, top_k);
  const int64_t cols_per_cta = static_cast<int64_t>(a.warps / a.k_warps) * (kBlocks / 2) * 16;
  const dim3 grid(static_cast<unsigned>(a.num_m_blocks),
                  static_cast<unsigned>((a.n / 2 + cols_per_cta - 1) / cols_per_cta));
  MOEPREP_DISPATCH(w13_kernel, true, grid, p, static_cast<const __nv_bfloat16*>(a.bias), act,
                   static_cast<__nv_bfloat16*>(h), static_cast<uint4*>(out), out_numel / 8);
}

int moeprep_moe_decode_w2(MoeGemmArgs a, const void* h, int top_k, void* out, int64_t stride_out,
                          const float* topk_weights, int split, void* stream) {
  using namespace moeprep;
  const Problem p = make_problem(a, h, a.k, 1);
  const int64_t rows_per_cta = static_cast<int64_t>(a.warps / a.k_warps) * kBlocks * 16;
  const dim3 grid(static_cast<unsigned>(a.num_m_blocks), static_cast<unsigned>((a.n + rows_per_cta - 1) / rows_per_cta),
                  static_cast<unsigned>(split));
  MOEPREP_DISPATCH(w2_kernel, false, grid, p, static_cast<const __nv_bfloat16*>(a.bias),
                   static_cast<__nv_bfloat16*>(out), stride_out, topk_weights, top_k);
}

}  // extern "C"
