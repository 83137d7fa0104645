"""Router semantics of each architecture, exactly as transformers computes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import Architecture


@dataclass(frozen=True)
class Routing:
    """``softmax_topk``: softmax over all experts, then top-k (optionally renormalised);
    ``topk_softmax``: top-k of the logits, then softmax over those k (gpt-oss)."""

    scoring: str
    top_k: int
    renormalize: bool
    weights_in_logits_dtype: bool = False  # Qwen3-MoE casts the top-k weights back


    @classmethod
    def for_arch(cls, arch: Architecture, config: dict) -> "Routing":
        top_k = arch.top_k(config)
        if arch.name == "gpt_oss":
            return cls("topk_softmax", top_k, False)
        if arch.name == "mixtral":
            return cls("softmax_topk", top_k, True)
        return cls("softmax_topk", top_k, bool(config.get("norm_topk_prob", False)), True)


def route(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` -> (weights ``[T, k]``, expert ids ``[T, k]`` int64)."""
    if routing.scoring == "topk_softmax":
        values, ids = torch.topk(logits, routing.top_k, dim=-1)
        return torch.softmax(values, dim=1, dtype=values.dtype), ids
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    values, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    if routing.weights_in_logits_dtype:
        values = values.to(logits.dtype)
    return values, ids
