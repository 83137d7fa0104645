"""The CUDA Hopper GEMMs for prefill batches of the int4 targets (``csrc/moe_prefill.cu``).

At hundreds of tokens per expert the GEMMs are tensor-core bound. The Triton kernels decode each
weight tile into shared memory before its MMAs; these kernels decode each thread's share of the
weights straight into the registers of the ``wgmma`` A operand while the previous window's MMAs
run, and one producer thread fills a shared-memory ring by TMA with the activation rows (the B
operand), the packed codes and their scales. TMA reads whole tiles, not gathered rows, so these
kernels copy the routed activation rows into the routing's sorted order first and keep ``h`` in
that order (:func:`h_rows`). They serve ``w4a16_preshuffle`` and
``w4a16_preshuffle_zp`` with bf16 activations and scales, SiLU-and-mul or gpt-oss's clamped
SwiGLU, bf16 biases or none, and no desc_act permutation, on sm_90 GPUs with a build for sm_90a;
everything else takes the Triton kernels. The routing pads each expert to blocks of ``BLOCK_M``
routed rows for them.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .. import ops
from ..moe import Activation
from . import configs, mma_decode, moe_gemm
from .backend import Backend, register
from .device import index, nvidia_capability
from .layer import Layer
from .routing import RoutedTokens

_SHARED = ops.kernel_constants()  # csrc/kernel_constants.h
BLOCK_M = _SHARED["prefill_block_m"]  # routed rows per block: the MMA's N
TILE_N = _SHARED["prefill_tile_n"]  # weight rows per CTA (w13: 64 columns of h, their gate and up rows); K too


@lru_cache(maxsize=None)
def _available(device_index: int) -> bool:
    return torch.ops.moeprep.moe_prefill_available(device_index)


def available(device: torch.device) -> bool:
    """Whether this build runs the kernels on ``device`` (CUDA sm_90, compiled for sm_90a)."""
    if nvidia_capability(device) != (9, 0) or not ops.has_cuda_op("moe_prefill_w13"):
        return False
    return _available(index(device))


def problems(layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
    """Why these kernels cannot run this call (empty when they can)."""
    found = []
    if layer.fmt == moe_gemm.MXFP4.value:
        found.append("needs int4 codes")
    found += mma_decode.operand_problems(layer, hidden)
    if layer.inter % TILE_N or layer.hidden % TILE_N:
        found.append(f"needs hidden and intermediate sizes divisible by {TILE_N}")
    if not found and not available(hidden.device):
        found.append("needs an sm_90 GPU and a build of moeprep for sm_90a")
    return found


def h_rows(r: RoutedTokens) -> int:
    """Rows of ``h`` for these kernels: they keep it in the routing's sorted order, padding included,
    so that the down GEMM's tensor map reads contiguous rows."""
    return r.sorted_ids.numel()


def launch_w13(layer, hidden: torch.Tensor, r: RoutedTokens, h: torch.Tensor, out: torch.Tensor,
               activation: Activation) -> None:
    """``h[i] = act(x W_gate^T + b_gate, x W_up^T + b_up)`` for ``x`` the row of routed pair
    ``sorted_ids[i]``; zeroes ``out``."""
    w = layer.w13
    xs = torch.empty((h_rows(r), layer.hidden), dtype=hidden.dtype, device=hidden.device)
    torch.ops.moeprep.moe_prefill_w13(hidden, w.words, w.scale, w.zero, w.bias, r.sorted_ids, r.expert_ids,
                                      r.num_padded, r.topk_ids.shape[1], activation.kind == "swiglu_oai",
                                      activation.alpha, activation.limit, xs, h, out)


def launch_w2(layer, h: torch.Tensor, r: RoutedTokens, out: torch.Tensor) -> None:
    """``out[t] += w[t, j] * (h[i] W_down^T + b_down)`` for ``sorted_ids[i] = t * k + j``."""
    w = layer.w2
    torch.ops.moeprep.moe_prefill_w2(h, w.words, w.scale, w.zero, w.bias, r.sorted_ids, r.expert_ids, r.num_padded,
                                     r.topk_weights, out)


@register
class WgmmaPrefillBackend(Backend):
    name = "cuda_wgmma_prefill"

    def problems(self, layer: Layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
        return problems(layer, hidden, activation)

    def block_m(self, cfg: configs.MoEConfig) -> int:
        return BLOCK_M

    def h_rows(self, r: RoutedTokens) -> int:
        return h_rows(r)

    def launch(self, layer, hidden, r, h, out, activation, cfg) -> None:
        launch_w13(layer, hidden, r, h, out, activation)
        launch_w2(layer, h, r, out)
