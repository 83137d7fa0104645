"""Model architectures as data: how each family names its MoE experts and router, where its
config keeps the numbers a converter and a server need, and how its MoE block routes.

Adding a family is one entry of ``ARCHITECTURES`` (and a routing function in ``moeprep.moe`` when
its math is new). The expert tensors themselves are found by ``EXPERT_MODULE`` whatever the family:
every producer writes routed experts as ``...layers.L.<block>.experts.E.<projection>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import UnsupportedError

# One expert projection module. The block name and projection names vary by producer:
# Qwen3-MoE and GPTQModel/Quark Mixtral use mlp.experts.E.{gate,up,down}_proj, original Mixtral
# uses block_sparse_moe.experts.E.w1|w3|w2, llm-compressor mixes block_sparse_moe with *_proj.
# Multimodal checkpoints put the text layers under model.language_model.layers.
EXPERT_MODULE = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.experts\."
    r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$"
)
PROJ_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # config.json model_type values, aliases included
    router_names: tuple[str, ...]  # module names relative to the MoE block prefix
    activation: str  # "silu" or "swiglu_oai" (gpt-oss clamped SwiGLU)
    # routing: "softmax_topk" (renormalised if norm_topk_prob), "softmax_topk_renorm" (always),
    # "topk_softmax" (gpt-oss), "noaux_tc" (DeepSeek: sigmoid, correction bias, groups, scaling)
    routing: str
    expert_keys: tuple[str, ...] = ("num_local_experts", "num_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "experts_per_token")
    text_config: bool = False  # multimodal configs keep the numbers under text_config
    shared_experts: Optional[str] = None  # module under the MoE block, e.g. "shared_expert"
    shared_expert_gate: Optional[str] = None  # a [1, H] gate scaling the shared experts
    weights_in_logits_dtype: bool = False  # the router's top-k weights handed back in the logits' dtype

    def settings(self, config: dict) -> dict:
        """The config keys of the language model: the top level, or text_config where it has one."""
        text = config.get("text_config") if self.text_config else None
        return {**config, **text} if isinstance(text, dict) else config

    def num_experts(self, config: dict) -> int:
        return _positive(self.settings(config), self.expert_keys, self.name)

    def top_k(self, config: dict) -> int:
        return _positive(self.settings(config), self.top_k_keys, self.name)

    @property
    def known(self) -> bool:
        return self.name in ARCHITECTURES


def _positive(config: dict, keys: tuple[str, ...], arch: str) -> int:
    """The first of ``keys`` holding a positive integer (producers differ in which they write)."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise UnsupportedError(f"{arch} config.json has no positive {' or '.join(keys)}", path="config.json")


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("qwen3_moe", ("qwen3_moe",), ("gate",), "silu", "softmax_topk", weights_in_logits_dtype=True),
        Architecture("mixtral", ("mixtral",), ("gate",), "silu", "softmax_topk_renorm"),
        Architecture("gpt_oss", ("gpt_oss",), ("router",), "swiglu_oai", "topk_softmax"),
        Architecture("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_6_moe", "qwen3_6_moe_text"), ("gate",),
                     "silu", "softmax_topk_renorm", text_config=True, shared_experts="shared_expert",
                     shared_expert_gate="shared_expert_gate"),
        Architecture("deepseek_v3", ("deepseek_v3", "kimi_k2"), ("gate",), "silu", "noaux_tc",
                     expert_keys=("n_routed_experts",), shared_experts="shared_experts"),
        Architecture("glm4_moe", ("glm4_moe",), ("gate",), "silu", "noaux_tc", expert_keys=("n_routed_experts",),
                     shared_experts="shared_experts"),
    )
}


def unknown_architecture(config: dict) -> Architecture:
    """What ``dequant`` maps a family it does not know as: nothing but its name."""
    return Architecture(f"unknown ({config.get('model_type')!r})", (), (), "silu", "unknown")


def detect_architecture(config: dict) -> Architecture:
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedError(
        f"unsupported architecture: model_type {model_type!r} (supported: {supported}); moeprep needs an entry "
        f"in moeprep/arch.py for it (config keys, expert, router and shared-expert names, routing)", path="config.json"
    )
