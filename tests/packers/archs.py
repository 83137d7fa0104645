"""Per-architecture facts: config.json contents and tensor/module names on disk.

Internally every model uses canonical (Qwen3-MoE style) names:
`model.layers.L.self_attn.{q,k,v,o}_proj`, `model.layers.L.mlp.gate` (router) and
`model.layers.L.mlp.experts.E.{gate,up,down}_proj`. `Naming` maps them to what a given
producer writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ARCHS = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe", "qwen3_5_moe")
# DeepSeek-V3 and GLM-4.5 (ARCHITECTURES.md): dense layers first, then MoE layers with shared
# experts and a sigmoid router with a correction bias (noaux_tc)
NOAUX_ARCHS = ("deepseek_v3", "glm4_moe")
# DeepSeek-V3's multi-head latent attention, at the Kimi-K2 fixture's sizes
MLA = {"q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32}
# Qwen3.5-MoE's gated delta-net layers, at the Qwen3.5 fixture's sizes; every second layer is full attention
LINEAR_ATTN = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_num_key_heads": 2,
               "linear_num_value_heads": 4, "linear_value_head_dim": 16}
FULL_ATTENTION_INTERVAL = 2
VISION_WIDTH = 64  # the multimodal layout's vision tower, whose tensors a text server carries and ignores
MIXTRAL_NAMINGS = ("original", "llmcompressor", "gptqmodel")
PROJS = ("gate", "up", "down")
ATTN_PROJS = ("q", "k", "v", "o")
TRANSFORMERS_VERSION = "5.23.0"
# The shared fixture tokenizer: <|endoftext|> = 0 (bos/eos), <|pad|> = 1.
BOS_ID, EOS_ID, PAD_ID = 0, 0, 1

_MIXTRAL_ORIGINAL_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}


@dataclass(frozen=True)
class Naming:
    """Module names of one architecture as one producer writes them."""

    arch: str
    mixtral_naming: str = "original"
    multimodal: bool = False  # Qwen3.5's published layout: the language model under model.language_model

    def moe_prefix(self, layer: int) -> str:
        block = "block_sparse_moe" if (
            self.arch == "mixtral" and self.mixtral_naming in ("original", "llmcompressor")
        ) else "mlp"
        return self._placed(f"model.layers.{layer}.{block}")

    def _placed(self, canonical: str) -> str:
        """The language model's tensors move under model.language_model in the multimodal layout;
        lm_head and the vision tower's model.visual stay where they are."""
        if self.multimodal and re.match(r"model\.(layers|embed_tokens|norm)\.", canonical):
            return "model.language_model." + canonical[len("model."):]
        return canonical

    def expert(self, layer: int, expert: int, proj: str) -> str:
        if self.arch == "mixtral" and self.mixtral_naming == "original":
            name = _MIXTRAL_ORIGINAL_PROJ[proj]
        else:
            name = f"{proj}_proj"
        return f"{self.moe_prefix(layer)}.experts.{expert}.{name}"

    def router(self, layer: int) -> str:
        leaf = "router" if self.arch == "gpt_oss" else "gate"
        return f"{self.moe_prefix(layer)}.{leaf}"

    def rename(self, canonical: str) -> str:
        """Canonical tensor name -> on-disk name."""
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.(\w+)", canonical)
        if m:
            return f"{self.expert(int(m[1]), int(m[2]), m[3])}.{m[4]}"
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.(\w+)", canonical)
        if m:
            return f"{self.router(int(m[1]))}.{m[2]}"
        return self._placed(canonical)

    def module(self, canonical_module: str) -> str:
        """Canonical module name -> on-disk module name."""
        return self.rename(canonical_module + ".weight")[: -len(".weight")]

    def canonical(self, name: str) -> str:
        """On-disk name (any Mixtral naming, gpt-oss router, the multimodal layout) -> canonical name."""
        name = re.sub(r"^model\.language_model\.", "model.", name)
        name = re.sub(r"\.block_sparse_moe\.", ".mlp.", name)
        name = re.sub(r"\.mlp\.router\.", ".mlp.gate.", name)
        for proj, w in _MIXTRAL_ORIGINAL_PROJ.items():
            name = re.sub(rf"(\.experts\.\d+)\.{w}\.", rf"\1.{proj}_proj.", name)
        return name


def is_linear_attention(arch: str, layer: int) -> bool:
    """Qwen3.5's gated delta-net layers (layer_types "linear_attention")."""
    return arch == "qwen3_5_moe" and (layer + 1) % FULL_ATTENTION_INTERVAL != 0


def attention_modules(arch: str, layer: int) -> list[str]:
    """The attention projections of one layer that a quantizer quantizes (canonical module names)."""
    if is_linear_attention(arch, layer):
        return [f"model.layers.{layer}.linear_attn.{leaf}" for leaf in ("in_proj_qkv", "in_proj_z", "out_proj")]
    leaves = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj") if arch == "deepseek_v3" else \
        tuple(f"{p}_proj" for p in ATTN_PROJS)
    return [f"model.layers.{layer}.self_attn.{leaf}" for leaf in leaves]


def moe_layers(arch: str, o: Any) -> list[int]:
    first = o.first_k_dense if arch in NOAUX_ARCHS else 0
    return list(range(first, o.num_layers))


def _common(o: Any, dtype: str) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "dtype": dtype,
        "eos_token_id": EOS_ID,
        "head_dim": o.head_dim,
        "hidden_act": "silu",
        "hidden_size": o.hidden,
        "initializer_range": 0.02,
        "num_attention_heads": o.heads,
        "num_experts_per_tok": o.top_k,
        "num_hidden_layers": o.num_layers,
        "num_key_value_heads": o.kv_heads,
        "num_local_experts": o.num_experts,
        "output_router_logits": False,
        "pad_token_id": PAD_ID,
        "router_aux_loss_coef": 0.001,
        "tie_word_embeddings": False,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": o.vocab,
    }


def model_config(arch: str, o: Any, dtype: str) -> dict[str, Any]:
    """config.json (without quantization_config) as transformers 5.23 saves it."""
    cfg = _common(o, dtype)
    if arch == "qwen3_moe":
        # Surprise 3: transformers 5 writes num_local_experts, rope_parameters and dtype.
        cfg.update({
            "architectures": ["Qwen3MoeForCausalLM"],
            "attention_bias": False,
            "decoder_sparse_step": 1,
            "intermediate_size": 4 * o.intermediate,
            "max_position_embeddings": 512,
            "mlp_only_layers": [],
            "model_type": "qwen3_moe",
            "moe_intermediate_size": o.intermediate,
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "sliding_window": None,
            "use_sliding_window": False,
        })
    elif arch == "mixtral":
        cfg.update({
            "architectures": ["MixtralForCausalLM"],
            "intermediate_size": o.intermediate,
            "max_position_embeddings": 131072,
            "model_type": "mixtral",
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "router_jitter_noise": 0.0,
            "sliding_window": None,
        })
    elif arch in NOAUX_ARCHS:
        del cfg["num_local_experts"], cfg["router_aux_loss_coef"]
        cfg.update({
            "first_k_dense_replace": o.first_k_dense,
            "intermediate_size": o.dense_intermediate,
            "max_position_embeddings": 512,
            "moe_intermediate_size": o.intermediate,
            "n_group": o.n_group,
            "n_routed_experts": o.num_experts,
            "n_shared_experts": o.shared_experts,
            "norm_topk_prob": True,
            "num_nextn_predict_layers": 0,
            "rms_norm_eps": 1e-06 if arch == "deepseek_v3" else 1e-05,
            "routed_scaling_factor": o.routed_scaling_factor,
            "topk_group": o.topk_group,
        })
        if arch == "deepseek_v3":  # the real checkpoints also say how they route
            cfg.update({"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "model_type": "deepseek_v3",
                        "qk_head_dim": MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"], "rope_interleave": True,
                        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "scoring_func": "sigmoid",
                        "topk_method": "noaux_tc", **MLA})
            cfg["head_dim"] = MLA["qk_rope_head_dim"]
            cfg["num_key_value_heads"] = o.heads  # latent attention: every head has its own keys and values
        else:
            cfg.update({"architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "model_type": "glm4_moe",
                        "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
                        "use_qk_norm": False})
    elif arch == "qwen3_5_moe":
        return _qwen3_5_config(o, cfg)
    elif arch == "gpt_oss":
        cfg.update({
            "architectures": ["GptOssForCausalLM"],
            "attention_bias": True,
            "intermediate_size": o.intermediate,
            "layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(o.num_layers)],
            "max_position_embeddings": 131072,
            "model_type": "gpt_oss",
            "rms_norm_eps": 1e-05,
            "rope_parameters": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0,
                "rope_type": "yarn",
                "truncate": False,
            },
            "sliding_window": 128,
            "swiglu_alpha": 1.702,
            "swiglu_limit": 7.0,
        })
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return cfg


def _qwen3_5_config(o: Any, common: dict[str, Any]) -> dict[str, Any]:
    """Qwen3.5-MoE as transformers saves it (the Qwen3.5 fixture's keys): the text class, or the
    published multimodal class with every text key inside text_config (ARCHITECTURES.md)."""
    text = {k: v for k, v in common.items() if k != "num_local_experts"}
    text.update({
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "attention_bias": False,
        "full_attention_interval": FULL_ATTENTION_INTERVAL,
        "layer_types": ["linear_attention" if is_linear_attention("qwen3_5_moe", i) else "full_attention"
                        for i in range(o.num_layers)],
        "max_position_embeddings": 512,
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": o.intermediate,
        "num_experts": o.num_experts,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000.0, "rope_type": "default"},
        "shared_expert_intermediate_size": o.shared_intermediate,
        **LINEAR_ATTN,
    })
    if not o.multimodal:
        return text
    outer_keys = ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "transformers_version")
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {k: v for k, v in text.items() if k != "architectures"},
        "vision_config": {"model_type": "qwen3_5_moe", "depth": 1, "hidden_size": VISION_WIDTH,
                          "out_hidden_size": o.hidden, "num_heads": 2},
        **{k: text[k] for k in outer_keys},
    }


def generation_config(sampling: bool) -> dict[str, Any]:
    """GPTQModel's save adds do_sample (seen in the GPTQ and AWQ fixtures)."""
    cfg: dict[str, Any] = {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "output_attentions": False,
        "output_hidden_states": False,
        "pad_token_id": PAD_ID,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
    }
    if sampling:
        cfg["do_sample"] = True
    return dict(sorted(cfg.items()))
