"""What an MoE block is, independent of how it is computed: its routing, its activation and its
stored experts. The serving layer and the GPU kernels both work from these."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .lazy import torch

from .arch import Architecture
from .errors import UnsupportedError
from .targets import LayerPlan, Target


@dataclass(frozen=True)
class Routing:
    """``softmax_topk``: softmax over all experts, then top-k (optionally renormalised);
    ``topk_softmax``: top-k of the logits, then softmax over those k (gpt-oss); ``noaux_tc``
    (DeepSeek-V3, GLM-4.5): sigmoid scores, the choice made on scores plus a correction bias within
    the ``topk_group`` best of ``n_group`` expert groups, the weights the unbiased scores
    (renormalised if asked), times ``scaling``."""

    scoring: str
    top_k: int
    renormalize: bool
    weights_in_logits_dtype: bool = False  # Qwen3-MoE casts the top-k weights back
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0

    @classmethod
    def for_arch(cls, arch: Architecture, config: dict) -> "Routing":
        top_k = arch.top_k(config)
        settings = arch.settings(config)
        if arch.routing == "topk_softmax":
            return cls("topk_softmax", top_k, False)
        if arch.routing == "softmax_topk_renorm":
            return cls("softmax_topk", top_k, True, arch.weights_in_logits_dtype)
        if arch.routing == "softmax_topk":
            return cls("softmax_topk", top_k, bool(settings.get("norm_topk_prob", False)), arch.weights_in_logits_dtype)
        if arch.routing == "noaux_tc":
            groups, best = int(settings.get("n_group") or 1), int(settings.get("topk_group") or 1)
            return cls("noaux_tc", top_k, bool(settings.get("norm_topk_prob", False)), n_group=groups,
                       topk_group=best, scaling=float(settings.get("routed_scaling_factor") or 1.0))
        raise UnsupportedError(f"{arch.name}: moeprep does not compute {arch.routing} routing", path="config.json")


def route(logits: torch.Tensor, routing: Routing,
          correction_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[T, E]`` -> (weights ``[T, k]``, expert ids ``[T, k]`` int64), exactly as
    transformers computes them for the architecture (``correction_bias``: noaux_tc's)."""
    if routing.scoring == "noaux_tc":
        return _noaux_tc(logits, routing, correction_bias)
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


def _noaux_tc(logits: torch.Tensor, routing: Routing, bias: Optional[torch.Tensor]):
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if routing.n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, routing.n_group, E // routing.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(routing.topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
    ids = torch.topk(choice, routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scaling, ids


@dataclass(frozen=True)
class Activation:
    """``silu``: ``down(silu(gate x) * up x)``; ``swiglu_oai``: gpt-oss's clamped SwiGLU with biases."""

    kind: str
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def for_arch(cls, arch_activation: str, config: dict) -> "Activation":
        if arch_activation == "swiglu_oai":
            return cls("swiglu_oai", float(config.get("swiglu_alpha", 1.702)), float(config.get("swiglu_limit") or 7.0))
        return cls("silu")


@dataclass
class ExpertWeights:
    """The stored tensors of one MoE layer (``role`` -> tensor, e.g. ``"w13_weight"``), in their
    target's layout, with the plan that says their shapes."""

    prefix: str
    plan: LayerPlan
    target: Target
    tensors: dict[str, torch.Tensor]
    row_perm: Optional[torch.Tensor]

    def get(self, role: str) -> Optional[torch.Tensor]:
        return self.tensors.get(role)

    @property
    def num_experts(self) -> int:
        return self.plan.shapes["w13"].experts

    @property
    def hidden_size(self) -> int:
        return self.plan.shapes["w13"].cols

    @property
    def intermediate_size(self) -> int:
        return self.plan.shapes["w13"].rows // 2

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "ExpertWeights":
        return ExpertWeights(self.prefix, self.plan, self.target, tensors, self.row_perm)

    def to(self, device) -> "ExpertWeights":
        return self.with_tensors({role: t.to(device) for role, t in self.tensors.items()})

    def canonical(self):
        """Per expert ``{"gate", "up", "down"}`` canonical linears in the source's order (exact)."""
        stored = {role: t.as_subclass(torch.Tensor) for role, t in self.tensors.items()}
        return self.target.decode_layer(self.plan, stored, self.row_perm)
