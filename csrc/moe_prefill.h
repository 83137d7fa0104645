// C interface of the prefill-size MoE GEMMs (moe_prefill.cu, CUDA sm_90a only), in the decode
// GEMMs' terms (moe_decode.h): int4 codes (w4a16_preshuffle[_zp]) with bf16 scales, routed blocks
// of 256 pairs, n and k multiples of 128. Each launcher returns 0 or the CUDA error code.
#pragma once

#include <stdint.h>

#include "moe_decode.h"

extern "C" {

// *available = 1 if the current device runs the kernels (this build has them for its architecture)
int moeprep_moe_prefill_available(int* available);

// As moeprep_moe_decode_w13 (a's warps, k_warps and stages are not used), except that h is in the
// routing's sorted order: h[r] for sorted_ids[r], `rows` rows (sorted_ids' length). xs, bf16 [rows, k],
// takes the activation rows in that order.
int moeprep_moe_prefill_w13(struct MoeGemmArgs a, const void* x, int64_t stride_x, int top_k,
                            struct MoeDecodeActivation act, void* xs, int64_t rows, void* h, void* out,
                            int64_t out_numel, void* stream);

// As moeprep_moe_decode_w2, without a split of k, on h [rows, k] in the routing's sorted order (as
// moeprep_moe_prefill_w13 leaves it).
int moeprep_moe_prefill_w2(struct MoeGemmArgs a, const void* h, int64_t rows, int top_k, void* out,
                           int64_t stride_out, const float* topk_weights, void* stream);

}  // extern "C"
