"""Checkpoints of every source format, built by the independent packers (tests/packers), with
what `inspect` must report for each. The four real fixtures are in conftest.REAL_FIXTURES."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Case:
    id: str
    fmt: str  # packer format
    arch: str
    options: dict = field(default_factory=dict)
    format: str = ""  # what moeprep calls it
    symmetric: bool = True
    desc_act: bool = False
    group_size: int = 32


CASES = [
    Case("ct_int4_asym", "ct_int4", "qwen3_moe", {"sym": False}, "compressed-tensors-int4", symmetric=False),
    Case("ct_int4_asym_fp16_g64", "ct_int4", "qwen3_moe", {"sym": False, "scale_dtype": "float16", "group_size": 64}, "compressed-tensors-int4", symmetric=False, group_size=64),
    Case("ct_int4_sym_mixtral_llmc", "ct_int4", "mixtral", {"sym": True, "mixtral_naming": "llmcompressor"}, "compressed-tensors-int4"),
    Case("ct_mxfp4", "ct_mxfp4", "qwen3_moe", {}, "compressed-tensors-mxfp4"),
    Case("quark_mxfp4_mixtral", "quark_mxfp4", "mixtral", {}, "quark-mxfp4"),
    Case("gptoss_mxfp4", "gptoss_mxfp4", "gpt_oss", {}, "gpt-oss-mxfp4"),
    Case("awq_bf16", "awq", "qwen3_moe", {"scale_dtype": "bfloat16"}, "awq", symmetric=False),
    Case("awq_mixtral_original", "awq", "mixtral", {"mixtral_naming": "original"}, "awq", symmetric=False),
    Case("gptq_v1_asym_zero0", "gptq", "qwen3_moe", {"checkpoint_format": "gptq", "sym": False, "zero_point_zero_frac": 0.2}, "gptq", symmetric=False),
    Case("gptq_v2_asym", "gptq", "qwen3_moe", {"checkpoint_format": "gptq_v2", "sym": False}, "gptq", symmetric=False),
    Case("gptq_v1_sym_descact", "gptq", "qwen3_moe", {"checkpoint_format": "gptq", "sym": True, "desc_act": True}, "gptq", desc_act=True),
    Case("gptq_v2_sym_descact_bf16", "gptq", "qwen3_moe", {"checkpoint_format": "gptq_v2", "sym": True, "desc_act": True, "scale_dtype": "bfloat16"}, "gptq", desc_act=True),
    Case("gptq_v1_asym_descact_mixtral_sharded", "gptq", "mixtral", {"checkpoint_format": "gptq", "sym": False, "desc_act": True, "mixtral_naming": "original", "shards": 3}, "gptq", symmetric=False, desc_act=True),
    Case("gptq_v2_sym_mixtral_gptqmodel", "gptq", "mixtral", {"checkpoint_format": "gptq_v2", "sym": True, "mixtral_naming": "gptqmodel"}, "gptq"),
]
CASE_IDS = [c.id for c in CASES]
BY_ID = {c.id: c for c in CASES}
