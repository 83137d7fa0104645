// Decode-size grouped GEMMs of the int4 MoE targets (w4a16_preshuffle, w4a16_preshuffle_zp) on
// CUDA tensor cores: mma.sync m16n8k16 with bf16 operands (sm_80+), fp32 accumulation.
//
// Why a hand-written kernel: at a few tokens per expert the GEMMs stream the weights once, and
// what bounds them is the instructions spent per weight. Triton 3.6 moves every decoded bf16 tile
// through shared memory to reach the MMA's operand layout (5.4 instructions per weight in all).
// Here the packed codes, activations and scales are copied into a per-warp shared-memory ring by
// cp.async, a few 64-k windows ahead; each lane reads exactly the codes of its mma.sync fragments
// and decodes them in registers, two bf16 per instruction, straight into the MMA: 2.9
// instructions per weight in the loop.
//
// The (16,16) preshuffle (LAYOUTS.md) stores each 16-row block of a matrix as 16-k chunks of
// 16 rows x 8 bytes; row r of chunk c is the int32 pair at word (c * 16 + r) * 2 of the block,
// value j of a word (k = 8 * word + j) in bits 8 * (j % 4) + 4 * (j / 4). Lane (g, t) of a warp
// takes rows g and g + 8 of a block and chunk t of each 64-k window: one 8-byte read per row.
// A dot product may run over k in any order as long as both operands use the same one, so the
// MMA's k slots are assigned to whatever pairs one `lop3` decodes (values j and j + 2 of a word),
// and the activations are paired the same way with `prmt`.
//
// CUDA only: HIP builds and other GPUs take the Triton kernels (moeprep/kernels/moe_gemm.py).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "moe_decode.h"

namespace moeprep {
namespace {

constexpr int kWindow = 64;  // k per warp step: 4 lanes x one 16-k chunk

// bf16 arithmetic and bf16 MMAs need sm_80; builds for older GPUs keep the kernels as traps (the
// Python side only launches them on sm_80+)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MOEPREP_BF16_MMA 0
#else
#define MOEPREP_BF16_MMA 1
#endif

__device__ __forceinline__ uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
#if MOEPREP_BF16_MMA
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
#else
  __trap();
#endif
  return d;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if MOEPREP_BF16_MMA
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

__device__ __forceinline__ void copy16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void copies_done() { asm volatile("cp.async.commit_group;"); }
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

// The bf16 pair (u_lo - z, u_hi - z) * s of the nibbles at bits sh and sh + 16: each code lands in
// the mantissa of the bf16 128 (unit in the last place 1), the zero point's 128 + z is subtracted
// exactly, and the product with the scale is rounded once, as bf16 of the exact (u - z) * s.
// Signed codes are stored as two's complement nibbles: u = q ^ 8 with zero point 8, the xor
// folded into the same lop3 (0x6A: (a & b) ^ c, where c's bit 3 flips the nibble's top bit).
template <bool ZP>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int sh, uint32_t offset2, uint32_t scale2) {
  uint32_t x;
  if (ZP) {
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(x) : "r"(word >> sh));  // (a & b) | c
  } else {
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43084308, 0x6A;" : "=r"(x) : "r"(word >> sh));  // (a & b) ^ c
  }
  return fma_bf16x2(fma_bf16x2(offset2, 0xBF80BF80u, x), scale2, 0x80008000u);  // 0xBF80: -1, 0x8000: -0
}

struct Problem {
  const __nv_bfloat16* act;  // activation rows; pair p reads row p / act_div
  int64_t act_stride;
  int act_div;
  const uint32_t* words;  // [E, N, K / 8] in the preshuffled order
  const uint32_t* scale;  // bf16 [E, G / 2, N, 2] read as one word per (row, group pair)
  const uint16_t* zero;   // uint8 in the scales' layout, or null (signed codes, zero point 8)
  int64_t n, k;
  int groups, group_size;
  const int32_t* sorted_ids;  // the routed pairs, in blocks of 8 per expert
  const int32_t* expert_ids;
  const int32_t* num_padded;
  int num_pairs;
  int k_warps;  // warps of a CTA that split K for the same rows (the others take further rows)
};

// A warp's shared-memory copy of one 64-k window (bytes): the codes of its NB 16-row blocks (four
// 128-byte chunks each), its 8 tokens' activations, and the blocks' scale and zero-point words of
// the window's group pair (group sizes >= 32 keep a window inside one pair).
template <int NB>
struct Stage {
  static constexpr int kCodes = 0;
  static constexpr int kAct = NB * 512;
  static constexpr int kScale = kAct + 1024;
  static constexpr int kZero = kScale + NB * 64;
  static constexpr int kBytes = kZero + NB * 32;
};
constexpr int kBlocks = 4;  // 16-row blocks per warp (w13: two of gate rows, then their two of up rows)

template <int WARPS, int STAGES>
constexpr int ring_bytes() {
  return WARPS * STAGES * Stage<kBlocks>::kBytes;
}

// Where 16-byte unit `unit` of a 128-byte row of 8 units lands: units are xor-swizzled so that
// the fragment reads of a warp hit distinct banks.
__device__ __forceinline__ int code_unit(int chunk, int unit) { return chunk * 8 + (unit ^ ((2 * chunk) & 7)); }
__device__ __forceinline__ int act_unit(int token, int unit) { return token * 8 + (unit ^ (token & 1)); }

// One warp's product of NB 16-row blocks of an expert's matrix with the 8 routed rows of a block,
// over a range of 64-k windows. Lane (g, t) ends with acc[b] = rows g and g + 8 of block b times
// tokens 2t and 2t + 1 (the mma.sync accumulator layout).
template <int NB, int STAGES, bool ZP>
struct WarpGemm {
  using S = Stage<NB>;
  // copies issued by this lane, at window 0
  const uint32_t* codes_src[NB];  // unit `lane` of each block's 512 bytes
  const __nv_bfloat16* act_src[2];  // units lane and lane + 32 of the 8 token rows
  const char* meta_src;           // lanes 0 to 4 NB - 1: 16 bytes of scales; from lane 16: of zero points
  int meta_dst;
  int lane, t, log2_group;
  int64_t meta_pair_stride;  // meta_src's step from one group pair to the next, in bytes
  uint32_t ring;             // this warp's STAGES stages

  __device__ void init(const Problem& p, int64_t expert, const int64_t (&rows)[NB], const int32_t* ids,
                       uint32_t ring_) {
    lane = threadIdx.x % 32;
    t = lane % 4;
    ring = ring_;
    log2_group = __ffs(p.group_size) - 1;
    const uint32_t* words = p.words + expert * (p.n * p.k / 8);
#pragma unroll
    for (int b = 0; b < NB; ++b) codes_src[b] = words + rows[b] / 16 * (2 * p.k) + lane * 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int unit = lane + 32 * h;
      const int pair = __ldg(ids + unit / 8);
      // padding reads row 0: it only feeds its own column of the product, which is never stored
      const int64_t row = pair < p.num_pairs ? pair / p.act_div : 0;
      act_src[h] = p.act + row * p.act_stride + (unit % 8) * 8;
    }
    const int64_t scale_words = expert * p.groups * p.n / 2;
    meta_src = nullptr;
    meta_dst = -1;
    meta_pair_stride = 0;
    if (lane < 4 * NB) {
      meta_src = reinterpret_cast<const char*>(p.scale + scale_words + rows[lane / 4] + (lane % 4) * 4);
      meta_dst = S::kScale + lane * 16;
      meta_pair_stride = p.n * 4;
    } else if (ZP && lane >= 16 && lane < 16 + 2 * NB) {
      meta_src = reinterpret_cast<const char*>(p.zero + scale_words + rows[(lane - 16) / 2] + (lane % 2) * 8);
      meta_dst = S::kZero + (lane - 16) * 16;
      meta_pair_stride = p.n * 2;
    }
  }

  __device__ void copy(int window, int stage) const {
    const uint32_t base = ring + stage * S::kBytes;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      copy16(base + S::kCodes + b * 512 + code_unit(lane / 8, lane % 8) * 16, codes_src[b] + window * (kWindow * 2));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int unit = lane + 32 * h;
      copy16(base + S::kAct + act_unit(unit / 8, unit % 8) * 16, act_src[h] + window * kWindow);
    }
    if (meta_dst >= 0) {
      const int64_t pair = static_cast<int64_t>((window * kWindow) >> log2_group) >> 1;
      copy16(base + meta_dst, meta_src + pair * meta_pair_stride);
    }
  }

  __device__ void multiply(float (&acc)[NB][4], int window, int stage) const {
    const uint32_t base = ring + stage * S::kBytes;
    const int g = lane / 4;
    const int group = (window * kWindow + t * 16) >> log2_group;
    const uint32_t pick_scale = (group & 1) ? 0x3232u : 0x1010u;
    const uint32_t pick_zero = (group & 1) ? 0x4141u : 0x4040u;
    // activations j and j + 2 of each 4, as the codes pair up: B fragment (mma m, half h)
    uint32_t a[8], bfrag[4][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(a[4 * h]), "=r"(a[4 * h + 1]), "=r"(a[4 * h + 2]), "=r"(a[4 * h + 3])
                   : "r"(base + S::kAct + act_unit(g, 2 * t + h) * 16));
    }
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const uint32_t sel = (m & 1) ? 0x7632u : 0x5410u;
      bfrag[m][0] = __byte_perm(a[4 * (m / 2)], a[4 * (m / 2) + 1], sel);
      bfrag[m][1] = __byte_perm(a[4 * (m / 2) + 2], a[4 * (m / 2) + 3], sel);
    }
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      uint32_t w[2][2], scale2[2], offset2[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = g + 8 * r;
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                     : "=r"(w[r][0]), "=r"(w[r][1])
                     : "r"(base + S::kCodes + b * 512 + code_unit(t, row / 2) * 16 + (row % 2) * 8));
        uint32_t sw;
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sw) : "r"(base + S::kScale + b * 64 + row * 4));
        scale2[r] = __byte_perm(sw, 0, pick_scale);
        if (ZP) {
          uint32_t zw;
          asm volatile("ld.shared.u16 %0, [%1];" : "=r"(zw) : "r"(base + S::kZero + b * 32 + row * 2));
          offset2[r] = __byte_perm(zw, 0, pick_zero) | 0x43004300u;
        } else {
          offset2[r] = 0x43084308u;
        }
      }
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int sh = 8 * (m & 1);
        const uint32_t frag[4] = {dequant_pair<ZP>(w[0][m / 2], sh, offset2[0], scale2[0]),
                                  dequant_pair<ZP>(w[1][m / 2], sh, offset2[1], scale2[1]),
                                  dequant_pair<ZP>(w[0][m / 2], sh + 4, offset2[0], scale2[0]),
                                  dequant_pair<ZP>(w[1][m / 2], sh + 4, offset2[1], scale2[1])};
        mma_bf16(acc[b], frag, bfrag[m][0], bfrag[m][1]);
      }
    }
  }

  // acc += windows [first, last), each copied STAGES - 1 windows ahead of its product; window
  // first + i sits in stage i % STAGES, so the loop runs STAGES windows per turn
  __device__ void run(float (&acc)[NB][4], int first, int last) const {
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
      if (first + i < last) copy(first + i, i);
      copies_done();  // empty groups keep the count uniform
    }
    for (int w = first; w < last; w += STAGES) {
#pragma unroll
      for (int i = 0; i < STAGES; ++i) {
        if (w + i < last) {
          wait_copies<STAGES - 2>();  // window w + i has landed (this lane's part) ...
          __syncwarp();               // ... every lane's, and the stage refilled next is read out
          if (w + i + STAGES - 1 < last) copy(w + i + STAGES - 1, (i + STAGES - 1) % STAGES);
          copies_done();
          multiply(acc, w + i, i);
        }
      }
    }
  }
};

// Runs a CTA's GEMM: warp w takes the NB blocks `rows(w / k_warps)` (skipped past n) and the
// (w % k_warps)-th share of K's windows of CTA-split `part` of `parts`. The k_warps partial
// products of each row group are summed in warp order (results do not depend on timing) into
// the group's first warp, which gets true and the sums.
template <int NB, int STAGES, bool ZP, typename Rows>
__device__ bool cta_gemm(const Problem& p, int mb, int part, int parts, Rows rows_of, float (&acc)[NB][4]) {
  extern __shared__ __align__(16) unsigned char ring[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = warp / p.k_warps, kpart = warp % p.k_warps;
  int64_t rows[NB];
  rows_of(group, rows);
  const bool in_range = rows[0] < p.n;
#pragma unroll
  for (int b = 0; b < NB; ++b) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[b][c] = 0.0f;
  }
  if (in_range) {
    WarpGemm<NB, STAGES, ZP> gemm;
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
    gemm.init(p, __ldg(p.expert_ids + mb), rows, p.sorted_ids + mb * 8, base + warp * STAGES * Stage<NB>::kBytes);
    const int64_t windows = p.k / kWindow, share = static_cast<int64_t>(part) * p.k_warps + kpart;
    const int all = parts * p.k_warps;
    gemm.run(acc, static_cast<int>(windows * share / all), static_cast<int>(windows * (share + 1) / all));
  }
  wait_copies<0>();
  __syncthreads();  // every warp is done with its ring: the partial sums reuse it
  float* sums = reinterpret_cast<float*>(ring);
  if (kpart > 0) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
#pragma unroll
      for (int c = 0; c < 4; ++c) sums[(warp * NB * 4 + b * 4 + c) * 32 + lane] = acc[b][c];
    }
  }
  __syncthreads();
  if (kpart > 0 || !in_range) return false;
  for (int w = warp + 1; w < warp + p.k_warps; ++w) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[b][c] += sums[(w * NB * 4 + b * 4 + c) * 32 + lane];
    }
  }
  return true;
}

// Calls f(b, c, pair, row) for lane (g, t)'s accumulator values acc[b][c], b < NB, of real routed
// pairs: c is token 2t + c % 2 of block mb and weight row g + 8 (c / 2) of the b-th block from `first`.
template <int NB, typename F>
__device__ __forceinline__ void for_each_output(const Problem& p, int mb, int64_t first, F f) {
  const int lane = threadIdx.x % 32;
  const int32_t* ids = p.sorted_ids + mb * 8 + 2 * (lane % 4);
  const int pairs[2] = {__ldg(ids), __ldg(ids + 1)};
#pragma unroll
  for (int b = 0; b < NB; ++b) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (pairs[c % 2] < p.num_pairs) f(b, c, pairs[c % 2], first + 16 * b + lane / 4 + 8 * (c / 2));
    }
  }
}

// h[p, c] = silu(x W_gate^T)[c] * (x W_up^T)[c]: each warp group takes NB / 2 blocks of 16
// columns (their gate rows, then their up rows). Also zeroes `out` for w2_kernel.
// (Both kernels ask for 24 warps per SM: 80 registers, enough to hide the latency the rings leave.)
template <int WARPS, int STAGES, bool ZP>
__global__ void __launch_bounds__(WARPS * 32, 24 / WARPS)
    w13_kernel(Problem p, __nv_bfloat16* h, uint4* out, int64_t out_units) {
  const int64_t cta = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y;
  for (int64_t i = cta * blockDim.x + threadIdx.x; i < out_units; i += ctas * blockDim.x) {
    out[i] = make_uint4(0, 0, 0, 0);
  }

  const int mb = blockIdx.x;
  if (mb * 8 >= __ldg(p.num_padded)) return;
  constexpr int NB = kBlocks, C = NB / 2;  // C: column blocks per warp
  const int64_t inter = p.n / 2, groups = WARPS / p.k_warps;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * groups * C * 16;
  auto rows_of = [&](int group, int64_t (&rows)[NB]) {
    const int64_t first = col0 + group * C * 16;
#pragma unroll
    for (int b = 0; b < C; ++b) {
      rows[b] = first < inter ? first + 16 * b : p.n;  // past the end: skipped
      rows[C + b] = inter + first + 16 * b;
    }
  };
  float acc[NB][4];
  if (!cta_gemm<NB, STAGES, ZP>(p, mb, 0, 1, rows_of, acc)) return;
  for_each_output<C>(p, mb, col0 + (threadIdx.x / 32 / p.k_warps) * C * 16, [&](int b, int c, int pair, int64_t col) {
    const float gate = acc[b][c], up = acc[C + b][c];
    h[pair * inter + col] = __float2bfloat16_rn(gate / (1.0f + __expf(-gate)) * up);
  });
}

// out[p / top_k, c] += topk_weight[p] * (h[p] W_down^T)[c]: each warp group takes NB blocks of 16
// output columns, and each CTA along z its share of K.
template <int WARPS, int STAGES, bool ZP>
__global__ void __launch_bounds__(WARPS * 32, 24 / WARPS)
    w2_kernel(Problem p, __nv_bfloat16* out, int64_t stride_out, const float* topk_weights, int top_k) {
  const int mb = blockIdx.x;
  if (mb * 8 >= __ldg(p.num_padded)) return;
  constexpr int NB = kBlocks;
  const int64_t groups = WARPS / p.k_warps;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * groups * NB * 16;
  auto rows_of = [&](int group, int64_t (&rows)[NB]) {
#pragma unroll
    for (int b = 0; b < NB; ++b) rows[b] = row0 + (group * NB + b) * 16;
  };
  float acc[NB][4];
  if (!cta_gemm<NB, STAGES, ZP>(p, mb, blockIdx.z, gridDim.z, rows_of, acc)) return;
  for_each_output<NB>(p, mb, row0 + (threadIdx.x / 32 / p.k_warps) * NB * 16, [&](int b, int c, int pair, int64_t col) {
    atomicAdd(out + (pair / top_k) * stride_out + col, __float2bfloat16_rn(acc[b][c] * __ldg(topk_weights + pair)));
  });
}

Problem make_problem(const MoeDecodeArgs& a, const void* act, int64_t act_stride, int act_div) {
  return Problem{static_cast<const __nv_bfloat16*>(act), act_stride, act_div, a.words,
                 static_cast<const uint32_t*>(a.scale), static_cast<const uint16_t*>(a.zero), a.n, a.k, a.groups,
                 a.group_size, a.sorted_ids, a.expert_ids, a.num_padded, a.num_pairs, a.k_warps};
}

template <int WARPS, int STAGES, typename... Params, typename... Args>
int launch(void (*kernel)(Params...), dim3 grid, void* stream, Args... args) {
  constexpr int smem = ring_bytes<WARPS, STAGES>();
  static_assert(smem >= WARPS * kBlocks * 4 * 32 * 4, "the ring holds the partial sums");
  const cudaError_t set = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (set != cudaSuccess) return static_cast<int>(set);
  kernel<<<grid, WARPS * 32, smem, static_cast<cudaStream_t>(stream)>>>(args...);
  return static_cast<int>(cudaGetLastError());
}

// KERNEL instantiated for the supported (warps per CTA, stages, zero points)
#define MOEPREP_LAUNCH(KERNEL, W, S, GRID, ...)                                                   \
  return a.zero ? launch<W, S>(KERNEL<W, S, true>, GRID, stream, __VA_ARGS__)                    \
                : launch<W, S>(KERNEL<W, S, false>, GRID, stream, __VA_ARGS__)
#define MOEPREP_DISPATCH(KERNEL, GRID, ...)                                                       \
  do {                                                                                           \
    if (a.warps == 4 && a.stages == 2) MOEPREP_LAUNCH(KERNEL, 4, 2, GRID, __VA_ARGS__);          \
    if (a.warps == 4 && a.stages == 3) MOEPREP_LAUNCH(KERNEL, 4, 3, GRID, __VA_ARGS__);          \
    if (a.warps == 4 && a.stages == 4) MOEPREP_LAUNCH(KERNEL, 4, 4, GRID, __VA_ARGS__);          \
    if (a.warps == 8 && a.stages == 2) MOEPREP_LAUNCH(KERNEL, 8, 2, GRID, __VA_ARGS__);          \
    if (a.warps == 8 && a.stages == 3) MOEPREP_LAUNCH(KERNEL, 8, 3, GRID, __VA_ARGS__);          \
    if (a.warps == 8 && a.stages == 4) MOEPREP_LAUNCH(KERNEL, 8, 4, GRID, __VA_ARGS__);          \
    return static_cast<int>(cudaErrorInvalidValue);                                              \
  } while (0)

}  // namespace
}  // namespace moeprep

extern "C" {

int moeprep_moe_decode_w13(MoeDecodeArgs a, const void* x, int64_t stride_x, int top_k, void* h, void* out,
                           int64_t out_numel, void* stream) {
  using namespace moeprep;
  const Problem p = make_problem(a, x, stride_x, top_k);
  const int64_t cols_per_cta = static_cast<int64_t>(a.warps / a.k_warps) * (kBlocks / 2) * 16;
  const dim3 grid(static_cast<unsigned>(a.num_m_blocks),
                  static_cast<unsigned>((a.n / 2 + cols_per_cta - 1) / cols_per_cta));
  MOEPREP_DISPATCH(w13_kernel, grid, p, static_cast<__nv_bfloat16*>(h), static_cast<uint4*>(out), out_numel / 8);
}

int moeprep_moe_decode_w2(MoeDecodeArgs a, const void* h, int top_k, void* out, int64_t stride_out,
                          const float* topk_weights, int split, void* stream) {
  using namespace moeprep;
  const Problem p = make_problem(a, h, a.k, 1);
  const int64_t rows_per_cta = static_cast<int64_t>(a.warps / a.k_warps) * kBlocks * 16;
  const dim3 grid(static_cast<unsigned>(a.num_m_blocks), static_cast<unsigned>((a.n + rows_per_cta - 1) / rows_per_cta),
                  static_cast<unsigned>(split));
  MOEPREP_DISPATCH(w2_kernel, grid, p, static_cast<__nv_bfloat16*>(out), stride_out, topk_weights, top_k);
}

}  // extern "C"
