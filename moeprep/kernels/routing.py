"""Routing on the device: router scores, top-k, and the per-expert block alignment of the tokens.

The grouped GEMMs walk the (token, slot) pairs expert by expert in blocks of ``block_m`` rows
(vLLM's ``moe_align_block_size``): ``sorted_ids`` lists the flat ids ``t * k + j`` grouped by
expert, in increasing flat id within an expert, each expert's run padded to a multiple of
``block_m`` with the sentinel ``T * k``; ``expert_ids[b]`` is the expert of block ``b``;
``num_padded`` the length of the used part.

Up to :data:`FUSED_MAX_TOKENS` tokens (decode), one program does all of it in one launch: the
top-k ids stay in registers from selection through the counting sort. On Hopper it lets the next
kernel launch at its start (the CUDA gate/up GEMM, whose CTAs then wait for its results). Larger
batches take three launches: top-k and expert counts per chunk of tokens, one program for the
prefix sums, and a scatter per chunk. No stage sorts: a token's rank within its expert is the
number of earlier tokens that chose that expert, a prefix sum over the [tokens, experts] choice
matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import MoeprepError
from ..moe import Routing
from .device import nvidia_capability
from ._triton import INTERPRET, launch_dependents, rounded

FUSED_MAX_TOKENS = 64
_SPLIT_BLOCK_T = 64
SCORINGS = {"softmax_topk": 0, "topk_softmax": 1, "noaux_tc": 2}


@dataclass
class RoutedTokens:
    topk_weights: torch.Tensor  # [T, k] float32
    topk_ids: torch.Tensor  # [T, k] int32
    sorted_ids: torch.Tensor  # [max_padded(T * k, E, block_m)] int32
    expert_ids: torch.Tensor  # [max_padded // block_m] int32; blocks past num_padded unspecified
    num_padded: torch.Tensor  # [1] int32
    block_m: int


def max_padded(pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound of the padded length: every expert in use wastes at most block_m - 1 rows."""
    bound = pairs + min(num_experts, pairs) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


# ---- the stages, as functions on register tensors ---------------------------------------------
@triton.jit
def _noaux_choice(x, s, bias_ptr, col_ok, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, HAS_BIAS: tl.constexpr,
                  N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """noaux_tc's choice scores: sigmoid scores plus the correction bias, -inf outside the
    TOPK_GROUP groups (of BLOCK_E / N_GROUP contiguous experts) whose two best scores sum highest."""
    offs_e = tl.arange(0, BLOCK_E)
    c = s
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + offs_e, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    c = tl.where(col_ok[None, :], c, float("-inf"))
    if N_GROUP > 1:
        GE: tl.constexpr = BLOCK_E // N_GROUP
        g = tl.reshape(c, (BLOCK_T, N_GROUP, GE))
        pos = tl.arange(0, GE)
        m1 = tl.max(g, axis=2)
        first = tl.min(tl.where(g == m1[:, :, None], pos[None, None, :], GE), axis=2)
        m2 = tl.max(tl.where(pos[None, None, :] == first[:, :, None], float("-inf"), g), axis=2)
        score = m1 + m2
        offs_g = tl.arange(0, N_GROUP)
        keep = tl.zeros((BLOCK_T, N_GROUP), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            left = tl.where(keep == 0, score, float("-inf"))
            best = tl.max(left, axis=1)
            gi = tl.min(tl.where((keep == 0) & (left == best[:, None]), offs_g[None, :], N_GROUP), axis=1)
            keep = tl.where(offs_g[None, :] == gi[:, None], 1, keep)
        c = tl.reshape(tl.where(keep[:, :, None] != 0, g, float("-inf")), (BLOCK_T, BLOCK_E))
    return c


@triton.jit
def _topk(logits_ptr, stride_t, t0, T, E, bias_ptr, scale, TOP_K: tl.constexpr, SCORING: tl.constexpr,
          RENORM: tl.constexpr, ROUND: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
          BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr):
    """Top-k of BLOCK_T rows of logits: (ids int32, weights fp32, valid) of shape [BLOCK_T, BLOCK_K],
    and which experts each row chose, int32 [BLOCK_T, BLOCK_E].

    Selection runs on the logits, which order the experts exactly as their softmax does, or for
    noaux_tc on the biased, group-limited sigmoid scores; ties go to the lower expert index.
    """
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    kk = tl.arange(0, BLOCK_K)
    row_ok = offs_t < T
    col_ok = offs_e < E
    x = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_t + offs_e[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=float("-inf")).to(tl.float32)
    if SCORING == 2:
        s = tl.sigmoid(x)
        sel = _noaux_choice(x, s, bias_ptr, col_ok, BLOCK_T, BLOCK_E, HAS_BIAS, N_GROUP, TOPK_GROUP)
    else:
        s = x
        sel = x
    avail = tl.broadcast_to(col_ok[None, :], (BLOCK_T, BLOCK_E))
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    vals = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
    for j in tl.static_range(TOP_K):
        xm = tl.where(avail, sel, float("-inf"))
        m = tl.max(xm, axis=1)
        idx = tl.min(tl.where(avail & (xm == m[:, None]), offs_e[None, :], BLOCK_E), axis=1)
        avail = avail & (offs_e[None, :] != idx[:, None])
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        if SCORING == 2:  # the weight is the unbiased score
            m = tl.sum(tl.where(offs_e[None, :] == idx[:, None], s, 0.0), axis=1)
        vals = tl.where(kk[None, :] == j, m[:, None], vals)
    in_k = kk[None, :] < TOP_K
    if SCORING == 0:  # softmax over all experts (fp32), then the chosen ones
        mx = tl.where(row_ok, tl.max(tl.where(col_ok[None, :], x, float("-inf")), axis=1), 0.0)
        denom = tl.sum(tl.where(col_ok[None, :], tl.exp(x - mx[:, None]), 0.0), axis=1)
        w = tl.where(in_k, tl.exp(vals - mx[:, None]), 0.0) / tl.maximum(denom, 1.0)[:, None]  # >= 1 in used rows
        if RENORM:
            w = w / tl.where(row_ok, tl.sum(w, axis=1), 1.0)[:, None]
    elif SCORING == 1:  # softmax over the k chosen logits
        top = tl.where(row_ok, tl.max(vals, axis=1), 0.0)
        p = tl.where(in_k, tl.exp(vals - top[:, None]), 0.0)
        w = p / tl.maximum(tl.sum(p, axis=1), 1.0)[:, None]  # >= 1 in used rows
    else:  # noaux_tc: the sigmoid scores of the chosen, renormalised if asked, scaled
        w = tl.where(in_k, vals, 0.0)
        if RENORM:
            w = w / (tl.sum(w, axis=1) + 1e-20)[:, None]
        w = w * scale
    if ROUND:  # the architecture hands the weights over in the logits' dtype
        w = rounded(w, logits_ptr.dtype.element_ty).to(tl.float32)
    chosen = (col_ok[None, :] & row_ok[:, None] & ~avail).to(tl.int32)
    return ids, w, row_ok[:, None] & in_k, chosen


@triton.jit
def _rows_of_pairs(chosen, ids, base):
    """Where each (token, slot) pair goes: ``base[e]`` plus the number of earlier tokens of the
    tile that chose the same expert e. A token picks an expert at most once, so this is the
    counting sort's stable order (flat id increasing within an expert) without sorting."""
    before = tl.cumsum(chosen, 0) - chosen
    return tl.gather(base[None, :] + before, tl.minimum(ids, chosen.shape[1] - 1), 1)


@triton.jit
def _padding_and_blocks(sorted_ptr, expert_ids_ptr, num_padded_ptr, counts, pad_start, sentinel, max_blocks_per_expert,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK_B: tl.constexpr):
    """Fills each expert's padding rows with the sentinel, its blocks' expert ids, and the total."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    offs_e = tl.arange(0, BLOCK_E)
    r = tl.arange(0, BLOCK_M)
    fill = tl.full((BLOCK_E, BLOCK_M), sentinel, tl.int32)
    tl.store(sorted_ptr + (pad_start + counts)[:, None] + r[None, :], fill, mask=r[None, :] < (padded - counts)[:, None])
    first = pad_start // BLOCK_M
    nblk = padded // BLOCK_M
    experts = tl.broadcast_to(offs_e[:, None], (BLOCK_E, CHUNK_B))
    for b0 in range(0, max_blocks_per_expert, CHUNK_B):
        b = b0 + tl.arange(0, CHUNK_B)
        tl.store(expert_ids_ptr + first[:, None] + b[None, :], experts, mask=b[None, :] < nblk[:, None])
    tl.store(num_padded_ptr, tl.sum(padded, 0))


# ---- decode: everything in one program ----------------------------------------------------
@triton.jit
def _route_fused_kernel(logits_ptr, stride_t, T, E, bias_ptr, scale, weights_ptr, ids_ptr, sorted_ptr, expert_ids_ptr,
                        num_padded_ptr, TOP_K: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr,
                        ROUND: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                        CHUNK_B: tl.constexpr, EARLY_NEXT: tl.constexpr):
    if EARLY_NEXT:
        launch_dependents()
    ids, w, ok, chosen = _topk(logits_ptr, stride_t, 0, T, E, bias_ptr, scale, TOP_K, SCORING, RENORM, ROUND, BLOCK_T,
                               BLOCK_E, BLOCK_K, HAS_BIAS, N_GROUP, TOPK_GROUP)
    flat = tl.arange(0, BLOCK_T)[:, None] * TOP_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(weights_ptr + flat, w, mask=ok)
    tl.store(ids_ptr + flat, ids, mask=ok)
    counts = tl.sum(chosen, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_start = tl.cumsum(padded, 0) - padded
    tl.store(sorted_ptr + _rows_of_pairs(chosen, ids, pad_start), flat, mask=ok)
    _padding_and_blocks(sorted_ptr, expert_ids_ptr, num_padded_ptr, counts, pad_start, T * TOP_K, CHUNK_B,
                        BLOCK_M, BLOCK_E, CHUNK_B)


# ---- prefill: three launches ------------------------------------------------------------
@triton.jit
def _topk_hist_kernel(logits_ptr, stride_t, T, E, bias_ptr, scale, weights_ptr, ids_ptr, hist_ptr,
                      TOP_K: tl.constexpr, SCORING: tl.constexpr, RENORM: tl.constexpr, ROUND: tl.constexpr,
                      HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    t0 = pid * BLOCK_T
    ids, w, ok, chosen = _topk(logits_ptr, stride_t, t0, T, E, bias_ptr, scale, TOP_K, SCORING, RENORM, ROUND, BLOCK_T,
                               BLOCK_E, BLOCK_K, HAS_BIAS, N_GROUP, TOPK_GROUP)
    flat = (t0 + tl.arange(0, BLOCK_T))[:, None] * TOP_K + tl.arange(0, BLOCK_K)[None, :]
    tl.store(weights_ptr + flat, w, mask=ok)
    tl.store(ids_ptr + flat, ids, mask=ok)
    tl.store(hist_ptr + pid * BLOCK_E + tl.arange(0, BLOCK_E), tl.sum(chosen, 0))


@triton.jit
def _hist_kernel(ids_ptr, hist_ptr, T, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert counts per chunk of tokens, from top-k ids an engine's router chose."""
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j, mask=t < T, other=-1)
        chosen += (e[:, None] == offs_e[None, :]).to(tl.int32)
    tl.store(hist_ptr + pid * BLOCK_E + offs_e, tl.sum(chosen, 0))


@triton.jit
def _align_kernel(hist_ptr, chunks, base_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, T,
                  TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
                  CHUNK_B: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for p0 in range(0, chunks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        h = tl.load(hist_ptr + p[:, None] * BLOCK_E + offs_e[None, :], mask=p[:, None] < chunks, other=0)
        counts += tl.sum(h, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_start = tl.cumsum(padded, 0) - padded
    run = pad_start
    for p0 in range(0, chunks, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        h = tl.load(hist_ptr + p[:, None] * BLOCK_E + offs_e[None, :], mask=p[:, None] < chunks, other=0)
        tl.store(base_ptr + p[:, None] * BLOCK_E + offs_e[None, :], run[None, :] + tl.cumsum(h, 0) - h,
                 mask=p[:, None] < chunks)
        run += tl.sum(h, axis=0)
    _padding_and_blocks(sorted_ptr, expert_ids_ptr, num_padded_ptr, counts, pad_start, T * TOP_K,
                        tl.cdiv(T, BLOCK_M), BLOCK_M, BLOCK_E, CHUNK_B)


@triton.jit
def _scatter_kernel(ids_ptr, base_ptr, sorted_ptr, T, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    kk = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    ok = (t < T)[:, None] & (kk < TOP_K)[None, :]
    flat = t[:, None] * TOP_K + kk[None, :]
    ids = tl.load(ids_ptr + flat, mask=ok, other=0)
    chosen = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + j, mask=t < T, other=-1)
        chosen += (e[:, None] == offs_e[None, :]).to(tl.int32)
    base = tl.load(base_ptr + pid * BLOCK_E + offs_e)
    tl.store(sorted_ptr + _rows_of_pairs(chosen, ids, base), flat, mask=ok)


def _warps(logits_tile: int) -> int:
    """Warps for a program holding a tile of logits: about 32 fp32 logits per thread."""
    return max(4, min(16, logits_tile // 1024))


def _fused_warps(block_t: int, block_e: int) -> int:
    """Warps of the one-program decode routing. A token's top-k is a chain of row reductions, cheapest
    within one warp: a warp per token up to 4 tokens, 8 warps from 16. H200, Qwen3's 128 experts, us
    per call: 1 token 3.4 (4.3 on 4 warps), 2 tokens 3.7 (4.6 on 4), 4 tokens 3.8 (6.3 on 1),
    16 tokens 7.0 (7.5 on 4)."""
    return min(block_t, max(4, min(8, block_t * block_e // 256)))


def _early_next(device: torch.device) -> bool:
    """Whether the decode routing lets the next kernel start at its own start (programmatic dependent
    launch, CUDA sm_90+): the CUDA gate/up GEMM is launched that way and waits for the routing's results
    before it reads them (csrc/moe_decode.cu); a kernel launched the ordinary way still waits for the
    routing to finish."""
    return not INTERPRET and nvidia_capability(device) >= (9, 0)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def kernel_routes(routing: Routing, num_experts: int) -> bool:
    """Whether the routing kernel computes ``routing`` over ``num_experts`` experts: noaux_tc's
    group limit needs the groups to tile a power-of-two expert count."""
    if routing.scoring not in SCORINGS:
        return False
    if routing.scoring == "noaux_tc" and routing.n_group > 1:
        return num_experts == _pow2(num_experts) and num_experts % routing.n_group == 0
    return True


def route_tokens(logits: torch.Tensor, routing: Routing, block_m: int, fused_max_tokens: int = FUSED_MAX_TOKENS,
                 correction_bias: torch.Tensor | None = None) -> RoutedTokens:
    """Router logits ``[T, E]`` -> top-k weights and ids, and the expert-sorted, block-padded ids
    (``correction_bias``: noaux_tc's, for the choice only)."""
    if logits.dim() != 2:
        raise MoeprepError(f"router logits must be [T, E], got shape {list(logits.shape)}")
    T, E = logits.shape
    if not kernel_routes(routing, E):
        raise MoeprepError(f"the routing kernel does not compute {routing.scoring} routing over {E} experts "
                           f"({routing.n_group} groups)")
    k = routing.top_k
    if not 0 < k <= E:
        raise MoeprepError(f"top_k={k} does not fit {E} experts")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    em = max_padded(T * k, E, block_m)
    out = RoutedTokens(
        torch.empty((T, k), dtype=torch.float32, device=dev),
        torch.empty((T, k), dtype=torch.int32, device=dev),
        torch.empty((em,), dtype=torch.int32, device=dev),
        torch.empty((em // block_m,), dtype=torch.int32, device=dev),
        torch.empty((1,), dtype=torch.int32, device=dev),
        block_m,
    )
    noaux = routing.scoring == "noaux_tc"
    bias = correction_bias.float().contiguous() if noaux and correction_bias is not None else logits
    meta = dict(
        TOP_K=k,
        SCORING=SCORINGS[routing.scoring],
        RENORM=routing.scoring in ("softmax_topk", "noaux_tc") and routing.renormalize,
        ROUND=routing.scoring == "topk_softmax" or routing.weights_in_logits_dtype,
        HAS_BIAS=noaux and correction_bias is not None,
        N_GROUP=routing.n_group if noaux else 1,
        TOPK_GROUP=routing.topk_group if noaux else 1,
        BLOCK_E=_pow2(E),
        BLOCK_K=_pow2(k),
    )
    scale = float(routing.scaling) if noaux else 1.0
    if T <= fused_max_tokens:
        block_t = _pow2(T)
        _route_fused_kernel[(1,)](
            logits, logits.stride(0), T, E, bias, scale, out.topk_weights, out.topk_ids, out.sorted_ids, out.expert_ids, out.num_padded,
            BLOCK_M=block_m, BLOCK_T=block_t, CHUNK_B=_pow2(triton.cdiv(block_t, block_m)),
            EARLY_NEXT=_early_next(dev), num_warps=_fused_warps(block_t, meta["BLOCK_E"]), **meta,
        )
        return out
    chunks = triton.cdiv(T, _SPLIT_BLOCK_T)
    hist = torch.empty((chunks, meta["BLOCK_E"]), dtype=torch.int32, device=dev)
    _topk_hist_kernel[(chunks,)](logits, logits.stride(0), T, E, bias, scale, out.topk_weights, out.topk_ids, hist,
                                 BLOCK_T=_SPLIT_BLOCK_T, num_warps=_warps(_SPLIT_BLOCK_T * meta["BLOCK_E"]), **meta)
    _align(out, hist, T, k, meta["BLOCK_E"])
    return out


def _align(out: RoutedTokens, hist: torch.Tensor, T: int, k: int, block_e: int) -> None:
    """Prefix sums of the per-chunk expert counts, then each pair scattered to its row."""
    chunks = hist.shape[0]
    base = torch.empty_like(hist)
    _align_kernel[(1,)](hist, chunks, base, out.sorted_ids, out.expert_ids, out.num_padded, T, TOP_K=k,
                        BLOCK_M=out.block_m, BLOCK_E=block_e, BLOCK_P=min(_pow2(chunks), max(4096 // block_e, 1)),
                        CHUNK_B=min(_pow2(triton.cdiv(T, out.block_m)), 64), num_warps=8)
    _scatter_kernel[(chunks,)](out.topk_ids, base, out.sorted_ids, T, TOP_K=k, BLOCK_T=_SPLIT_BLOCK_T,
                               BLOCK_E=block_e, BLOCK_K=_pow2(k), num_warps=8)


def align_tokens(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, block_m: int) -> RoutedTokens:
    """The block alignment of top-k choices an engine's own router made (``[T, k]`` weights and ids,
    every id in ``[0, num_experts)``)."""
    T, k = topk_ids.shape
    dev = topk_ids.device
    em = max_padded(T * k, num_experts, block_m)
    out = RoutedTokens(topk_weights.float().contiguous(), topk_ids.to(torch.int32).contiguous(),
                       torch.empty((em,), dtype=torch.int32, device=dev),
                       torch.empty((em // block_m,), dtype=torch.int32, device=dev),
                       torch.empty((1,), dtype=torch.int32, device=dev), block_m)
    block_e = _pow2(num_experts)
    chunks = triton.cdiv(T, _SPLIT_BLOCK_T)
    hist = torch.empty((chunks, block_e), dtype=torch.int32, device=dev)
    _hist_kernel[(chunks,)](out.topk_ids, hist, T, TOP_K=k, BLOCK_T=_SPLIT_BLOCK_T, BLOCK_E=block_e, num_warps=8)
    _align(out, hist, T, k, block_e)
    return out
