"""MXFP4 sources: compressed-tensors ``mxfp4-pack-quantized``, AMD Quark and OpenAI gpt-oss.

All three store E2M1 codes two per byte, low nibble = even element (already canonical), and one
E8M0 scale byte per 32 input elements.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..canonical import MXFP4_GROUP
from ..errors import BadInputError
from ..io.checkpoint import Checkpoint
from .base import LinearRef, QuantParams, RawLinear, SourceFormat, check_bias, check_tensor, read_bias, refuse, require, shape_2d
from .compressed_tensors import weights_scheme
from .ct_int4 import _CompressedTensorsFormat
from .registry import register

MXFP4_PARAMS = QuantParams(bits=4, group_size=MXFP4_GROUP, symmetric=True, desc_act=False)


def _raw(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None) -> RawLinear:
    return RawLinear("mxfp4", "canonical", codes, scales, MXFP4_GROUP, bias=bias)


class _PerModuleMXFP4(SourceFormat):
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
            _raw(ckpt.get_tensor(ref.parts[self.weight_suffix]), ckpt.get_tensor(ref.parts["weight_scale"]).view(torch.uint8), read_bias(ckpt, ref))
            for ref in refs
        ]


@register
class CompressedTensorsMXFP4(_CompressedTensorsFormat, _PerModuleMXFP4):
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


@register
class QuarkMXFP4(_PerModuleMXFP4):
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


@register
class GptOssMXFP4(SourceFormat):
    """OpenAI gpt-oss: per layer, stacked experts ``<block>.experts.{gate_up,down}_proj_{blocks,scales,bias}``.

    ``*_blocks`` uint8 ``[E, N, K/32, 16]``, ``*_scales`` uint8 ``[E, N, K/32]``; gate_up rows are
    interleaved (gate = even rows, up = odd rows), its bias too.
    """

    name = "gpt-oss-mxfp4"
    kind = "mxfp4"
    quant_methods = ("mxfp4",)
    params = MXFP4_PARAMS
    _PROJS = (("gate_proj", "gate_up_proj", "even"), ("up_proj", "gate_up_proj", "odd"), ("down_proj", "down_proj", None))

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)

    def linears(self, ckpt: Checkpoint) -> list[LinearRef]:
        refs = []
        for name in ckpt.names():
            if not name.endswith(".experts.gate_up_proj_blocks"):
                continue
            block = name[: -len(".gate_up_proj_blocks")]
            for needed in ("gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
                if f"{block}.{needed}" not in ckpt:
                    raise BadInputError("missing tensor", path=str(ckpt.root), tensor=f"{block}.{needed}")
            n_experts = self._check_stack(ckpt, block)
            for e in range(n_experts):
                for proj, fused, rows in self._PROJS:
                    parts = {s: f"{block}.{fused}_{s}" for s in ("blocks", "scales", "bias") if f"{block}.{fused}_{s}" in ckpt}
                    out_f, in_f = self.shape(ckpt, parts)
                    if rows:
                        out_f //= 2
                    refs.append(LinearRef(f"{block}.{e}.{proj}", parts, out_f, in_f, expert=e, rows=rows))
        return refs

    def _check_stack(self, ckpt: Checkpoint, block: str) -> int:
        gu = ckpt.info(f"{block}.gate_up_proj_blocks")
        dn = ckpt.info(f"{block}.down_proj_blocks")
        for info in (gu, dn):
            if len(info.shape) != 4 or info.shape[3] != 16 or info.dtype != "U8":
                raise BadInputError(f"expected uint8 blocks [E, N, K/32, 16], got {info.dtype} {list(info.shape)}", path=str(ckpt.file_of(info.name)), tensor=info.name)
        if gu.shape[0] != dn.shape[0] or gu.shape[1] % 2:
            raise BadInputError(f"gate_up {list(gu.shape)} and down {list(dn.shape)} blocks disagree", path=str(ckpt.file_of(gu.name)), tensor=gu.name)
        return gu.shape[0]

    def shape(self, ckpt: Checkpoint, parts: Mapping[str, str]) -> tuple[int, int]:
        info = ckpt.info(parts["blocks"])
        return info.shape[1], info.shape[2] * 32

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        blocks, scales = require(ckpt, ref, "blocks"), require(ckpt, ref, "scales")
        e_count, n_all, kb, _ = ckpt.info(blocks).shape
        check_tensor(ckpt, scales, ("U8",), (e_count, n_all, kb))
        if "bias" in ref.parts:
            check_tensor(ckpt, ref.parts["bias"], ("BF16", "F16", "F32"), (e_count, n_all))

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        return [self._read_one(ckpt, ref) for ref in refs]

    def _read_one(self, ckpt: Checkpoint, ref: LinearRef) -> RawLinear:
        blocks = ref.parts["blocks"]
        _, n_all, kb, _ = ckpt.info(blocks).shape
        rows = slice(None) if ref.rows is None else slice(0 if ref.rows == "even" else 1, None, 2)
        codes = ckpt.get_expert(blocks, ref.expert).reshape(n_all, kb * 16)[rows].contiguous()
        scale = ckpt.get_expert(ref.parts["scales"], ref.expert)[rows].contiguous()
        bias = ckpt.get_expert(ref.parts["bias"], ref.expert)[rows].contiguous() if "bias" in ref.parts else None
        return _raw(codes, scale, bias)
