"""The CUDA tensor-core GEMMs for decode batches of the 4-bit targets (``csrc/moe_decode.cu``).

At a few tokens per expert a MoE layer streams each touched expert's weights once; the Triton
kernels spend ~5 instructions per weight there, most of them moving the decoded tile through
shared memory into the MMA's operand layout. These kernels copy the packed codes into shared
memory a few windows ahead (cp.async), read each lane's ``mma.sync`` fragment from there and
decode it in registers (int4: one ``lop3`` per two codes, ~2.5 instructions per weight in all;
E2M1: four per two, ~3.5), with the zero point and scale applied per group in fp32. They serve
``w4a16_preshuffle``, ``w4a16_preshuffle_zp``, ``mxfp4_preshuffle`` and ``mxfp4_moe`` with bf16
activations, SiLU-and-mul or gpt-oss's clamped SwiGLU, bf16 biases or none, and no desc_act
permutation, on CUDA sm_80+ builds that have them; everything else takes the Triton kernels.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from .. import ops
from ..moe import Activation
from . import configs, moe_gemm
from .backend import Backend, register
from .device import nvidia_capability, sm_count
from .layer import Layer
from .routing import RoutedTokens

_SHARED = ops.kernel_constants()  # csrc/kernel_constants.h
WINDOW = _SHARED["decode_window"]  # k per warp step (4 lanes x 16)
BLOCKS = _SHARED["decode_blocks"]  # 16-row blocks of the weights per warp
BLOCK_M = _SHARED["decode_block_m"]  # routed rows per block: the MMA's N
WARPS_PER_SM = _SHARED["decode_warps_per_sm"]  # w2_split's aim: what registers and the rings let an SM hold


@lru_cache(maxsize=None)
def built() -> bool:
    """Whether this build has the kernels (CUDA, not ROCm, with moeprep._C_cuda)."""
    if torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return ops.has_cuda_op("moe_decode_w13")


def problems(layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
    """Why these kernels cannot run this call (empty when they can)."""
    found = operand_problems(layer, hidden)
    if layer.hidden % WINDOW or layer.inter % WINDOW:
        found.append(f"needs hidden and intermediate sizes divisible by {WINDOW}")
    if not found and not built():
        found.append("this build of moeprep has no CUDA decode kernels")
    return found


def operand_problems(layer, hidden: torch.Tensor) -> list[str]:
    """What keeps this call's operands from the CUDA GEMMs (these, and wgmma_prefill's): the device,
    the activations, the input permutation, the biases and the scales."""
    found = []
    if nvidia_capability(hidden.device) < (8, 0):
        found.append("needs a CUDA GPU of compute capability >= 8.0")
    if hidden.dtype != torch.bfloat16 or hidden.stride(0) % 8 or hidden.data_ptr() % 16:
        found.append("needs bf16 activations in 16-byte aligned rows")
    if layer.input_perm is not None:
        found.append("needs no input permutation")
    projs = (layer.w13, layer.w2)
    if any(p.bias is not None and p.bias.dtype != torch.bfloat16 for p in projs):
        found.append("needs bf16 biases or none")
    # MXFP4: E8M0 scales in groups of 32 (fused.problems)
    if layer.fmt != moe_gemm.MXFP4.value and not all(_int4_scales_fit(p) for p in projs):
        found.append("needs bf16 scales in an even number of power-of-two groups >= 32")
    return found


def _int4_scales_fit(proj) -> bool:
    gs = proj.group_size
    return proj.scale.dtype == torch.bfloat16 and gs >= 32 and not gs & (gs - 1) and proj.groups % 2 == 0


def w2_split(layer, r: RoutedTokens, g: configs.MmaGemm, device: torch.device) -> int:
    """CTAs along the down projection's K: as configured, or enough for WARPS_PER_SM warps per SM; each warp
    keeps >= 2 windows and each output element takes at most MAX_ADDS rounded additions."""
    top_k = r.topk_ids.shape[1]
    wanted = g.split
    if not wanted:
        blocks = min(layer.experts, r.topk_ids.numel())  # blocks that do work, at least
        rows_per_cta = g.warps // g.k_warps * BLOCKS * 16
        ctas = blocks * triton.cdiv(layer.hidden, rows_per_cta)
        wanted = triton.cdiv(WARPS_PER_SM * sm_count(device), ctas * g.warps)
    most = max(1, min(configs.MAX_ADDS // top_k, layer.inter // WINDOW // (2 * g.k_warps)))
    return max(1, min(wanted, most))


def launch_w13(layer, hidden: torch.Tensor, r: RoutedTokens, h: torch.Tensor, out: torch.Tensor,
               activation: Activation, mma: configs.MmaDecode) -> None:
    """``h = act(hidden W_gate^T + b_gate, hidden W_up^T + b_up)`` per routed pair; zeroes ``out``. On
    sm_90 the kernel is launched as a programmatic dependent of the stream's previous kernel (the
    routing, which lets it start early) and waits for that kernel to finish before anything else."""
    w, g = layer.w13, mma.w13
    torch.ops.moeprep.moe_decode_w13(hidden, w.words, w.scale, w.zero, w.bias, layer.gate_up_interleaved, r.sorted_ids,
                                     r.expert_ids, r.num_padded, r.topk_ids.shape[1], activation.kind == "swiglu_oai",
                                     activation.alpha, activation.limit, g.warps, g.k_warps, g.stages, h, out)


def launch_w2(layer, h: torch.Tensor, r: RoutedTokens, out: torch.Tensor, mma: configs.MmaDecode) -> None:
    """``out[t] += w[t, j] * (h[t * k + j] W_down^T + b_down)``. On sm_90 the kernel is launched as a
    programmatic dependent of the stream's previous kernel, which must let it start only after ``r``
    is complete (as launch_w13's does): it reads the routing before waiting for that kernel."""
    w, g = layer.w2, mma.w2
    torch.ops.moeprep.moe_decode_w2(h, w.words, w.scale, w.zero, w.bias, r.sorted_ids, r.expert_ids, r.num_padded,
                                    r.topk_weights, g.warps, g.k_warps, g.stages, w2_split(layer, r, g, h.device), out)


@register
class MmaDecodeBackend(Backend):
    name = "cuda_mma_decode"

    def problems(self, layer: Layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
        return problems(layer, hidden, activation)

    def block_m(self, cfg: configs.MoEConfig) -> int:
        return BLOCK_M

    def launch(self, layer, hidden, r, h, out, activation, cfg) -> None:
        launch_w13(layer, hidden, r, h, out, activation, cfg.mma)
        launch_w2(layer, h, r, out, cfg.mma)
