// Device helpers shared by the CUDA MoE GEMMs (moe_decode.cu, moe_prefill.cu), mostly inline PTX.
// CUDA only.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "moe_decode.h"

namespace moeprep {

__device__ __forceinline__ void copy16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
}
// copy16 of data read once (the decode GEMMs' weights), marked evict-first in L2: the streamed
// weights then leave what is read again (activations, h, the routing's results, out's
// reductions) in L2: 1.5-4% faster decode layers at T <= 4 on the H200 (docs/design/decode-gemms.md).
__device__ __forceinline__ void copy16_evict_first(uint32_t smem, const void* gmem) {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "l"(policy));
}
__device__ __forceinline__ void copies_done() { asm volatile("cp.async.commit_group;"); }
template <int PENDING>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

// out[0:2] += (lo, hi) rounded to bf16: one bf16x2 reduction in L2 on sm_90, which has them;
// earlier GPUs take two compare-and-swap loops
__device__ __forceinline__ void add_bf16x2(__nv_bfloat16* out, float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.noftz.bf16x2 [%0], %1;" ::"l"(out), "r"(*reinterpret_cast<const uint32_t*>(&v))
               : "memory");
#else
  atomicAdd(out, v.x);
  atomicAdd(out + 1, v.y);
#endif
}

__device__ __forceinline__ uint32_t lds16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void lds128(uint32_t addr, uint32_t (&v)[4]) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "r"(addr));
}

// The bf16 pair (128 + u_lo, 128 + u_hi) of the nibbles at bits 0 and 16. Signed codes are two's
// complement nibbles: u = q ^ 8 = q + 8, the xor folded into the same lop3 (0x6A: (a & b) ^ c,
// where c's bit 3 flips the nibble's top bit); unsigned ones keep u = q (0xEA: (a & b) | c).
template <bool ZP>
__device__ __forceinline__ uint32_t codes_pair(uint32_t word) {
  uint32_t x;
  if (ZP) {
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(x) : "r"(word));
  } else {
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43084308, 0x6A;" : "=r"(x) : "r"(word));
  }
  return x;
}

// Zeroes units[0:count] with all the threads of a grid of `ctas` CTAs (this one's linear index `cta`)
__device__ __forceinline__ void zero_units(uint4* units, int64_t count, int64_t cta, int64_t ctas) {
  for (int64_t i = cta * blockDim.x + threadIdx.x; i < count; i += ctas * blockDim.x) units[i] = make_uint4(0, 0, 0, 0);
}

// Lanes g and g ^ 1 (g = lane / 4, odd = g & 1) of an MMA accumulator hold the same two rows (v0, v1)
// of columns g and g ^ 1. They swap halves so that even g holds row 0's two columns and odd g row 1's,
// in column order: one bf16x2 store or reduction each instead of two bf16 ones.
__device__ __forceinline__ float2 adjacent_columns(float v0, float v1, int odd) {
  const float other = __shfl_xor_sync(0xFFFFFFFFu, odd ? v0 : v1, 4);
  return odd ? make_float2(other, v1) : make_float2(v0, other);
}

// The gate/up projection's activation of one column (moe_decode.h, MoeDecodeActivation)
__device__ __forceinline__ float activate(float gate, float up, const MoeDecodeActivation& act) {
  if (act.swiglu) {
    gate = fminf(gate, act.limit);
    up = fminf(fmaxf(up, -act.limit), act.limit);
    return gate / (1.0f + __expf(-act.alpha * gate)) * (up + 1.0f);
  }
  return gate / (1.0f + __expf(-gate)) * up;
}

}  // namespace moeprep
