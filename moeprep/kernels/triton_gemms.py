"""The Triton backend: the grouped GEMMs of moe_gemm.py on every stored layout, on any GPU Triton
targets (CUDA and ROCm), with every activation dtype and desc_act's input permutation."""
from __future__ import annotations

from typing import Optional

import torch
import triton

from ..moe import Activation
from . import configs, moe_gemm
from ._triton import INTERPRET
from .backend import Backend, register
from .device import nvidia_capability
from .layer import Layer, Proj
from .routing import RoutedTokens

ACTIVATIONS = {"silu": moe_gemm.SILU.value, "swiglu_oai": moe_gemm.SWIGLU_OAI.value}


@register
class TritonGemms(Backend):
    name = "triton"

    def problems(self, layer: Layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
        return []  # the fallback: it runs every call fused_moe accepts

    def block_m(self, cfg: configs.MoEConfig) -> int:
        return cfg.block_m

    def launch(self, layer, hidden, r, h, out, activation, cfg) -> None:
        launch_w13(layer, hidden, r, h, out, activation, cfg)
        launch_w2(layer, h, r, out, cfg)


def packed_decode(layer: Layer, w: Proj, a: torch.Tensor) -> bool:
    """Whether the MMA operand of ``a @ w^T`` can be decoded two values per instruction straight
    into bf16 (PTX, CUDA >= sm_80): bf16 activations, and bf16 scales for int4 (MXFP4's
    power-of-two scales bf16 holds exactly)."""
    if INTERPRET or a.dtype != torch.bfloat16 or nvidia_capability(a.device) < (8, 0):
        return False
    return layer.fmt == moe_gemm.MXFP4.value or w.scale.dtype == torch.bfloat16


def _or(t: Optional[torch.Tensor], placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder if t is None else t


_ARRIVALS: dict = {}  # (device, stream) -> int32 counts that split w13 tiles leave at zero


def _arrivals(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed arrival counts for ``tiles`` tiles, one buffer per stream: the kernels return each
    count to zero, and launches on one stream run one after another."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    counts = _ARRIVALS.get((device, stream))
    if counts is None or counts.numel() < tiles:
        counts = _ARRIVALS[(device, stream)] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    return counts


def launch_w13(layer: Layer, hidden: torch.Tensor, r: RoutedTokens, h: torch.Tensor, out: torch.Tensor,
               activation: Activation, cfg: configs.MoEConfig) -> None:
    """``h = act(hidden W13^T)`` per routed pair; zeroes ``out``."""
    w, c, T = layer.w13, cfg.w13, hidden.shape[0]
    k = r.topk_ids.shape[1]
    num_m_blocks = r.expert_ids.numel()
    grid = num_m_blocks * triton.cdiv(layer.inter, c.block_n)
    split = max(c.split_k, 1)
    if split > 1:
        parts = torch.empty((split, T * k, 2 * layer.inter), dtype=torch.float32, device=hidden.device)
        arrivals = _arrivals(hidden.device, grid)
    else:
        parts = arrivals = w.scale
    zblock = moe_gemm.ZBLOCK.value
    moe_gemm.w13_kernel[(grid, split)](
        hidden, hidden.stride(0), _or(layer.input_perm, w.scale), w.words, w.scale, _or(w.zero, w.scale), _or(w.bias, w.scale),
        h, out, out.numel(), triton.cdiv(out.numel(), grid * zblock) * zblock, parts, arrivals,
        r.sorted_ids, r.expert_ids, r.num_padded, T * k, num_m_blocks,
        layer.hidden, layer.inter, w.groups, w.scale_cols, activation.alpha, activation.limit,
        TOP_K=k, FMT=layer.fmt, GU_INTERLEAVED=layer.gate_up_interleaved, ACT=ACTIVATIONS[activation.kind],
        HAS_BIAS=w.bias is not None, HAS_PERM=layer.input_perm is not None,
        BM=cfg.block_m, BN=c.block_n, BK=c.block_k, NG=max(c.block_k // w.group_size, 1), GS=w.group_size,
        GROUP_M=c.group_m, SPLIT_K=split, PACKED=packed_decode(layer, w, hidden), SWAP=c.swap_ab,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )


def launch_w2(layer: Layer, h: torch.Tensor, r: RoutedTokens, out: torch.Tensor, cfg: configs.MoEConfig) -> None:
    """``out[t] += w[t, j] * (h[t * k + j] W2^T)``."""
    w, c = layer.w2, cfg.w2
    k = r.topk_ids.shape[1]
    num_m_blocks = r.expert_ids.numel()
    moe_gemm.w2_kernel[(num_m_blocks * triton.cdiv(layer.hidden, c.block_n), c.split_k)](
        h, w.words, w.scale, _or(w.zero, w.scale), _or(w.bias, w.scale), out, out.stride(0), r.topk_weights,
        r.sorted_ids, r.expert_ids, r.num_padded, r.topk_ids.numel(), num_m_blocks,
        layer.hidden, layer.inter, w.groups, w.scale_cols,
        TOP_K=k, FMT=layer.fmt, HAS_BIAS=w.bias is not None,
        BM=cfg.block_m, BN=c.block_n, BK=c.block_k, NG=max(c.block_k // w.group_size, 1), GS=w.group_size,
        GROUP_M=c.group_m, SPLIT_K=c.split_k, PACKED=packed_decode(layer, w, h), SWAP=c.swap_ab,
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
