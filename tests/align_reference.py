"""Pure-torch reference of the routing kernels' block alignment (the MoE math itself is
:func:`moeprep.moe.route` then :func:`moeprep.serve.torch_moe.experts_reference`)."""
from __future__ import annotations

import torch


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted flat ids with sentinel padding, expert of each block, padded length) for top-k ids
    ``[T, k]``: experts in order, flat ids ``t * k + j`` increasing within an expert, each
    expert's run padded to a multiple of ``block_m`` with ``T * k``."""
    flat = topk_ids.reshape(-1).to(torch.int64).cpu()
    sentinel = flat.numel()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    pieces, start = [], 0
    for e in range(num_experts):
        c, p = int(counts[e]), int(padded[e])
        pieces += [order[start : start + c], torch.full((p - c,), sentinel, dtype=torch.int64)]
        start += c
    sorted_ids = torch.cat(pieces)
    expert_ids = torch.repeat_interleave(torch.arange(num_experts), padded // block_m)
    return sorted_ids.to(torch.int32), expert_ids.to(torch.int32), int(padded.sum())
