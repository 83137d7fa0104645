"""Options of build_checkpoint, their per-format defaults and their validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from .archs import ARCHS, MIXTRAL_NAMINGS
from .floats import FLOAT_DTYPES
from .formats import GPTQ_CHECKPOINT_FORMATS
from .qconfigs import QUARK_SCHEMES

FORMATS = ("ct_int4", "ct_mxfp4", "gptq", "awq", "quark_mxfp4", "gptoss_mxfp4", "bf16")
INT4_FORMATS = ("ct_int4", "gptq", "awq")
MXFP4_FORMATS = ("ct_mxfp4", "quark_mxfp4", "gptoss_mxfp4")

# Per-format defaults, as the real producers write them.
_DEFAULT_SYM = {"ct_int4": True, "gptq": True, "awq": False}
_DEFAULT_SCALE_DTYPE = {"ct_int4": "bfloat16", "gptq": "float16", "awq": "float16"}
_DEFAULT_MIXTRAL_NAMING = {
    "ct_int4": "llmcompressor", "ct_mxfp4": "llmcompressor",
    "gptq": "gptqmodel", "awq": "gptqmodel", "quark_mxfp4": "gptqmodel",
    "bf16": "original",
}


@dataclass(frozen=True)
class Options:
    num_layers: int = 2
    hidden: int = 256
    intermediate: int = 128  # expert intermediate size
    num_experts: int = 8
    top_k: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    group_size: int = 32
    seed: int = 0
    shards: int = 1
    tokenizer_dir: str | Path | None = None
    sym: bool | None = None  # int4 formats; None: the format's default
    desc_act: bool = False  # gptq
    checkpoint_format: str = "gptq"  # gptq: "gptq" (v1) or "gptq_v2"
    scale_dtype: str | None = None  # int4 formats: "float16" / "bfloat16"
    mixtral_naming: str | None = None  # "original" / "llmcompressor" / "gptqmodel"
    quantize_attention: bool = True
    base_weights: Mapping[str, Any] | str | Path | None = None
    zero_point_zero_frac: float = 0.0  # asym int4: share of zero points forced to 0
    quark_scheme: str = "mxfp4"  # or "mxfp4_weight_only"
    mxfp4_signed_zero: bool = True  # MXFP4: write -0 (code 8) for small negatives
    # DeepSeek-V3 / GLM-4.5
    first_k_dense: int = 1  # the leading dense layers
    dense_intermediate: int = 320  # their MLP width
    shared_experts: int = 1  # n_shared_experts (the shared MLP is this many expert widths)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.5
    # Qwen3.5-MoE
    shared_intermediate: int = 64  # shared_expert_intermediate_size (the fixture's: half an expert's width)
    multimodal: bool = False  # the published layout: text_config, model.language_model.*, model.visual.*

    def as_json(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy a base_weights mapping of tensors
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        bw = d["base_weights"]
        d["base_weights"] = None if bw is None else (str(bw) if isinstance(bw, (str, Path)) else "<mapping>")
        d["tokenizer_dir"] = None if self.tokenizer_dir is None else str(self.tokenizer_dir)
        return d


def resolve(fmt: str, arch: str, given: Mapping[str, Any]) -> Options:
    """Fill per-format defaults and reject combinations no producer writes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    names = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; known: {sorted(names)}")
    o = Options(**given)
    o = dataclasses.replace(
        o,
        sym=_DEFAULT_SYM.get(fmt) if o.sym is None else o.sym,
        scale_dtype=_DEFAULT_SCALE_DTYPE.get(fmt) if o.scale_dtype is None else o.scale_dtype,
        mixtral_naming=(_DEFAULT_MIXTRAL_NAMING.get(fmt) if o.mixtral_naming is None else o.mixtral_naming)
        if arch == "mixtral" else None,
        quantize_attention=o.quantize_attention and arch != "gpt_oss",
    )
    _validate(fmt, arch, given, o)
    return o


def _validate(fmt: str, arch: str, given: Mapping[str, Any], o: Options) -> None:
    if (arch == "gpt_oss") != (fmt == "gptoss_mxfp4") and fmt != "bf16":
        raise ValueError(f"format {fmt!r} is not written for arch {arch!r} "
                         "(gpt-oss: gptoss_mxfp4 or bf16; gptoss_mxfp4: gpt_oss only)")
    if arch == "gpt_oss" and given.get("quantize_attention"):
        raise ValueError("gpt-oss checkpoints never quantize attention (modules_to_not_convert)")
    if fmt == "awq" and o.sym:
        raise ValueError("AWQ GEMM is asymmetric only (zero_point: true)")
    if fmt not in INT4_FORMATS:
        bad = [k for k in ("sym", "scale_dtype") if given.get(k) is not None]
        bad += ["zero_point_zero_frac"] if given.get("zero_point_zero_frac") else []
        if bad:
            raise ValueError(f"option(s) {bad} apply to int4 formats {INT4_FORMATS}, not {fmt!r}")
    if fmt not in MXFP4_FORMATS and "mxfp4_signed_zero" in given:
        raise ValueError(f"mxfp4_signed_zero applies to MXFP4 formats {MXFP4_FORMATS}, not {fmt!r}")
    if fmt != "gptq" and ("desc_act" in given or "checkpoint_format" in given):
        raise ValueError("desc_act and checkpoint_format apply to fmt='gptq' only")
    if fmt == "gptq" and o.checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}")
    if o.scale_dtype is not None and o.scale_dtype not in FLOAT_DTYPES:
        raise ValueError(f"scale_dtype must be one of {FLOAT_DTYPES}, not {o.scale_dtype!r}")
    if arch == "mixtral" and o.mixtral_naming not in MIXTRAL_NAMINGS:
        raise ValueError(f"mixtral_naming must be one of {MIXTRAL_NAMINGS}")
    if arch != "mixtral" and given.get("mixtral_naming") is not None:
        raise ValueError("mixtral_naming applies to arch='mixtral' only")
    if o.quark_scheme not in QUARK_SCHEMES:
        raise ValueError(f"quark_scheme must be one of {QUARK_SCHEMES}")
    if not 0.0 <= o.zero_point_zero_frac <= 1.0 or (o.zero_point_zero_frac and o.sym):
        raise ValueError("zero_point_zero_frac needs 0..1 and an asymmetric int4 format")
    if fmt in MXFP4_FORMATS and o.group_size != 32:
        raise ValueError("MXFP4 blocks are 32 elements: group_size must be 32")
    group = o.group_size if fmt in INT4_FORMATS else 32
    ins = {"hidden": o.hidden, "intermediate": o.intermediate, "heads*head_dim": o.heads * o.head_dim}
    for what, n in ins.items():
        if n % group or n % 32:
            raise ValueError(f"{what}={n} must be a multiple of 32 and of the group size {group}")
    if (o.kv_heads * o.head_dim) % 8:
        raise ValueError("kv_heads*head_dim must be a multiple of 8 (packed output columns)")
    if o.heads % o.kv_heads:
        raise ValueError("heads must be a multiple of kv_heads")
    if not 1 <= o.top_k <= o.num_experts:
        raise ValueError("top_k must be in 1..num_experts")
    if o.multimodal and arch != "qwen3_5_moe":
        raise ValueError("multimodal applies to arch='qwen3_5_moe' only")
    if arch == "qwen3_5_moe" and (64 % group or o.shared_intermediate % group):
        raise ValueError(f"Qwen3.5's delta-net output (64 inputs) and shared expert need group sizes dividing them, not {group}")
    if o.shards < 1:
        raise ValueError("shards must be >= 1")
