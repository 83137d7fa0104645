"""``fused_moe``: routing and both expert GEMMs on the stored layouts, three to five launches, by
the backend the call's configuration names (kernels/backend.py): the Triton GEMMs, or on CUDA the
tensor-core GEMMs of mma_decode.py (decode batches) or wgmma_prefill.py (prefill batches, Hopper)
where they apply. :func:`call_config` is the one place that chooses."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..errors import MoeprepError
from ..moe import Activation, ExpertWeights, Routing
from . import configs, mma_decode, triton_gemms, wgmma_prefill  # noqa: F401  (importing registers the backends)
from .backend import BACKENDS
from .layer import Layer, prepare
from .routing import align_tokens, route_tokens

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    routing: Routing,
    experts: ExpertWeights,
    activation: Activation,
    config: Optional[configs.MoEConfig] = None,
    correction_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MoE block's output ``[T, H]`` in ``hidden.dtype``: ``sum_j w[t, j] * expert_j(hidden[t])``
    over the top-k experts of ``router_logits`` (routing as in :func:`moeprep.moe.route`, with
    noaux_tc's ``correction_bias``).

    ``config`` overrides the configuration (it is still fitted to the shapes, and its backend still
    falls back to Triton where it cannot run the call).
    """
    layer = prepare(experts)
    T = _check(layer, hidden, activation)
    if router_logits.shape != (T, layer.experts):
        raise MoeprepError(f"expected router logits [{T}, {layer.experts}], got {list(router_logits.shape)}")
    return _run(layer, hidden, routing.top_k, activation, config,
                lambda block_m: route_tokens(router_logits, routing, block_m, correction_bias=correction_bias))


def fused_experts(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: ExpertWeights,
    activation: Activation,
    config: Optional[configs.MoEConfig] = None,
) -> torch.Tensor:
    """Like :func:`fused_moe`, for top-k choices an engine's own router made (``[T, k]`` weights and
    ids, every id one of the layer's experts)."""
    layer = prepare(experts)
    T = _check(layer, hidden, activation)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise MoeprepError(f"expected top-k weights and ids [{T}, k], got {list(topk_weights.shape)} and {list(topk_ids.shape)}")
    return _run(layer, hidden, topk_ids.shape[1], activation, config,
                lambda block_m: align_tokens(topk_weights, topk_ids, layer.experts, block_m))


def _check(layer: Layer, hidden: torch.Tensor, activation: Activation) -> int:
    if activation.kind not in triton_gemms.ACTIVATIONS:
        raise MoeprepError(f"activation {activation.kind!r} has no fused kernel (supported: {', '.join(triton_gemms.ACTIVATIONS)})")
    if hidden.dtype not in DTYPES:
        raise MoeprepError(f"hidden states must be bfloat16, float16 or float32, got {hidden.dtype}")
    if hidden.dim() != 2 or hidden.shape[1] != layer.hidden:
        raise MoeprepError(f"expected hidden states [T, {layer.hidden}], got {list(hidden.shape)}")
    return hidden.shape[0]


def _run(layer: Layer, hidden: torch.Tensor, top_k: int, activation: Activation, config, routed) -> torch.Tensor:
    T, H = hidden.shape
    if T == 0:
        return hidden.new_zeros((0, H))
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cfg = call_config(layer, hidden, top_k, activation, config)
    backend = BACKENDS[cfg.backend]
    r = routed(cfg.block_m)
    h = torch.empty((backend.h_rows(r), layer.inter), dtype=hidden.dtype, device=hidden.device)
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    backend.launch(layer, hidden, r, h, out, activation, cfg)
    return out


def call_config(layer: Layer, hidden: torch.Tensor, top_k: int, activation: Activation,
                config: Optional[configs.MoEConfig] = None) -> configs.MoEConfig:
    """The configuration a call on ``hidden`` runs: :func:`pick_config`'s, on the Triton backend where
    the backend it names cannot run the call, with ``block_m`` the chosen backend's."""
    cfg = pick_config(layer, hidden.shape[0], top_k, hidden.device, config)
    if BACKENDS[cfg.backend].problems(layer, hidden, activation):
        cfg = replace(cfg, backend=triton_gemms.TritonGemms.name, mma=None)
    return replace(cfg, block_m=BACKENDS[cfg.backend].block_m(cfg))


def pick_config(layer: Layer, tokens: int, top_k: int, device: torch.device,
                config: Optional[configs.MoEConfig] = None) -> configs.MoEConfig:
    groups = (layer.w13.group_size, layer.w2.group_size)
    shape = (tokens, top_k, layer.experts, layer.hidden, layer.inter)
    if config is None:
        return configs.pick(*shape, layer.family, device, groups)
    return configs.fit(config, *shape, device, groups)
