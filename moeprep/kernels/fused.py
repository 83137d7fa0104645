"""``fused_moe``: routing and both expert GEMMs on the stored layouts, three to five launches: the
Triton GEMMs (moe_gemm.py), or on CUDA the tensor-core GEMMs of mma_decode.py (decode batches) or
wgmma_prefill.py (prefill batches, Hopper) where the configuration asks for them and they apply."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from ..errors import MoeprepError, UnsupportedError
from ..targets import TARGETS
from ..moe import Activation, ExpertWeights, Routing
from . import configs, mma_decode, moe_gemm, wgmma_prefill
from ._triton import INTERPRET
from .device import nvidia_capability
from .routing import RoutedTokens, route_tokens

# a target's kernel_codes -> the GEMMs' FMT
CODES = {"int4_signed": moe_gemm.W4A16.value, "int4_unsigned": moe_gemm.W4A16_ZP.value, "e2m1": moe_gemm.MXFP4.value}
ACTIVATIONS = {"silu": moe_gemm.SILU.value, "swiglu_oai": moe_gemm.SWIGLU_OAI.value}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class _Proj:
    """One projection's stored tensors as the kernels take them."""

    words: torch.Tensor  # the packed codes viewed as int32
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    groups: int
    group_size: int
    scale_cols: int  # E8M0 groups after padding (MXFP4); unused for int4


def problems(experts: ExpertWeights) -> list[str]:
    """Why the kernels cannot run this layer (empty when they can)."""
    target = experts.target
    if target.kernel_codes not in CODES:
        able = [name for name, t in TARGETS.items() if t.kernel_codes in CODES]
        return [f"target {target.name} has no fused kernel (supported: {', '.join(able)})"]
    found = []
    for proj in ("w13", "w2"):
        s = experts.plan.shapes[proj]
        if target.kernel_codes == "e2m1" and s.group_size != 32:
            found.append(f"{proj}: MXFP4 group size {s.group_size}, expected 32")
        if configs.fit_block_k(128, s.cols, s.group_size) == 0:
            found.append(f"{proj}: no K tile of >= 16 columns fits K={s.cols} with group size {s.group_size}")
    return found


@dataclass(frozen=True)
class Layer:
    """A MoE layer's stored tensors as the kernels take them."""

    fmt: int
    gate_up_interleaved: bool
    w13: _Proj
    w2: _Proj
    input_perm: Optional[torch.Tensor]
    experts: int
    hidden: int
    inter: int

    @property
    def family(self) -> str:
        return "mxfp4" if self.fmt == moe_gemm.MXFP4.value else "int4"


def prepare(experts: ExpertWeights) -> Layer:
    found = problems(experts)
    if found:
        raise UnsupportedError("; ".join(found))
    target = experts.target
    perm = _plain(experts.get("w13_input_perm"))
    return Layer(CODES[target.kernel_codes], target.gate_up_interleaved, _proj(experts, "w13"), _proj(experts, "w2"), None if perm is None else perm.contiguous(),
                 experts.num_experts, experts.hidden_size, experts.intermediate_size)


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.as_subclass(torch.Tensor)


def _proj(experts: ExpertWeights, proj: str) -> _Proj:
    shape = experts.plan.shapes[proj]
    scale = _plain(experts.get(f"{proj}_weight_scale"))
    if scale.element_size() == 1:
        scale = scale.view(torch.uint8)
    return _Proj(
        _plain(experts.get(f"{proj}_weight")).contiguous().view(torch.int32),
        scale.contiguous(),
        _plain(experts.get(f"{proj}_weight_zero_point")),
        _plain(experts.get(f"{proj}_bias")),
        shape.groups,
        shape.group_size,
        scale.shape[-1],
    )


def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    routing: Routing,
    experts: ExpertWeights,
    activation: Activation,
    config: Optional[configs.MoEConfig] = None,
) -> torch.Tensor:
    """The MoE block's output ``[T, H]`` in ``hidden.dtype``: ``sum_j w[t, j] * expert_j(hidden[t])``
    over the top-k experts of ``router_logits`` (routing as in :func:`moeprep.moe.route`).

    ``config`` overrides the tile configuration (it is still fitted to the shapes).
    """
    layer = prepare(experts)
    if activation.kind not in ACTIVATIONS:
        raise MoeprepError(f"activation {activation.kind!r} has no fused kernel (supported: {', '.join(ACTIVATIONS)})")
    if hidden.dtype not in DTYPES:
        raise MoeprepError(f"hidden states must be bfloat16, float16 or float32, got {hidden.dtype}")
    H, E = layer.hidden, layer.experts
    if hidden.dim() != 2 or hidden.shape[1] != H:
        raise MoeprepError(f"expected hidden states [T, {H}], got {list(hidden.shape)}")
    T = hidden.shape[0]
    if router_logits.shape != (T, E):
        raise MoeprepError(f"expected router logits [{T}, {E}], got {list(router_logits.shape)}")
    if T == 0:
        return hidden.new_zeros((0, H))
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    cfg = call_config(layer, hidden, routing.top_k, activation, config)
    r = route_tokens(router_logits, routing, cfg.route_block_m)
    rows = wgmma_prefill.h_rows(r) if cfg.wgmma else T * routing.top_k
    h = torch.empty((rows, layer.inter), dtype=hidden.dtype, device=hidden.device)
    out = torch.empty((T, H), dtype=hidden.dtype, device=hidden.device)
    if cfg.mma is not None:
        mma_decode.launch_w13(layer, hidden, r, h, out, activation, cfg.mma)
        mma_decode.launch_w2(layer, h, r, out, cfg.mma)
    elif cfg.wgmma:
        wgmma_prefill.launch_w13(layer, hidden, r, h, out, activation)
        wgmma_prefill.launch_w2(layer, h, r, out)
    else:
        launch_w13(layer, hidden, r, h, out, activation, cfg)
        launch_w2(layer, h, r, out, cfg)
    return out


def call_config(layer: Layer, hidden: torch.Tensor, top_k: int, activation: Activation,
                config: Optional[configs.MoEConfig] = None) -> configs.MoEConfig:
    """The configuration a call on ``hidden`` runs: :func:`pick_config`'s, without the CUDA GEMMs
    where they do not apply (their Triton stand-ins run)."""
    cfg = pick_config(layer, hidden.shape[0], top_k, hidden.device, config)
    if cfg.mma is not None and mma_decode.problems(layer, hidden, activation):
        cfg = replace(cfg, mma=None)
    if cfg.wgmma and wgmma_prefill.problems(layer, hidden, activation):
        cfg = replace(cfg, wgmma=False)
    return cfg


def pick_config(layer: Layer, tokens: int, top_k: int, device: torch.device,
                config: Optional[configs.MoEConfig] = None) -> configs.MoEConfig:
    groups = (layer.w13.group_size, layer.w2.group_size)
    shape = (tokens, top_k, layer.experts, layer.hidden, layer.inter)
    if config is None:
        return configs.pick(*shape, layer.family, device, groups)
    return configs.fit(config, *shape, device, groups)


def packed_decode(layer: Layer, w: _Proj, a: torch.Tensor) -> bool:
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
