"""The float model every format is quantized from: seeded random weights, or a given base.

Tensors are float32 numpy arrays under canonical names (see archs.py), in on-disk order:
embeddings, then layer by layer (attention, router, experts), then the final norm and lm_head.
"""

from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import st_io
from .archs import ATTN_PROJS, LINEAR_ATTN, MLA, NOAUX_ARCHS, PROJS, VISION_WIDTH, Naming, is_linear_attention, moe_layers
from .oracle import widen


def _linear_attention_shapes(h: int) -> dict[str, tuple[int, ...]]:
    """Qwen3.5's gated delta-net: the projections in, a causal conv over q/k/v, a gated norm, out."""
    kh, kd = LINEAR_ATTN["linear_num_key_heads"], LINEAR_ATTN["linear_key_head_dim"]
    vh, vd = LINEAR_ATTN["linear_num_value_heads"], LINEAR_ATTN["linear_value_head_dim"]
    conv = 2 * kh * kd + vh * vd
    return {"linear_attn.dt_bias": (vh,), "linear_attn.A_log": (vh,),
            "linear_attn.conv1d.weight": (conv, 1, LINEAR_ATTN["linear_conv_kernel_dim"]),
            "linear_attn.norm.weight": (vd,), "linear_attn.in_proj_qkv.weight": (conv, h),
            "linear_attn.in_proj_z.weight": (vh * vd, h), "linear_attn.in_proj_b.weight": (vh, h),
            "linear_attn.in_proj_a.weight": (vh, h), "linear_attn.out_proj.weight": (h, vh * vd)}


def _attention_shapes(arch: str, o: Any, layer: int) -> dict[str, tuple[int, ...]]:
    """Per-layer attention tensors (relative to the layer), weights and norms and biases."""
    h = o.hidden
    if is_linear_attention(arch, layer):
        return _linear_attention_shapes(h)
    if arch == "deepseek_v3":
        q_head = MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]
        return {"self_attn.q_a_proj.weight": (MLA["q_lora_rank"], h), "self_attn.q_a_layernorm.weight": (MLA["q_lora_rank"],),
                "self_attn.q_b_proj.weight": (o.heads * q_head, MLA["q_lora_rank"]),
                "self_attn.kv_a_proj_with_mqa.weight": (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"], h),
                "self_attn.kv_a_layernorm.weight": (MLA["kv_lora_rank"],),
                "self_attn.kv_b_proj.weight": (o.heads * (MLA["qk_nope_head_dim"] + MLA["v_head_dim"]), MLA["kv_lora_rank"]),
                "self_attn.o_proj.weight": (h, o.heads * MLA["v_head_dim"])}
    q_out, kv_out = o.heads * o.head_dim, o.kv_heads * o.head_dim
    # Qwen3.5's full attention gates its output: q_proj writes the queries and the gate
    attn_shapes = {"q": (2 * q_out if arch == "qwen3_5_moe" else q_out, h), "k": (kv_out, h), "v": (kv_out, h),
                   "o": (h, q_out)}
    shapes = {}
    for proj in ATTN_PROJS:
        shapes[f"self_attn.{proj}_proj.weight"] = attn_shapes[proj]
        if arch == "gpt_oss" or (arch == "glm4_moe" and proj != "o"):
            shapes[f"self_attn.{proj}_proj.bias"] = attn_shapes[proj][:1]
    if arch in ("qwen3_moe", "qwen3_5_moe"):
        shapes["self_attn.q_norm.weight"] = (o.head_dim,)
        shapes["self_attn.k_norm.weight"] = (o.head_dim,)
    if arch == "gpt_oss":
        shapes["self_attn.sinks"] = (o.heads,)
    return shapes


def _mlp(prefix: str, width: int, h: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{proj}_proj.weight": (h, width) if proj == "down" else (width, h) for proj in PROJS}


def expected_shapes(arch: str, o: Any) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, in on-disk order."""
    h, i, e = o.hidden, o.intermediate, o.num_experts
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (o.vocab, h)}
    sparse = set(moe_layers(arch, o))
    for layer in range(o.num_layers):
        p = f"model.layers.{layer}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes.update({f"{p}.{name}": shape for name, shape in _attention_shapes(arch, o, layer).items()})
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if layer not in sparse:
            shapes.update(_mlp(f"{p}.mlp", o.dense_intermediate, h))
            continue
        shapes[f"{p}.mlp.gate.weight"] = (e, h)
        if arch == "gpt_oss":
            shapes[f"{p}.mlp.gate.bias"] = (e,)
        if arch in NOAUX_ARCHS:
            shapes[f"{p}.mlp.gate.e_score_correction_bias"] = (e,)
            shapes.update(_mlp(f"{p}.mlp.shared_experts", i * o.shared_experts, h))
        if arch == "qwen3_5_moe":
            shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, h)
            shapes.update(_mlp(f"{p}.mlp.shared_expert", o.shared_intermediate, h))
        for expert in range(e):
            for proj in PROJS:
                shape = (h, i) if proj == "down" else (i, h)
                shapes[f"{p}.mlp.experts.{expert}.{proj}_proj.weight"] = shape
                if arch == "gpt_oss":
                    shapes[f"{p}.mlp.experts.{expert}.{proj}_proj.bias"] = shape[:1]
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (o.vocab, h)
    if o.multimodal:
        shapes.update(vision_shapes(h))
    return shapes


def vision_shapes(hidden: int) -> dict[str, tuple[int, ...]]:
    """A sliver of the multimodal layout's vision tower: tensors a text server carries and ignores
    (its patch embedding a convolution, the rest linears)."""
    return {"model.visual.patch_embed.proj.weight": (VISION_WIDTH, 3, 2, 16, 16),
            "model.visual.blocks.0.attn.qkv.weight": (3 * VISION_WIDTH, VISION_WIDTH),
            "model.visual.merger.linear_fc2.weight": (hidden, 4 * VISION_WIDTH)}


def is_linear_weight(name: str) -> bool:
    """The modules a quantizer quantizes: attention projections (MLA's and Qwen3.5's delta-net
    projections too, not its 4-row a/b projections), expert projections, and the shared experts
    and dense MLPs of DeepSeek-V3 / GLM-4.5 / Qwen3.5."""
    return bool(re.search(r"\.(self_attn\.(?:[qkvo]_proj|q_[ab]_proj|kv_a_proj_with_mqa|kv_b_proj)"
                          r"|linear_attn\.(?:in_proj_qkv|in_proj_z|out_proj)"
                          r"|experts\.\d+\.(\w+_proj|w[123])|mlp\.(?:shared_experts?\.)?(?:gate|up|down)_proj)\.weight$", name))


def random_model(arch: str, o: Any) -> dict[str, np.ndarray]:
    """Seeded weights shaped like a trained model: rows scaled by exp(0.5 N(0,1)) (as the
    fixtures do) so scales vary per row, plus a per-(row, 32 inputs) offset so asymmetric
    zero points spread over many values."""
    rng = np.random.default_rng(o.seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(arch, o).items():
        if name.endswith("norm.weight"):
            w = 1.0 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("sinks"):
            w = rng.standard_normal(shape)
        elif len(shape) == 1:
            w = 0.02 * rng.standard_normal(shape)
        elif is_linear_weight(name):
            rows, cols = shape
            row_factor = np.exp(0.5 * rng.standard_normal((rows, 1)))
            offset = 0.01 * rng.standard_normal((rows, cols // 32, 1))
            noise = 0.02 * rng.standard_normal((rows, cols // 32, 32))
            w = ((noise + offset).reshape(rows, cols)) * row_factor
        else:
            w = 0.02 * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def _as_float32(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return widen(value) if value.dtype == np.uint16 else value.astype(np.float32)
    return value.detach().float().cpu().numpy()  # a torch tensor


def _load_dir(path: Path) -> dict[str, np.ndarray]:
    ckpt = st_io.Checkpoint(path)
    return {k: ckpt.get(k) for k in ckpt.keys()}


def _unfuse_gptoss(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' fused bf16 gpt-oss experts (`gate_up_proj [E, in, 2I]` with interleaved
    gate/up columns, `down_proj [E, I, out]`) -> per-expert `[out, in]` canonical tensors."""
    out = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?", name)
        if not m:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            base = f"{m[1]}.{e}"
            if m[2] == "down_proj":
                out[f"{base}.down_proj.{'bias' if m[3] else 'weight'}"] = t[e] if m[3] else t[e].T
            elif m[3]:
                out[f"{base}.gate_proj.bias"], out[f"{base}.up_proj.bias"] = t[e, 0::2], t[e, 1::2]
            else:
                out[f"{base}.gate_proj.weight"] = t[e][:, 0::2].T
                out[f"{base}.up_proj.weight"] = t[e][:, 1::2].T
    return out


def base_model(arch: str, o: Any, base: Mapping[str, Any] | str | Path) -> dict[str, np.ndarray]:
    """A given base checkpoint (directory or name -> tensor mapping, with the architecture's
    on-disk names) as canonical float32 tensors, checked against the requested shapes."""
    raw = _load_dir(Path(base)) if isinstance(base, (str, Path)) else dict(base)
    tensors = _unfuse_gptoss({k: _as_float32(v) for k, v in raw.items()})
    naming = Naming(arch)
    tensors = {naming.canonical(k): np.ascontiguousarray(v) for k, v in tensors.items()}
    out = {}
    for name, shape in expected_shapes(arch, o).items():
        if name not in tensors:
            raise ValueError(f"base_weights has no tensor for {name}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"base_weights {name} has shape {tuple(tensors[name].shape)}, options need {shape}")
        out[name] = tensors[name]
    return out
