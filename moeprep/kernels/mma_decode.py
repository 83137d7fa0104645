"""The CUDA tensor-core GEMMs for decode batches of the int4 targets (``csrc/moe_decode.cu``).

At a few tokens per expert a MoE layer streams each touched expert's weights once; the Triton
kernels spend ~5 instructions per weight there, most of them moving the decoded tile through
shared memory into the MMA's operand layout. These kernels copy the packed codes into shared
memory a few windows ahead (cp.async), read each lane's ``mma.sync`` fragment from there and
decode it in registers, one ``lop3`` per two codes, with the zero point and scale applied per
group in fp32 (~2.5 instructions per weight). They serve ``w4a16_preshuffle`` and
``w4a16_preshuffle_zp`` with bf16 activations and scales, SiLU-and-mul, no biases and no desc_act
permutation, on CUDA sm_80+ builds that have them; everything else takes the Triton kernels.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from .. import ops
from ..serve.reference import Activation
from . import configs, moe_gemm
from .routing import RoutedTokens

WINDOW = 64  # k per warp step (4 lanes x 16)
BLOCKS = 4  # 16-row blocks of the weights per warp


@lru_cache(maxsize=None)
def built() -> bool:
    """Whether this build has the kernels (CUDA, not ROCm, with moeprep._C_cuda)."""
    if torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return ops.has_cuda_op("moe_decode_w13")


def problems(layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
    """Why these kernels cannot run this call (empty when they can)."""
    found = []
    if layer.fmt not in (moe_gemm.W4A16.value, moe_gemm.W4A16_ZP.value):
        found.append("not an int4 target")
    if hidden.device.type != "cuda" or torch.cuda.get_device_capability(hidden.device)[0] < 8:
        found.append("needs a CUDA GPU of compute capability >= 8.0")
    if hidden.dtype != torch.bfloat16 or hidden.stride(0) % 8 or hidden.data_ptr() % 16:
        found.append("needs bf16 activations in 16-byte aligned rows")
    if activation.kind != "silu" or layer.input_perm is not None:
        found.append("needs SiLU-and-mul and no input permutation")
    for proj in (layer.w13, layer.w2):
        gs = proj.group_size
        if proj.bias is not None or proj.scale.dtype != torch.bfloat16 or gs < 32 or gs & (gs - 1) or proj.groups % 2:
            found.append("needs bf16 scales in an even number of power-of-two groups >= 32, no biases")
    if layer.hidden % WINDOW or layer.inter % WINDOW:
        found.append(f"needs hidden and intermediate sizes divisible by {WINDOW}")
    if not found and not built():
        found.append("this build of moeprep has no CUDA decode kernels")
    return found


def w2_split(layer, r: RoutedTokens, g: configs.MmaGemm, device: torch.device) -> int:
    """CTAs along the down projection's K: as configured, or enough for ~20 warps per SM; each warp
    keeps >= 2 windows and each output element takes at most MAX_ADDS rounded additions."""
    top_k = r.topk_ids.shape[1]
    wanted = g.split
    if not wanted:
        blocks = min(layer.experts, r.topk_ids.numel())  # blocks that do work, at least
        rows_per_cta = g.warps // g.k_warps * BLOCKS * 16
        ctas = blocks * triton.cdiv(layer.hidden, rows_per_cta)
        wanted = triton.cdiv(20 * configs.sm_count(device), ctas * g.warps)
    most = max(1, min(configs.MAX_ADDS // top_k, layer.inter // WINDOW // (2 * g.k_warps)))
    return max(1, min(wanted, most))


def launch_w13(layer, hidden: torch.Tensor, r: RoutedTokens, h: torch.Tensor, out: torch.Tensor,
               mma: configs.MmaDecode) -> None:
    """``h = silu(hidden W_gate^T) * (hidden W_up^T)`` per routed pair; zeroes ``out``."""
    w, g = layer.w13, mma.w13
    torch.ops.moeprep.moe_decode_w13(hidden, w.words, w.scale, w.zero, r.sorted_ids, r.expert_ids, r.num_padded,
                                     r.topk_ids.shape[1], g.warps, g.k_warps, g.stages, h, out)


def launch_w2(layer, h: torch.Tensor, r: RoutedTokens, out: torch.Tensor, mma: configs.MmaDecode) -> None:
    """``out[t] += w[t, j] * (h[t * k + j] W_down^T)``."""
    w, g = layer.w2, mma.w2
    torch.ops.moeprep.moe_decode_w2(h, w.words, w.scale, w.zero, r.sorted_ids, r.expert_ids, r.num_padded,
                                    r.topk_weights, g.warps, g.k_warps, g.stages, w2_split(layer, r, g, h.device), out)
