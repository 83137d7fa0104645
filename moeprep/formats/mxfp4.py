"""What the MXFP4 source formats share (compressed-tensors, AMD Quark, OpenAI gpt-oss).

All three store E2M1 codes two per byte, low nibble = even element (already canonical), and one
E8M0 scale byte per 32 input elements.
"""
from __future__ import annotations

from ..lazy import torch

from ..canonical import MXFP4_GROUP
from ..errors import BadInputError
from ..io.checkpoint import Checkpoint
from .base import LinearRef, QuantParams, RawLinear, SourceFormat, check_bias, check_tensor, read_bias, require, shape_2d

MXFP4_PARAMS = QuantParams(bits=4, group_size=MXFP4_GROUP, symmetric=True, desc_act=False)


def mxfp4_raw(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> RawLinear:
    return RawLinear("mxfp4", "canonical", codes, scales, MXFP4_GROUP, bias=bias)


class PerModuleMXFP4(SourceFormat):
    """Per-module ``<weight> uint8 [N, K/2]`` + ``weight_scale uint8 [N, K/32]``."""

    kind = "mxfp4"
    params = MXFP4_PARAMS
    companion_suffixes = ("weight_scale",)
    scale_role = "weight_scale"

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        rows, packed = shape_2d(ckpt, parts[self.weight_suffix])  # [N, K/2]
        return rows, packed * 2

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        n, k = ref.out_features, ref.in_features
        weight, scale = require(ckpt, ref, self.weight_suffix), require(ckpt, ref, "weight_scale")
        if k % MXFP4_GROUP:
            raise BadInputError(f"in_features {k} is not a multiple of the MXFP4 block 32", path=str(ckpt.file_of(weight)), tensor=weight)
        check_tensor(ckpt, weight, ("U8",), (n, k // 2))
        check_tensor(ckpt, scale, ("U8", "F8_E8M0"), (n, k // MXFP4_GROUP))
        check_bias(ckpt, ref)

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        return [
            mxfp4_raw(ckpt.get_tensor(ref.parts[self.weight_suffix]), ckpt.get_tensor(ref.parts["weight_scale"]).view(torch.uint8), read_bias(ckpt, ref))
            for ref in refs
        ]


