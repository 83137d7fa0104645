"""`quantization_config` (and GPTQModel's `quantize_config.json`) exactly as each producer
writes them; the literal values are copied from the real fixtures and FORMATS.md."""

from __future__ import annotations

import copy
from typing import Any

_CT_WEIGHTS_INT = {
    "actorder": None,
    "block_structure": None,
    "dynamic": False,
    "group_size": 32,
    "num_bits": 4,
    "observer": "memoryless_minmax",
    "observer_kwargs": {},
    "scale_dtype": None,
    "strategy": "group",
    "symmetric": True,
    "type": "int",
    "zp_dtype": None,
}


def _compressed_tensors(fmt: str, weights: dict[str, Any], ignore: list[str]) -> dict[str, Any]:
    return {
        "config_groups": {
            "group_0": {
                "format": fmt,
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": fmt,
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.19.0",
    }


def ct_int4(sym: bool, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """llm-compressor QuantizationModifier, explicit int4 group config_group (§1)."""
    weights = dict(_CT_WEIGHTS_INT, group_size=group_size, symmetric=sym,
                   zp_dtype=None if sym else "torch.int8")
    return _compressed_tensors("pack-quantized", weights, ignore)


def ct_mxfp4(ignore: list[str]) -> dict[str, Any]:
    """llm-compressor scheme MXFP4A16 (§4c)."""
    weights = dict(_CT_WEIGHTS_INT, type="float", scale_dtype="torch.uint8")
    return _compressed_tensors("mxfp4-pack-quantized", weights, ignore)


_GPTQMODEL_META_COMMON = {
    "quantizer": ["gptqmodel:7.6.0"],
    "uri": "https://github.com/modelcloud/gptqmodel",
}
_GPTQMODEL_META_TAIL = {
    "offload_to_disk": False,
    "telemetry": {"device": False},
    "offload_to_disk_path": None,
    "pack_impl": "cpu",
    "gc_mode": "interval",
    "wait_for_submodule_finalizers": False,
    "auto_forward_data_parallel": True,
    "dense_vram_strategy": "exclusive",
    "dense_vram_strategy_devices": None,
    "moe_vram_strategy": "exclusive",
    "moe_vram_strategy_devices": None,
}
_FALLBACK = {"strategy": "rtn", "threshold": "0.5%", "smooth": None}
# GPTQModel's per-module override syntax: a "-:" regex excludes matching modules.
SKIP_ATTENTION_DYNAMIC = {r"-:.*\.self_attn\..*": {}}


def gptq(sym: bool, desc_act: bool, checkpoint_format: str, group_size: int,
         skip_attention: bool) -> dict[str, Any]:
    """GPTQModel 7.6 QuantizeConfig as saved (key order of quantize_config.json)."""
    meta = dict(_GPTQMODEL_META_COMMON, damp_percent=0.05, damp_auto_increment=0.01,
                static_groups=False, true_sequential=True, mse=0.0, gptaq=None, foem=None,
                act_group_aware=False, fallback=dict(_FALLBACK), **_GPTQMODEL_META_TAIL,
                mock_quantization=False,
                hessian={"chunk_size": None, "chunk_bytes": None, "staging_dtype": "float32",
                         "dedup_shared_inputs": True})
    cfg: dict[str, Any] = {
        "bits": 4, "group_size": group_size, "desc_act": desc_act, "lm_head": False,
        "method": "gptq", "quant_method": "gptq", "format": checkpoint_format,
        "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "meta": meta, "sym": sym,
    }
    if skip_attention:
        cfg["dynamic"] = copy.deepcopy(SKIP_ATTENTION_DYNAMIC)
    return cfg


def awq(group_size: int, skip_attention: bool) -> dict[str, Any]:
    """GPTQModel 7.6 AWQConfig(format=GEMM) as saved (§3)."""
    meta = dict(_GPTQMODEL_META_COMMON, damp_percent=None, damp_auto_increment=None,
                static_groups=None, true_sequential=True, mse=None, gptaq=None, foem=None,
                act_group_aware=None, fallback=dict(_FALLBACK), **_GPTQMODEL_META_TAIL,
                scale_search_chunked_activations=True)
    cfg: dict[str, Any] = {
        "bits": 4, "group_size": group_size, "desc_act": False, "lm_head": False,
        "method": "awq", "quant_method": "awq", "format": "gemm", "checkpoint_format": "gemm",
        "pack_dtype": "int32", "meta": meta, "zero_point": True, "version": "gemm",
    }
    if skip_attention:
        cfg["dynamic"] = copy.deepcopy(SKIP_ATTENTION_DYNAMIC)
    return cfg


_QUARK_FP4_SPEC = {
    "block_size": None,
    "ch_axis": -1,
    "dtype": "fp4",
    "enable_buffer_reuse": False,
    "group_size": 32,
    "is_dynamic": False,
    "is_scale_quant": False,
    "max_input_numel": 4194304,
    "mx_element_dtype": None,
    "observer_cls": "PerBlockMXObserver",
    "qscheme": "per_group",
    "round_method": "half_even",
    "scale_calculation_mode": "even",
    "scale_format": "e8m0",
    "scale_type": "float",
    "symmetric": None,
    "zero_point_type": "int32",
}
QUARK_SCHEMES = ("mxfp4", "mxfp4_weight_only")


def quark(exclude: list[str], scheme: str) -> dict[str, Any]:
    """amd-quark 0.13 export (custom_mode="quark", real_quantized, pack_method reorder) (§4b)."""
    if scheme not in QUARK_SCHEMES:
        raise ValueError(f"quark_scheme must be one of {QUARK_SCHEMES}, not {scheme!r}")
    inputs = dict(_QUARK_FP4_SPEC, is_dynamic=True) if scheme == "mxfp4" else None
    return {
        "algo_config": None,
        "exclude": exclude,
        "export": {
            "kv_cache_group": [],
            "min_kv_scale": 0.0,
            "pack_method": "reorder",
            "weight_format": "real_quantized",
            "weight_merge_groups": None,
        },
        "global_quant_config": {
            "bias": None,
            "input_tensors": inputs,
            "output_tensors": None,
            "target_device": None,
            "weight": dict(_QUARK_FP4_SPEC),
        },
        "kv_cache_post_rope": False,
        "kv_cache_quant_config": {},
        "layer_quant_config": {},
        "layer_type_quant_config": {},
        "quant_method": "quark",
        "quant_mode": "eager_mode",
        "softmax_quant_spec": None,
        "version": "0.13",
    }


def gptoss_mxfp4() -> dict[str, Any]:
    """As openai/gpt-oss-20b ships it (§4a)."""
    return {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
