"""compressed-tensors ``mxfp4-pack-quantized``: ``weight_packed`` uint8 ``[N, K/2]`` + ``weight_scale``
uint8 ``[N, K/32]`` (E8M0), no ``weight_shape``."""
from __future__ import annotations

from ..canonical import MXFP4_GROUP
from .base import refuse
from .compressed_tensors import weights_scheme
from .ct_int4 import _CompressedTensorsFormat
from .mxfp4 import PerModuleMXFP4
from .registry import register


@register
class CompressedTensorsMXFP4(_CompressedTensorsFormat, PerModuleMXFP4):
    name = "compressed-tensors-mxfp4"
    schemes = ("mxfp4-pack-quantized",)

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        _, w = weights_scheme(qcfg)
        if w.get("num_bits") != 4 or w.get("type") != "float" or w.get("group_size") != MXFP4_GROUP:
            raise refuse(
                f"compressed-tensors mxfp4 with num_bits={w.get('num_bits')} type={w.get('type')!r} "
                f"group_size={w.get('group_size')} is not supported (supported: 4-bit float, group 32)"
            )
