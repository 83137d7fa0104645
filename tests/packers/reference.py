"""The dequantized reference of a checkpoint directory, read from its files with the oracle.

Works on any checkpoint of the documented formats (the real fixtures included), one module
at a time: the format is recognised from config.json's quantization_config, the modules from
their tensor suffixes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import oracle
from .st_io import Checkpoint
from .weights import is_linear_weight


def detect_format(config: dict) -> str:
    """The packers' format name for a config.json."""
    qc = config.get("quantization_config")
    if not qc:
        return "bf16"
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return {"pack-quantized": "ct_int4", "mxfp4-pack-quantized": "ct_mxfp4"}[qc["format"]]
    if method == "gptq":
        return "gptq"
    if method == "awq":
        return "awq"
    if method == "quark":
        return "quark_mxfp4"
    if method == "mxfp4":
        return "gptoss_mxfp4"
    raise ValueError(f"unknown quant_method {method!r}")


def _modules(ckpt: Checkpoint, marker: str) -> list[str]:
    return [k[: -len(marker) - 1] for k in ckpt.keys() if k.endswith("." + marker)]


def _per_expert(prefix: str, fused_gate_up: np.ndarray, down: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """Per-expert `[out, in]` views of fused gpt-oss experts given as `[E, out, in]`."""
    gate, up = oracle.split_gate_up(fused_gate_up)
    for e in range(down.shape[0]):
        yield f"{prefix}.{e}.gate_proj.weight", np.ascontiguousarray(gate[e])
        yield f"{prefix}.{e}.up_proj.weight", np.ascontiguousarray(up[e])
        yield f"{prefix}.{e}.down_proj.weight", np.ascontiguousarray(down[e])


def iter_reference(ckpt_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(`<module>.weight`, float32 `[out, in]`) for every quantized module; for an unquantized
    checkpoint, every module a quantizer would quantize (attention and expert projections)."""
    ckpt_dir = Path(ckpt_dir)
    config = json.loads((ckpt_dir / "config.json").read_text())
    fmt = detect_format(config)
    ckpt = Checkpoint(ckpt_dir)
    get = ckpt.get
    if fmt == "ct_int4":
        for m in _modules(ckpt, "weight_packed"):
            zp = get(f"{m}.weight_zero_point") if f"{m}.weight_zero_point" in ckpt.files else None
            yield f"{m}.weight", oracle.dequant_ct_int4(
                get(f"{m}.weight_packed"), get(f"{m}.weight_scale"), get(f"{m}.weight_shape"), zp)
    elif fmt == "ct_mxfp4":
        for m in _modules(ckpt, "weight_packed"):
            yield f"{m}.weight", oracle.dequant_mxfp4(get(f"{m}.weight_packed"), get(f"{m}.weight_scale"))
    elif fmt == "quark_mxfp4":
        for m in _modules(ckpt, "weight_scale"):
            yield f"{m}.weight", oracle.dequant_mxfp4(get(f"{m}.weight"), get(f"{m}.weight_scale"))
    elif fmt == "gptq":
        cf = config["quantization_config"].get("checkpoint_format", "gptq")
        for m in _modules(ckpt, "qweight"):
            yield f"{m}.weight", oracle.dequant_gptq(
                get(f"{m}.qweight"), get(f"{m}.qzeros"), get(f"{m}.scales"), get(f"{m}.g_idx"), cf)
    elif fmt == "awq":
        for m in _modules(ckpt, "qweight"):
            yield f"{m}.weight", oracle.dequant_awq(get(f"{m}.qweight"), get(f"{m}.qzeros"), get(f"{m}.scales"))
    elif fmt == "gptoss_mxfp4":
        for m in _modules(ckpt, "gate_up_proj_blocks"):
            gate_up = oracle.dequant_gptoss_experts(get(f"{m}.gate_up_proj_blocks"), get(f"{m}.gate_up_proj_scales"))
            down = oracle.dequant_gptoss_experts(get(f"{m}.down_proj_blocks"), get(f"{m}.down_proj_scales"))
            yield from _per_expert(m, gate_up, down)
    elif config.get("model_type") == "gpt_oss":
        for m in _modules(ckpt, "gate_up_proj"):
            # transformers' fused bf16 experts are [E, in, out]
            gate_up = np.swapaxes(oracle.widen(get(f"{m}.gate_up_proj")), 1, 2)
            down = np.swapaxes(oracle.widen(get(f"{m}.down_proj")), 1, 2)
            yield from _per_expert(m, gate_up, down)
    else:
        for name in ckpt.keys():
            if is_linear_weight(name):
                yield name, oracle.widen(get(name))


def reference_metadata() -> dict[str, str]:
    info = {"layout": "[out_features, in_features] float32",
            "producer": "tests/packers oracle ((q - z) * s in fp32, numpy)"}
    return {"reference_info": json.dumps(info, sort_keys=True)}
