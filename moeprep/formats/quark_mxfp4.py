"""AMD Quark MXFP4 (``export_safetensors``, ``pack_method: reorder``): the packed codes live under the
plain ``weight`` key (uint8 ``[N, K/2]``) beside ``weight_scale`` (E8M0). ``reorder`` does not permute
fp4 nibbles."""
from __future__ import annotations

from ..io.checkpoint import Checkpoint
from .base import refuse
from .mxfp4 import PerModuleMXFP4
from .registry import register


@register
class QuarkMXFP4(PerModuleMXFP4):
    name = "quark-mxfp4"
    quant_methods = ("quark",)
    weight_suffix = "weight"

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        weight = (qcfg.get("global_quant_config") or {}).get("weight") or {}
        found = {k: weight.get(k) for k in ("dtype", "qscheme", "group_size", "scale_format")}
        if found != {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}:
            raise refuse(f"Quark weight scheme {found} is not supported (supported: MXFP4: fp4, per_group 32, e8m0 scales)")
        export = qcfg.get("export") or {}
        if export.get("weight_format", "real_quantized") != "real_quantized":
            raise refuse(f"Quark export weight_format {export.get('weight_format')!r} is not supported (need real_quantized)")
        if qcfg.get("layer_quant_config") or qcfg.get("layer_type_quant_config"):
            raise refuse("Quark per-layer quantization overrides are not supported (one global MXFP4 scheme only)")

    def is_weight(self, ckpt: Checkpoint, name: str) -> bool:
        # Quark keeps packed codes under the plain `weight` key: only uint8 weights with a scale.
        return (
            name.endswith(".weight")
            and ckpt.info(name).dtype == "U8"
            and f"{name[: -len('.weight')]}.weight_scale" in ckpt
        )
