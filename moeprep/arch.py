"""Model architectures: how each names its MoE experts and router, and where its config keeps
the numbers a converter and a server need."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UnsupportedError

# One expert projection module. The block name and projection names vary by producer:
# Qwen3-MoE and GPTQModel/Quark Mixtral use mlp.experts.E.{gate,up,down}_proj, original Mixtral
# uses block_sparse_moe.experts.E.w1|w3|w2, llm-compressor mixes block_sparse_moe with *_proj.
EXPERT_MODULE = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:mlp|block_sparse_moe))\.experts\."
    r"(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$"
)
PROJ_ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    router_names: tuple[str, ...]  # module names relative to the MoE block prefix
    activation: str  # "silu" or "swiglu_oai" (gpt-oss clamped SwiGLU)

    def num_experts(self, config: dict) -> int:
        return _positive(config, ("num_local_experts", "num_experts"), self.name)

    def top_k(self, config: dict) -> int:
        return _positive(config, ("num_experts_per_tok", "experts_per_token"), self.name)


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
        Architecture("qwen3_moe", ("qwen3_moe",), ("gate",), "silu"),
        Architecture("mixtral", ("mixtral",), ("gate",), "silu"),
        Architecture("gpt_oss", ("gpt_oss",), ("router",), "swiglu_oai"),
    )
}


def detect_architecture(config: dict) -> Architecture:
    model_type = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedError(
        f"unsupported architecture: model_type {model_type!r} (supported: {supported})", path="config.json"
    )
