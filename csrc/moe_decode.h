// C interface of the decode-size MoE GEMMs (moe_decode.cu, CUDA only). Plain pointers and a
// stream; each launcher returns 0 or the CUDA error code (moeprep_gpu_error_string turns it into text).
#pragma once

#include <stdint.h>

#include "kernel_constants.h"

extern "C" {

// One projection of a 4-bit MoE layer in a preshuffled layout, and the routed blocks.
struct MoeGemmArgs {
  const uint32_t* words;  // codes [E, n, k / 8] as int32 words
  // int4 (w4a16_preshuffle[_zp]): bf16 [E, groups / 2, n, 2]; E2M1 (mxfp4_preshuffle, mxfp4_moe):
  // E8M0 bytes shuffled in 32-row tiles of `groups` columns (groups padded to a multiple of 8)
  const void* scale;
  const void* zero;  // uint8 zero points in the scales' layout, or null (signed codes)
  const void* bias;  // bf16 [E, n], or null
  int64_t experts;   // the codes' first dimension
  int64_t n, k;      // rows (outputs) and columns (inputs) of each expert's matrix
  int groups, group_size;
  int e2m1;            // the codes are E2M1 (group size 32) rather than int4
  int gu_interleaved;  // mxfp4_moe's w13: the 16-row blocks of gate and up alternate
  const int32_t* sorted_ids;  // routing: (token, slot) pairs sorted by expert, padded to blocks of 8
  const int32_t* expert_ids;
  const int32_t* num_padded;
  int num_pairs, num_m_blocks;
  int warps;    // per CTA: 4 or 8
  int k_warps;  // warps of a CTA splitting K for the same rows; divides warps
  int stages;   // 64-k windows in each warp's shared-memory ring: 2, 3 or 4
};

// The gate/up projection's activation: silu(gate) * up, or gpt-oss's clamped SwiGLU
// (up + 1) * gate * sigmoid(alpha * gate) with gate <= limit and |up| <= limit.
struct MoeDecodeActivation {
  int swiglu;
  float alpha, limit;
};

// h[p] = act(x[p / top_k] W_gate^T + b_gate, x[p / top_k] W_up^T + b_up), bf16 (n = 2 * inter, a
// multiple of 64: each warp takes two 16-row blocks of gate rows and their up rows); zeroes
// out[0:out_numel].
int moeprep_moe_decode_w13(struct MoeGemmArgs a, const void* x, int64_t stride_x, int top_k,
                           struct MoeDecodeActivation act, void* h, void* out, int64_t out_numel, void* stream);

// out[p / top_k] += topk_weights[p] * (h[p] W_down^T + b_down), bf16 (n a multiple of 64), k
// split over `split` CTAs (atomic adds).
int moeprep_moe_decode_w2(struct MoeGemmArgs a, const void* h, int top_k, void* out, int64_t stride_out,
                          const float* topk_weights, int split, void* stream);

}  // extern "C"
