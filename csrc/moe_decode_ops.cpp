// torch bindings of the decode-size MoE GEMMs (moe_decode.cu), part of moeprep._C_cuda on CUDA
// builds: torch.ops.moeprep.moe_decode_w13 / moe_decode_w2. The Python side
// (moeprep/kernels/mma_decode.py) decides when they apply; the checks here guard memory safety.

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "gpu_ops.h"
#include "moe_decode.h"
#include "moe_prefill.h"

namespace moeprep {
namespace {

void check_cuda(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous(), "moeprep: ", name, " must be a contiguous ",
              dtype, " CUDA tensor");
}

// The codes' format follows the scales: bf16 for int4 (w4a16_preshuffle[_zp]), uint8 E8M0 for
// E2M1 (mxfp4_preshuffle, mxfp4_moe: 32-row tiles of the padded group count, the last dim).
MoeGemmArgs args_of(const at::Tensor& words, const at::Tensor& scale, const std::optional<at::Tensor>& zero,
                      const std::optional<at::Tensor>& bias, bool gu_interleaved, const at::Tensor& sorted_ids,
                      const at::Tensor& expert_ids, const at::Tensor& num_padded, int64_t num_pairs, int64_t warps,
                      int64_t k_warps, int64_t stages) {
  check_cuda(words, at::kInt, "words");
  const bool e2m1 = scale.scalar_type() == at::kByte;
  check_cuda(scale, e2m1 ? at::kByte : at::kBFloat16, "scale");
  check_cuda(sorted_ids, at::kInt, "sorted_ids");
  check_cuda(expert_ids, at::kInt, "expert_ids");
  check_cuda(num_padded, at::kInt, "num_padded");
  TORCH_CHECK(words.dim() == 3, "moeprep: words must be [E, N, K / 8]");
  const int64_t experts = words.size(0), n = words.size(1), k = words.size(2) * 8;
  TORCH_CHECK((warps == 4 || warps == 8) && k_warps >= 1 && warps % k_warps == 0 && stages >= 2 && stages <= 4,
              "moeprep: warps 4 or 8, k_warps dividing warps, stages 2 to 4");
  TORCH_CHECK(n % 64 == 0 && k % 64 == 0, "moeprep: decode GEMMs need N and K multiples of 64");
  int64_t groups, group_size;
  if (e2m1) {
    groups = scale.dim() > 0 ? scale.size(-1) : 0;
    group_size = 32;
    TORCH_CHECK(groups % 8 == 0 && groups >= k / 32 && scale.numel() >= (experts * n / 16 + 1) / 2 * 32 * groups,
                "moeprep: E8M0 scales must hold the 32-row tiles of K / 32 groups, padded to a multiple of 8");
    TORCH_CHECK(!zero, "moeprep: E2M1 codes take no zero points");
  } else {
    TORCH_CHECK(!gu_interleaved, "moeprep: int4 layouts keep gate and up apart");
    TORCH_CHECK(scale.numel() % (experts * n) == 0, "moeprep: scales do not match the codes");
    groups = scale.numel() / (experts * n);
    TORCH_CHECK(groups % 2 == 0 && k % groups == 0, "moeprep: need an even number of scale groups dividing K");
    group_size = k / groups;
    TORCH_CHECK(group_size >= 32 && (group_size & (group_size - 1)) == 0,
                "moeprep: group size must be a power of two >= 32");
  }
  if (zero) {
    check_cuda(*zero, at::kByte, "zero points");
    TORCH_CHECK(zero->numel() == scale.numel(), "moeprep: zero points do not match the scales");
  }
  if (bias) {
    check_cuda(*bias, at::kBFloat16, "bias");
    TORCH_CHECK(bias->numel() == experts * n, "moeprep: bias must be [E, N]");
  }
  // Messages stay string literals: a TORCH_CHECK that formats an int into its message crashed
  // (SIGSEGV while raising) in this extension built by the H100 image's toolchain.
  static_assert(kDecodeBlockM == 8, "the message below names the block");
  TORCH_CHECK(sorted_ids.numel() >= expert_ids.numel() * kDecodeBlockM, "moeprep: sorted_ids shorter than the blocks of 8");
  for (const void* p : {words.const_data_ptr(), scale.const_data_ptr(), sorted_ids.const_data_ptr(),
                        zero ? zero->const_data_ptr() : nullptr}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "moeprep: tensors must be 16-byte aligned");
  }
  return MoeGemmArgs{static_cast<const uint32_t*>(words.const_data_ptr()), scale.const_data_ptr(),
                       zero ? zero->const_data_ptr() : nullptr, bias ? bias->const_data_ptr() : nullptr, experts, n, k,
                       static_cast<int>(groups), static_cast<int>(group_size), e2m1 ? 1 : 0, gu_interleaved ? 1 : 0,
                       sorted_ids.const_data_ptr<int32_t>(), expert_ids.const_data_ptr<int32_t>(),
                       num_padded.const_data_ptr<int32_t>(), static_cast<int>(num_pairs),
                       static_cast<int>(expert_ids.numel()), static_cast<int>(warps), static_cast<int>(k_warps),
                       static_cast<int>(stages)};
}

// h's rows: one per routed pair (decode), or one per slot of sorted_ids (prefill), and how an error names them
struct HRows {
  int64_t count;
  const char* label;
};
HRows h_rows(bool sorted_h, const at::Tensor& sorted_ids, int64_t pairs) {
  return sorted_h ? HRows{sorted_ids.numel(), "len(sorted_ids)"} : HRows{pairs, "T * top_k"};
}

// The gate/up GEMMs' arguments, checked: x bf16 [T, H] with 16-byte aligned rows, h [T * top_k, I]
// (the prefill GEMMs': [len(sorted_ids), I]), out bf16 with a multiple of 8 elements (zeroed in
// 16-byte units)
MoeGemmArgs w13_args(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scale,
                       const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                       bool gu_interleaved, const at::Tensor& sorted_ids, const at::Tensor& expert_ids,
                       const at::Tensor& num_padded, int64_t top_k, int64_t warps, int64_t k_warps,
                       int64_t stages, const at::Tensor& h, const at::Tensor& out, bool sorted_h) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0,
              "moeprep: x must be bf16 [T, H] with rows 16-byte aligned");
  const int64_t pairs = x.size(0) * top_k;
  const MoeGemmArgs a = args_of(words, scale, zero, bias, gu_interleaved, sorted_ids, expert_ids, num_padded, pairs,
                                  warps, k_warps, stages);
  TORCH_CHECK(x.size(1) == a.k && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0,
              "moeprep: x does not match the codes");
  check_cuda(h, at::kBFloat16, "h");
  check_cuda(out, at::kBFloat16, "out");
  const HRows rows = h_rows(sorted_h, sorted_ids, pairs);
  TORCH_CHECK(h.numel() == rows.count * a.n / 2 && out.numel() % 8 == 0, "moeprep: h must be [", rows.label,
              ", I]");
  return a;
}

// The down GEMMs' arguments, checked: h bf16 [T * top_k, I] (the prefill GEMMs': [len(sorted_ids),
// I]), topk_weights fp32 [T, top_k], out bf16 [T, H] taking bf16x2 reductions (two columns at a time:
// 4-byte aligned, rows of an even length)
MoeGemmArgs w2_args(const at::Tensor& h, const at::Tensor& words, const at::Tensor& scale,
                      const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                      const at::Tensor& sorted_ids, const at::Tensor& expert_ids, const at::Tensor& num_padded,
                      const at::Tensor& topk_weights, int64_t warps, int64_t k_warps, int64_t stages,
                      const at::Tensor& out, bool sorted_h) {
  check_cuda(h, at::kBFloat16, "h");
  check_cuda(topk_weights, at::kFloat, "topk_weights");
  check_cuda(out, at::kBFloat16, "out");
  TORCH_CHECK(topk_weights.dim() == 2 && out.dim() == 2 && out.size(0) == topk_weights.size(0),
              "moeprep: topk_weights must be [T, top_k] and out [T, H]");
  const int64_t pairs = topk_weights.numel();
  const MoeGemmArgs a =
      args_of(words, scale, zero, bias, false, sorted_ids, expert_ids, num_padded, pairs, warps, k_warps, stages);
  const HRows rows = h_rows(sorted_h, sorted_ids, pairs);
  TORCH_CHECK(h.numel() == rows.count * a.k && out.size(1) == a.n, "moeprep: h must be [", rows.label,
              ", I] and out [T, H]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0 && out.stride(0) % 2 == 0,
              "moeprep: out must be 4-byte aligned");
  return a;
}

void moe_decode_w13(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scale,
                    const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias, bool gu_interleaved,
                    const at::Tensor& sorted_ids, const at::Tensor& expert_ids, const at::Tensor& num_padded,
                    int64_t top_k, bool swiglu, double alpha, double limit, int64_t warps, int64_t k_warps,
                    int64_t stages, at::Tensor& h, at::Tensor& out) {
  const MoeGemmArgs a = w13_args(x, words, scale, zero, bias, gu_interleaved, sorted_ids, expert_ids, num_padded,
                                   top_k, warps, k_warps, stages, h, out, false);
  const c10::cuda::CUDAGuard guard(x.device());
  const MoeDecodeActivation act{swiglu ? 1 : 0, static_cast<float>(alpha), static_cast<float>(limit)};
  check_launch(moeprep_moe_decode_w13(a, x.const_data_ptr(), x.stride(0), static_cast<int>(top_k), act, h.data_ptr(),
                                      out.data_ptr(), out.numel(), stream()),
               "moe_decode_w13");
}

void moe_decode_w2(const at::Tensor& h, const at::Tensor& words, const at::Tensor& scale,
                   const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                   const at::Tensor& sorted_ids, const at::Tensor& expert_ids,
                   const at::Tensor& num_padded, const at::Tensor& topk_weights, int64_t warps, int64_t k_warps,
                   int64_t stages, int64_t split, at::Tensor& out) {
  const MoeGemmArgs a = w2_args(h, words, scale, zero, bias, sorted_ids, expert_ids, num_padded, topk_weights, warps,
                                  k_warps, stages, out, false);
  TORCH_CHECK(split >= 1 && split <= 64, "moeprep: split must be in [1, 64]");
  const c10::cuda::CUDAGuard guard(h.device());
  check_launch(moeprep_moe_decode_w2(a, h.const_data_ptr(), static_cast<int>(topk_weights.size(1)), out.data_ptr(),
                                     out.stride(0), topk_weights.const_data_ptr<float>(), static_cast<int>(split),
                                     stream()),
               "moe_decode_w2");
}

// The prefill GEMMs' own limits on top of args_of's: routed blocks of 256 pairs, tiles of 128 rows,
// an even number of 64-k windows, and the activation rows that their tensor maps read (xs or h)
// 16-byte aligned.
void check_prefill(const MoeGemmArgs& a, const at::Tensor& sorted_ids, const at::Tensor& rows) {
  TORCH_CHECK(a.e2m1 == 0, "moeprep: the prefill GEMMs take int4 codes");
  static_assert(kPrefillTileN == 128 && kPrefillBlockM == 256, "the messages below name the tile and the block");
  TORCH_CHECK(a.n % kPrefillTileN == 0 && a.k % kPrefillTileN == 0,
              "moeprep: the prefill GEMMs need N and K multiples of 128");
  TORCH_CHECK(sorted_ids.numel() >= static_cast<int64_t>(a.num_m_blocks) * kPrefillBlockM,
              "moeprep: sorted_ids shorter than the blocks of 256");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(rows.const_data_ptr()) % 16 == 0,
              "moeprep: the prefill GEMMs' xs and h must be 16-byte aligned");
}

// (the decode GEMMs' warps, k_warps and stages do not apply: args_of gets valid placeholders)
void moe_prefill_w13(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scale,
                     const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                     const at::Tensor& sorted_ids, const at::Tensor& expert_ids, const at::Tensor& num_padded,
                     int64_t top_k, bool swiglu, double alpha, double limit, at::Tensor& xs, at::Tensor& h,
                     at::Tensor& out) {
  const MoeGemmArgs a =
      w13_args(x, words, scale, zero, bias, false, sorted_ids, expert_ids, num_padded, top_k, 4, 1, 2, h, out, true);
  check_cuda(xs, at::kBFloat16, "xs");
  TORCH_CHECK(xs.numel() == sorted_ids.numel() * a.k, "moeprep: xs must be [len(sorted_ids), H]");
  check_prefill(a, sorted_ids, xs);
  const c10::cuda::CUDAGuard guard(x.device());
  const MoeDecodeActivation act{swiglu ? 1 : 0, static_cast<float>(alpha), static_cast<float>(limit)};
  check_launch(moeprep_moe_prefill_w13(a, x.const_data_ptr(), x.stride(0), static_cast<int>(top_k), act,
                                       xs.data_ptr(), sorted_ids.numel(), h.data_ptr(), out.data_ptr(), out.numel(),
                                       stream()),
               "moe_prefill_w13");
}

void moe_prefill_w2(const at::Tensor& h, const at::Tensor& words, const at::Tensor& scale,
                    const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias,
                    const at::Tensor& sorted_ids, const at::Tensor& expert_ids, const at::Tensor& num_padded,
                    const at::Tensor& topk_weights, at::Tensor& out) {
  const MoeGemmArgs a =
      w2_args(h, words, scale, zero, bias, sorted_ids, expert_ids, num_padded, topk_weights, 4, 1, 2, out, true);
  check_prefill(a, sorted_ids, h);
  const c10::cuda::CUDAGuard guard(h.device());
  check_launch(moeprep_moe_prefill_w2(a, h.const_data_ptr(), sorted_ids.numel(),
                                      static_cast<int>(topk_weights.size(1)), out.data_ptr(), out.stride(0),
                                      topk_weights.const_data_ptr<float>(), stream()),
               "moe_prefill_w2");
}

bool moe_prefill_available(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int available = 0;
  check_launch(moeprep_moe_prefill_available(&available), "moe_prefill_available");
  return available != 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moeprep, m) {
  m.def(
      "moe_decode_w13(Tensor x, Tensor words, Tensor scale, Tensor? zero, Tensor? bias, bool gate_up_interleaved, "
      "Tensor sorted_ids, Tensor expert_ids, Tensor num_padded, int top_k, bool swiglu, float alpha, float limit, "
      "int warps, int k_warps, int stages, Tensor(a!) h, Tensor(b!) out) -> ()");
  m.def(
      "moe_decode_w2(Tensor h, Tensor words, Tensor scale, Tensor? zero, Tensor? bias, Tensor sorted_ids, "
      "Tensor expert_ids, Tensor num_padded, Tensor topk_weights, int warps, int k_warps, int stages, int split, "
      "Tensor(a!) out) -> ()");
  m.def(
      "moe_prefill_w13(Tensor x, Tensor words, Tensor scale, Tensor? zero, Tensor? bias, Tensor sorted_ids, "
      "Tensor expert_ids, Tensor num_padded, int top_k, bool swiglu, float alpha, float limit, Tensor(a!) xs, "
      "Tensor(b!) h, Tensor(c!) out) -> ()");
  m.def(
      "moe_prefill_w2(Tensor h, Tensor words, Tensor scale, Tensor? zero, Tensor? bias, Tensor sorted_ids, "
      "Tensor expert_ids, Tensor num_padded, Tensor topk_weights, Tensor(a!) out) -> ()");
  m.def("moe_prefill_available(int device) -> bool", &moe_prefill_available);
}

TORCH_LIBRARY_IMPL(moeprep, CUDA, m) {
  m.impl("moe_decode_w13", &moe_decode_w13);
  m.impl("moe_decode_w2", &moe_decode_w2);
  m.impl("moe_prefill_w13", &moe_prefill_w13);
  m.impl("moe_prefill_w2", &moe_prefill_w2);
}

}  // namespace moeprep
