// Prefill-size grouped GEMMs of the int4 MoE targets (w4a16_preshuffle, w4a16_preshuffle_zp) on
// Hopper: warpgroup MMAs (wgmma, sm_90a) with the weights in registers, bf16 operands, fp32
// accumulation.
//
// Why a hand-written kernel: at hundreds of tokens per expert the GEMMs are tensor-core bound, and
// a weight tile must be decoded before its MMAs. Writing the decoded tile to shared memory (the
// Triton kernels, and a warp-specialised wgmma version measured and not kept:
// docs/design/prefill-gemms.md) costs a shared-memory round trip per weight and puts the decode on the MMAs' critical
// path. Here the weights are the MMA's A operand, taken from registers: each consumer thread
// decodes exactly the 16 weights of its fragment for a 16-k step (rows g and g + 8 of its warp's
// 16, k 2t..2t+1 and 2t+8..2t+9) while the previous window's MMAs run. Shared memory carries only
// the activation rows (the MMA's B operand), the packed codes and their scales, all copied by one
// producer thread with the Tensor Memory Accelerator (TMA) a ring of windows ahead. TMA cannot
// gather rows, so the gate/up GEMM first copies the routed activation rows into the routing's
// sorted order, and writes h in that order too, for the down GEMM.
//
// The outputs come out transposed: the accumulator rows are weight rows, its columns routed rows
// (lane l of warp w holds weight rows 16 w + l / 4 and + 8, routed rows 8 i + 2 (l % 4) and + 1).
// The epilogues pair neighbouring lanes (one shuffle) so that every store covers two adjacent
// columns.
//
// Tiles: 256 routed rows (the MMA's N; 128 for a block whose second half is padding) x 128 weight
// rows (two consumer warpgroups of 64). w13 takes 64 columns of h: warp w of consumer warpgroup c
// holds columns 32 c + 8 w + l / 4 as its rows g (gate) and g + 8 (up), so that one thread holds
// both halves of the activation.
//
// CUDA sm_90a only: other builds keep the kernels as traps and report them unavailable
// (moeprep_moe_prefill_available), and the Triton kernels run.

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cuda_asm.cuh"
#include "kernel_facts.cuh"
#include "moe_prefill.h"

namespace moeprep {
namespace {

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MOEPREP_WGMMA 1
#else
#define MOEPREP_WGMMA 0
#endif

constexpr int kTok = kPrefillBlockM;  // routed rows per block: the MMA's N
constexpr int kRows = kPrefillTileN;  // weight rows per CTA: two consumer warpgroups of 64
static_assert(kTok == 256 && kRows == 128, "the MMAs and the warpgroups are written for 256 x 128 tiles");
constexpr int kBK = 64;     // k per window: one 128-byte swizzle span of bf16
constexpr int kProducers = 128;  // a warpgroup, for setmaxnreg; one thread issues the copies
constexpr int kThreads = kProducers + 2 * 128;
constexpr int kActTile = kTok * 128;
constexpr int kCodeTile = kRows * kBK / 2;                  // 8 blocks of 16 rows, 512 bytes each
constexpr int kScaleOff = kActTile + kCodeTile;             // a word per row: its group pair's bf16 scales
constexpr int kZeroOff = kScaleOff + kRows * 4;              // and two bytes: its zero points
constexpr int kStage = (kZeroOff + kRows * 2 + 1023) / 1024 * 1024;  // the swizzle's alignment
constexpr int kStages = 5;

// the ring of stages (activation tile, code tile), then the mbarriers: full, empty
struct Smem {
  static constexpr int kFull = kStages * kStage;
  static constexpr int kEmpty = kFull + 8 * kStages;
  static constexpr int kBytes = kEmpty + 8 * kStages + 1024;  // and room to align the stages to 1024 bytes
};

// 1 in the module the device loaded if it has the kernels (compiled for sm_90a)
__device__ int prefill_built = MOEPREP_WGMMA;

struct Gemm {
  const uint32_t* words;       // [E, n, k / 8] in the preshuffled order
  const uint32_t* scale;       // bf16 [E, groups / 2, n, 2], as one word per (row, pair of groups)
  const uint16_t* zero;        // in the scales' layout, or null (signed codes)
  const __nv_bfloat16* bias;   // [E, n] or null
  int64_t n, k;
  int groups, log2_group;
  const int32_t* sorted_ids;  // routed pairs by expert, padded to blocks of kTok
  const int32_t* expert_ids;
  const int32_t* num_padded;
  int num_pairs, num_m_blocks;
};

// The codes as a 2-d tensor for TMA: a row per 16-row block of every expert (16 x k / 8 words,
// the windows' 512 bytes one after another), boxes of one window of 4 blocks.
constexpr int kCodeBoxBlocks = 4;
constexpr int kBlockWindowWords = 16 * kBK / 8;

__device__ __forceinline__ void bar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
// the barriers' initialisation becomes visible to the TMA units (the async proxy)
__device__ __forceinline__ void fence_bar_init() {
#if MOEPREP_WGMMA
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}
// arrive, and expect `bytes` more from the copies before the phase completes
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
#if MOEPREP_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// the box at (x, y) of a 2-d tensor map into shared memory; its bytes count on bar
__device__ __forceinline__ void tma_load(uint32_t smem, const CUtensorMap& map, int x, int y, uint32_t bar) {
#if MOEPREP_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          smem),
      "l"(&map), "r"(x), "r"(y), "r"(bar)
      : "memory");
#endif
}
// `bytes` contiguous bytes (a multiple of 16, 16-byte aligned) into shared memory; they count on bar
__device__ __forceinline__ void bulk_load(uint32_t smem, const void* gmem, uint32_t bytes, uint32_t bar) {
#if MOEPREP_WGMMA
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem),
               "l"(gmem), "r"(bytes), "r"(bar)
               : "memory");
#endif
}
__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// the producer gives registers to the consumers: 128 x 88 + 256 x 200 fits the 64 K of an SM
template <bool PRODUCER>
__device__ __forceinline__ void set_registers() {
#if MOEPREP_WGMMA
  if (PRODUCER) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 88;");
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 200;");
  }
#endif
}

// descriptor of a K-major bf16 tile with the 128-byte swizzle: 8-row groups 1024 bytes apart
__device__ __forceinline__ uint64_t tile_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if MOEPREP_WGMMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MOEPREP_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#endif
}
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
#if MOEPREP_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
#endif
}

// The operand lists of the MMAs' accumulators: the names %0 to %63 (%64 to %127), and eight of them
// as in-out registers from d[i]
#define MOEPREP_D_0_63 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define MOEPREP_D_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define MOEPREP_ACC8(i)                                                                                      \
  "+f"(d[(i)]), "+f"(d[(i) + 1]), "+f"(d[(i) + 2]), "+f"(d[(i) + 3]), "+f"(d[(i) + 4]), "+f"(d[(i) + 5]), \
      "+f"(d[(i) + 6]), "+f"(d[(i) + 7])
#define MOEPREP_ACC64(i) \
  MOEPREP_ACC8(i), MOEPREP_ACC8((i) + 8), MOEPREP_ACC8((i) + 16), MOEPREP_ACC8((i) + 24), MOEPREP_ACC8((i) + 32), \
      MOEPREP_ACC8((i) + 40), MOEPREP_ACC8((i) + 48), MOEPREP_ACC8((i) + 56)

// d += A B for the warpgroup's 64 weight rows (A: this thread's fragment) and N routed rows (B:
// K-major in shared memory), 16 k
template <int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
#if MOEPREP_WGMMA
  if constexpr (N == 256) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" MOEPREP_D_0_63 ", " MOEPREP_D_64_127
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : MOEPREP_ACC64(0), MOEPREP_ACC64(64)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    static_assert(N == 128, "the MMAs take 128 or 256 routed rows");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" MOEPREP_D_0_63
        "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : MOEPREP_ACC64(0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
#endif
}

// keeps the compiler from moving accumulator accesses across the asynchronous MMAs
template <int A>
__device__ __forceinline__ void pin(float (&d)[A]) {
#pragma unroll
  for (int i = 0; i < A; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ uint32_t bf16x2_sub_mul(uint32_t x, uint32_t offset, uint32_t scale) {
  __nv_bfloat162 v = *reinterpret_cast<__nv_bfloat162*>(&x);
  v = __hmul2(__hsub2(v, *reinterpret_cast<__nv_bfloat162*>(&offset)), *reinterpret_cast<__nv_bfloat162*>(&scale));
  return *reinterpret_cast<uint32_t*>(&v);
}

// A row's fragment part for one 16-k step: its 16 codes are two words (k j and j + 4 in byte
// j % 4, low then high nibble; the second word for k + 8); this lane takes k 2t, 2t + 1 (bytes
// 2 (t % 2) and + 1 of the first word, nibble t / 2) and the same of the second word. Returns
// (k 2t..2t+1, k 2t+8..2t+9) as bf16 pairs (128 + u - (128 + z)) * s: the difference exact, one rounding.
template <bool ZP>
__device__ __forceinline__ uint2 decode_row(uint2 w, uint32_t select, uint32_t shift, uint32_t offset,
                                           uint32_t scale) {
  const uint32_t x = __byte_perm(w.x, w.y, select) >> shift;
  return make_uint2(bf16x2_sub_mul(codes_pair<ZP>(__byte_perm(x, 0, 0x4140)), offset, scale),
                    bf16x2_sub_mul(codes_pair<ZP>(__byte_perm(x, 0, 0x4342)), offset, scale));
}

// the CTA's 16-row code blocks: w13 takes 4 blocks of gate rows and the 4 of their up rows
template <bool W13>
__device__ __forceinline__ int64_t code_block(const Gemm& g, int tile, int b) {
  return W13 ? (b < 4 ? 4 * tile + b : g.n / 32 + 4 * tile + b - 4) : 8 * tile + b;
}

// The producer thread: copies window j's activation rows, codes, scales and zero points into stage
// j % kStages once its previous window is released; the stage's full barrier completes when they
// have landed.
template <bool W13, bool ZP>
__device__ void produce(const Gemm& g, const CUtensorMap& act_map, const CUtensorMap& code_map, uint32_t smem, int mb,
                        int tile, int64_t expert) {
  constexpr uint32_t kBytes = kActTile + kCodeTile + kRows * 4 + (ZP ? kRows * 2 : 0);
  constexpr int kHalf = kRows / 2;  // rows of a box: w13's gate rows, or its up rows
  const int windows = static_cast<int>(g.k / kBK);
  int block[2];
  int64_t meta[2];  // the boxes' first rows in a group pair's scales (and zero points)
#pragma unroll
  for (int b = 0; b < 2; ++b) {
    block[b] = static_cast<int>(expert * g.n / 16 + code_block<W13>(g, tile, kCodeBoxBlocks * b));
    meta[b] = expert * (g.groups / 2) * g.n + 16 * code_block<W13>(g, tile, kCodeBoxBlocks * b);
  }
  for (int j = 0; j < windows; ++j) {
    const int s = j % kStages;
    if (j >= kStages) bar_wait(smem + Smem::kEmpty + 8 * s, ((j / kStages) + 1) & 1);
    const uint32_t stage = smem + s * kStage, full = smem + Smem::kFull + 8 * s;
    bar_expect(full, kBytes);
    tma_load(stage, act_map, j * kBK, mb * kTok, full);
    const int64_t pair = (((j * kBK) >> g.log2_group) >> 1) * g.n;
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      tma_load(stage + kActTile + b * kCodeTile / 2, code_map, j * kBlockWindowWords, block[b], full);
      bulk_load(stage + kScaleOff + b * kHalf * 4, g.scale + meta[b] + pair, kHalf * 4, full);
      if (ZP) bulk_load(stage + kZeroOff + b * kHalf * 2, g.zero + meta[b] + pair, kHalf * 2, full);
    }
  }
}

// A consumer warpgroup's main loop: acc = its 64 weight rows of the tile times the block's first N
// routed rows. Its thread decodes two rows of the code tile (their codes at code_a and code_b of a
// stage, their scale words at meta_a and meta_b past kScaleOff).
template <bool ZP, int N>
struct Consumer {
  const Gemm& g;
  uint32_t smem;
  uint32_t code_a, code_b;  // shared-memory offsets of the two rows' codes in a stage
  uint32_t meta_a, meta_b;  // and of their scale words (zero points at half these past kZeroOff)
  uint32_t select, shift;
  uint32_t frag[2][4][4];

  // window i: decode into frag[BUF] (whose MMAs, two windows back, are done), issue its MMAs, and
  // release the previous window's stage once its MMAs are done
  template <int BUF>
  __device__ __forceinline__ void window(int i, float (&acc)[N / 2]) {
    const int s = i % kStages;
    bar_wait(smem + Smem::kFull + 8 * s, (i / kStages) & 1);
    const uint32_t stage = smem + s * kStage;
    const uint32_t sc[2] = {lds32(stage + kScaleOff + meta_a), lds32(stage + kScaleOff + meta_b)};
    uint32_t zp[2] = {0, 0};
    if (ZP) zp[0] = lds16(stage + kZeroOff + meta_a / 2), zp[1] = lds16(stage + kZeroOff + meta_b / 2);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      const uint32_t half = ((i * kBK + kk * 16) >> g.log2_group) & 1;
      uint32_t scale[2], offset[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        scale[r] = __byte_perm(sc[r], 0, half ? 0x3232 : 0x1010);
        offset[r] = ZP ? 0x43004300u | (((zp[r] >> (8 * half)) & 0xFF) * 0x10001u) : 0x43084308u;
      }
      const uint2 a = decode_row<ZP>(lds64(stage + kActTile + code_a + kk * 128), select, shift, offset[0], scale[0]);
      const uint2 b = decode_row<ZP>(lds64(stage + kActTile + code_b + kk * 128), select, shift, offset[1], scale[1]);
      frag[BUF][kk][0] = a.x;
      frag[BUF][kk][1] = b.x;
      frag[BUF][kk][2] = a.y;
      frag[BUF][kk][3] = b.y;
    }
    // every operand is computed before the MMAs start: an instruction defining one between them
    // makes ptxas serialise the MMAs
    uint64_t desc[kBK / 16];
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      desc[kk] = tile_desc(stage + kk * 32);
      asm volatile("" : "+l"(desc[kk])::"memory");
#pragma unroll
      for (int q = 0; q < 4; ++q) asm volatile("" : "+r"(frag[BUF][kk][q])::"memory");
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) wgmma_rs<N>(acc, frag[BUF][kk], desc[kk]);
    wgmma_commit();
    wgmma_wait<1>();
    if (i > 0 && threadIdx.x % 32 == 0) bar_arrive(smem + Smem::kEmpty + 8 * ((i - 1) % kStages));
  }

  __device__ __forceinline__ void run(float (&acc)[N / 2]) {
    const int windows = static_cast<int>(g.k / kBK);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.0f;
    for (int i = 0; i < windows; i += 2) {  // windows is even: a path that skipped window<1> would
      window<0>(i, acc);                      // overwrite the fragments of MMAs in flight
      window<1>(i + 1, acc);
    }
    wgmma_wait<0>();
    pin(acc);
  }
};

// This CTA's (block, tile): 8 consecutive blocks sweep the tiles together, so that each tile's
// codes and each block's activation rows are read from L2 while they are shared. Returns false
// for blocks past the routing's padded end.
__device__ __forceinline__ bool block_and_tile(const Gemm& g, int& mb, int& tile) {
  const int tiles = static_cast<int>(g.n / kRows), per_group = 8 * tiles, pid = blockIdx.x;
  const int first = pid / per_group * 8, size = min(g.num_m_blocks - first, 8);
  mb = first + pid % per_group % size;
  tile = pid % per_group / size;
  return mb * kTok < __ldg(g.num_padded);
}

// the 1024-byte aligned base of the dynamic shared memory, its barriers initialised
__device__ __forceinline__ uint32_t setup_smem() {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023) & ~1023u;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      bar_init(smem + Smem::kFull + 8 * s, 1);  // the producer thread, and the copies' bytes
      bar_init(smem + Smem::kEmpty + 8 * s, 8);  // one lane per consumer warp
    }
    fence_bar_init();
  }
  __syncthreads();
  return smem;
}

// A consumer thread's place: its warpgroup c, warp w, lane's row g and column pair t
struct Lane {
  int c, w, g, t;
  __device__ Lane() {
    const int x = threadIdx.x - kProducers;
    c = x / 128;
    w = x % 128 / 32;
    g = x % 32 / 4;
    t = x % 4;
  }
};

// One tile: thread 0 of the producer warpgroup issues every window's copies; each consumer thread
// (place l) computes acc = its 64 weight rows times the block's first N routed rows and hands it to
// epilogue(l, acc). acc is declared after setmaxnreg: declared before it, ptxas spills the consumers.
template <bool W13, bool ZP, int N, typename Epilogue>
__device__ __forceinline__ void run_tile(const Gemm& g, const CUtensorMap& act_map, const CUtensorMap& code_map,
                                         uint32_t smem, int mb, int tile, int64_t expert, Epilogue epilogue) {
  if (threadIdx.x < kProducers) {
    set_registers<true>();
    if (threadIdx.x == 0) produce<W13, ZP>(g, act_map, code_map, smem, mb, tile, expert);
    return;
  }
  set_registers<false>();
  const Lane l;
  float acc[N / 2];
  // w13: the gate row of column 32 c + 8 w + g (block 2 c + w / 2, row 8 (w % 2) + g) and its up
  // row (4 blocks on); w2: rows g and g + 8 of block 4 c + w
  const int block_a = W13 ? 2 * l.c + l.w / 2 : 4 * l.c + l.w;
  const int block_b = W13 ? block_a + 4 : block_a;
  const int row_a = W13 ? 8 * (l.w % 2) + l.g : l.g, row_b = W13 ? row_a : l.g + 8;
  Consumer<ZP, N> cons{g, smem, static_cast<uint32_t>(block_a * 512 + row_a * 8),
                    static_cast<uint32_t>(block_b * 512 + row_b * 8), static_cast<uint32_t>(block_a * 64 + row_a * 4),
                    static_cast<uint32_t>(block_b * 64 + row_b * 4),
                    l.t % 2 ? 0x7632u : 0x5410u, static_cast<uint32_t>(4 * (l.t / 2))};
  cons.run(acc);
  epilogue(l, acc);
}

// The block's routed rows need an MMA of 128 (half the cost) when its second half is padding: only
// an expert's last block has padding, at its end.
__device__ __forceinline__ bool half_block(const int32_t* sorted_ids, int num_pairs, int mb) {
  return __ldg(sorted_ids + mb * kTok + kTok / 2) >= num_pairs;
}

// h[r] = act(gate, up) for the block's first N routed rows r (in the routing's sorted order) and the
// tile's 64 columns of h
template <bool ZP, int N>
__device__ __forceinline__ void w13_tile(const Gemm& g, const CUtensorMap& act_map, const CUtensorMap& code_map,
                                         const MoeDecodeActivation& act, __nv_bfloat16* h, uint32_t smem, int mb,
                                         int tile, int64_t expert) {
  run_tile<true, ZP, N>(g, act_map, code_map, smem, mb, tile, expert, [&](const Lane& l, float (&acc)[N / 2]) {
    const int64_t inter = g.n / 2;
    const int64_t col = static_cast<int64_t>(tile) * (kRows / 2) + 32 * l.c + 8 * l.w + l.g;
    const float gate_bias = g.bias ? __bfloat162float(g.bias[expert * g.n + col]) : 0.0f;
    const float up_bias = g.bias ? __bfloat162float(g.bias[expert * g.n + inter + col]) : 0.0f;
    const int odd = l.g % 2;
    __nv_bfloat16* rows = h + static_cast<int64_t>(mb) * kTok * inter + col - odd;
    // even lanes store (col, col + 1) of routed row 8 j + 2 t, odd lanes (col - 1, col) of the next
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      float y[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) y[e] = activate(acc[4 * j + e] + gate_bias, acc[4 * j + 2 + e] + up_bias, act);
      const float2 v = adjacent_columns(y[0], y[1], odd);
      *reinterpret_cast<__nv_bfloat162*>(rows + (8 * j + 2 * l.t + odd) * inter) = __floats2bfloat162_rn(v.x, v.y);
    }
  });
}

template <bool ZP>
__global__ void __launch_bounds__(kThreads, 1)
    w13_kernel(Gemm g, const __grid_constant__ CUtensorMap act_map, const __grid_constant__ CUtensorMap code_map,
               MoeDecodeActivation act, __nv_bfloat16* h, uint4* out, int64_t out_units) {
#if MOEPREP_WGMMA
  zero_units(out, out_units, blockIdx.x, gridDim.x);
  int mb, tile;
  if (!block_and_tile(g, mb, tile)) return;
  const int64_t expert = __ldg(g.expert_ids + mb);
  const uint32_t smem = setup_smem();
  if (half_block(g.sorted_ids, g.num_pairs, mb)) {
    w13_tile<ZP, kTok / 2>(g, act_map, code_map, act, h, smem, mb, tile, expert);
  } else {
    w13_tile<ZP, kTok>(g, act_map, code_map, act, h, smem, mb, tile, expert);
  }
#else
  __trap();
#endif
}

// out[p / top_k] += w[p] (h[r] W_down^T + b) for the block's first N routed rows r (pairs p) and the
// tile's 128 columns of out
template <bool ZP, int N>
__device__ __forceinline__ void w2_tile(const Gemm& g, const CUtensorMap& act_map, const CUtensorMap& code_map,
                                        __nv_bfloat16* out, int64_t stride_out, const float* topk_weights, int top_k,
                                        uint32_t smem, int mb, int tile, int64_t expert) {
  run_tile<false, ZP, N>(g, act_map, code_map, smem, mb, tile, expert, [&](const Lane& l, float (&acc)[N / 2]) {
    const int64_t col = static_cast<int64_t>(tile) * kRows + 64 * l.c + 16 * l.w + l.g;  // and col + 8
    float bias[2] = {0.0f, 0.0f};
    if (g.bias) {
      bias[0] = __bfloat162float(g.bias[expert * g.n + col]);
      bias[1] = __bfloat162float(g.bias[expert * g.n + col + 8]);
    }
    const int odd = l.g % 2;
    // as in w13_tile: even lanes add (col, col + 1) of routed row 8 j + 2 t, odd lanes (col - 1, col)
    // of the next; the same for the rows 8 on
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      float2 v[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        v[r] = adjacent_columns(acc[4 * j + 2 * r] + bias[r], acc[4 * j + 2 * r + 1] + bias[r], odd);
      }
      const int pair = __ldg(g.sorted_ids + mb * kTok + 8 * j + 2 * l.t + odd);
      if (pair < g.num_pairs) {
        const float weight = __ldg(topk_weights + pair);
        __nv_bfloat16* dst = out + pair / top_k * stride_out + col - odd;
#pragma unroll
        for (int r = 0; r < 2; ++r) add_bf16x2(dst + 8 * r, v[r].x * weight, v[r].y * weight);
      }
    }
  });
}

template <bool ZP>
__global__ void __launch_bounds__(kThreads, 1)
    w2_kernel(Gemm g, const __grid_constant__ CUtensorMap act_map, const __grid_constant__ CUtensorMap code_map,
              __nv_bfloat16* out, int64_t stride_out, const float* topk_weights, int top_k) {
#if MOEPREP_WGMMA
  int mb, tile;
  if (!block_and_tile(g, mb, tile)) return;
  const int64_t expert = __ldg(g.expert_ids + mb);
  const uint32_t smem = setup_smem();
  if (half_block(g.sorted_ids, g.num_pairs, mb)) {
    w2_tile<ZP, kTok / 2>(g, act_map, code_map, out, stride_out, topk_weights, top_k, smem, mb, tile, expert);
  } else {
    w2_tile<ZP, kTok>(g, act_map, code_map, out, stride_out, topk_weights, top_k, smem, mb, tile, expert);
  }
#else
  __trap();
#endif
}

// xs[r] = x[p / top_k] for the routing's sorted pairs p (zeros for padding): the activation rows as
// the gate/up GEMM's tensor map reads them. Rows that no MMA reads stay as they are: those past
// num_padded, and the second half of a half block (half_block).
__global__ void gather_kernel(const uint4* x, int64_t stride_units, int top_k, const int32_t* sorted_ids,
                              const int32_t* num_padded, int num_pairs, int units, uint4* xs) {
  const int row = blockIdx.x;
  if (row >= __ldg(num_padded)) return;
  if (row % kTok >= kTok / 2 && half_block(sorted_ids, num_pairs, row / kTok)) return;
  const int pair = __ldg(sorted_ids + row);
  uint4* dst = xs + static_cast<int64_t>(row) * units;
  if (pair < num_pairs) {
    const uint4* src = x + pair / top_k * stride_units;
    for (int u = threadIdx.x; u < units; u += blockDim.x) dst[u] = __ldg(src + u);
  } else {
    for (int u = threadIdx.x; u < units; u += blockDim.x) dst[u] = make_uint4(0, 0, 0, 0);
  }
}

Gemm make_gemm(const MoeGemmArgs& a) {
  return Gemm{a.words, static_cast<const uint32_t*>(a.scale), static_cast<const uint16_t*>(a.zero),
              static_cast<const __nv_bfloat16*>(a.bias), a.n, a.k, a.groups, __builtin_ctz(a.group_size),
              a.sorted_ids, a.expert_ids, a.num_padded, a.num_pairs, a.num_m_blocks};
}

// A 2-d tensor map (row-major, `cols` elements of `type` per row, rows `row_bytes` apart) with boxes
// of box_cols x box_rows. The driver's encoder comes through the runtime, so that the library does
// not link libcuda.
int encode(CUtensorMap* map, CUtensorMapDataType type, const void* base, uint64_t cols, uint64_t rows,
           uint64_t row_bytes, uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swizzle) {
  static const auto encode_tiled = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (!encode_tiled) return static_cast<int>(cudaErrorNotSupported);
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {row_bytes};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t steps[2] = {1, 1};
  const CUresult r = encode_tiled(map, type, 2, const_cast<void*>(base), dims, strides, box, steps,
                                  CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : static_cast<int>(cudaErrorInvalidValue);
}

// The GEMM's tensor maps: activation rows [rows, k] bf16 in boxes of a window of kTok rows (the
// MMA's swizzle), and the codes (kCodeBoxBlocks)
int encode_maps(const MoeGemmArgs& a, const void* act, int64_t rows, CUtensorMap* act_map, CUtensorMap* code_map) {
  int err = encode(act_map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, act, a.k, rows, a.k * 2, kBK, kTok,
                   CU_TENSOR_MAP_SWIZZLE_128B);
  if (err) return err;
  return encode(code_map, CU_TENSOR_MAP_DATA_TYPE_UINT32, a.words, 2 * a.k, a.experts * a.n / 16, 16 * a.k / 2,
                kBlockWindowWords, kCodeBoxBlocks, CU_TENSOR_MAP_SWIZZLE_NONE);
}

template <auto KERNEL, typename... Args>
int launch(const MoeGemmArgs& a, void* stream, Args... args) {
  constexpr int smem = Smem::kBytes;
  const KernelFacts facts = facts_of<KERNEL, kThreads, smem>();
  if (facts.error != cudaSuccess) return static_cast<int>(facts.error);
  const unsigned grid = static_cast<unsigned>(a.num_m_blocks * (a.n / kRows));
  KERNEL<<<grid, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(args...);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace moeprep

extern "C" {

int moeprep_moe_prefill_available(int* available) {
  return static_cast<int>(cudaMemcpyFromSymbol(available, moeprep::prefill_built, sizeof(int)));
}

int moeprep_moe_prefill_w13(MoeGemmArgs a, const void* x, int64_t stride_x, int top_k, MoeDecodeActivation act,
                            void* xs, int64_t rows, void* h, void* out, int64_t out_numel, void* stream) {
  using namespace moeprep;
  const int units = static_cast<int>(a.k / 8);
  gather_kernel<<<static_cast<unsigned>(rows), 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint4*>(x), stride_x / 8, top_k, a.sorted_ids, a.num_padded, a.num_pairs, units,
      static_cast<uint4*>(xs));
  CUtensorMap act_map, code_map;
  const int err = encode_maps(a, xs, rows, &act_map, &code_map);
  if (err) return err;
  const Gemm g = make_gemm(a);
  auto* hp = static_cast<__nv_bfloat16*>(h);
  auto* op = static_cast<uint4*>(out);
  if (a.zero) return launch<w13_kernel<true>>(a, stream, g, act_map, code_map, act, hp, op, out_numel / 8);
  return launch<w13_kernel<false>>(a, stream, g, act_map, code_map, act, hp, op, out_numel / 8);
}

int moeprep_moe_prefill_w2(MoeGemmArgs a, const void* h, int64_t rows, int top_k, void* out, int64_t stride_out,
                           const float* topk_weights, void* stream) {
  using namespace moeprep;
  CUtensorMap act_map, code_map;
  const int err = encode_maps(a, h, rows, &act_map, &code_map);
  if (err) return err;
  const Gemm g = make_gemm(a);
  auto* op = static_cast<__nv_bfloat16*>(out);
  if (a.zero) return launch<w2_kernel<true>>(a, stream, g, act_map, code_map, op, stride_out, topk_weights, top_k);
  return launch<w2_kernel<false>>(a, stream, g, act_map, code_map, op, stride_out, topk_weights, top_k);
}

}  // extern "C"
