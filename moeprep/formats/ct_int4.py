"""compressed-tensors ``pack-quantized`` int4 (symmetric and asymmetric).

``weight_packed`` int32 ``[N, K/8]``, element j in nibble j % 8 of word j // 8, stored as q + 8
(q signed in [-8, 7]); so the stored nibble is already the unsigned code. ``weight_scale``
``[N, K/G]``; ``weight_shape`` int64 ``[2]``; asymmetric ``weight_zero_point`` int32
``[N/8, K/G]`` packed along the output dim, stored as z + 8; optional ``weight_g_idx``.
"""
from __future__ import annotations

from ..errors import BadInputError
from ..io.checkpoint import Checkpoint
from .base import (
    LinearRef,
    QuantParams,
    RawLinear,
    SourceFormat,
    check_bias,
    check_tensor,
    g_idx_of,
    group_count,
    read_bias,
    refuse,
    require,
    shape_2d,
    stacked,
)
from .compressed_tensors import weights_scheme
from .packing import unpack_nibbles
from .registry import register


class _CompressedTensorsFormat(SourceFormat):
    quant_methods = ("compressed-tensors",)
    weight_suffix = "weight_packed"

    @classmethod
    def scheme(cls, qcfg: dict) -> str:
        return weights_scheme(qcfg)[0]


@register
class CompressedTensorsInt4(_CompressedTensorsFormat):
    name = "compressed-tensors-int4"
    kind = "int4"
    schemes = ("pack-quantized",)
    companion_suffixes = ("weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
    scale_role = "weight_scale"
    zeros_role = "weight_zero_point"
    g_idx_role = "weight_g_idx"

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        _, w = weights_scheme(qcfg)
        if w.get("num_bits") != 4 or w.get("type") != "int":
            raise refuse(f"compressed-tensors pack-quantized with num_bits={w.get('num_bits')} type={w.get('type')!r} is not supported (supported: 4-bit int)")
        strategy = w.get("strategy")
        if strategy == "group":
            group_size = w.get("group_size")
            if not isinstance(group_size, int) or group_size <= 0:
                raise refuse(f"compressed-tensors group_size {group_size!r} is not supported")
        elif strategy == "channel":
            group_size = -1
        else:
            raise refuse(f"compressed-tensors strategy {strategy!r} is not supported (supported: group, channel)")
        actorder = w.get("actorder")
        self.params = QuantParams(4, group_size, bool(w.get("symmetric", True)), actorder in ("group", "weight"))

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        rows, words = shape_2d(ckpt, parts["weight_packed"])  # [N, K/8]
        return rows, words * 8

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        n, k = ref.out_features, ref.in_features
        packed, scale = require(ckpt, ref, "weight_packed"), require(ckpt, ref, "weight_scale")
        groups = group_count(ckpt, packed, k, self.params.group_size)
        check_tensor(ckpt, packed, ("I32",), (n, k // 8))
        check_tensor(ckpt, scale, ("F16", "BF16", "F32"), (n, groups))
        if "weight_shape" in ref.parts:
            check_tensor(ckpt, ref.parts["weight_shape"], ("I64", "I32"), (2,))
        if not self.params.symmetric:
            check_tensor(ckpt, require(ckpt, ref, "weight_zero_point"), ("I32",), ((n + 7) // 8, groups))
        if "weight_g_idx" in ref.parts:
            check_tensor(ckpt, ref.parts["weight_g_idx"], ("I32", "I64"), (k,))
        elif self.params.desc_act:
            require(ckpt, ref, "weight_g_idx")  # actorder "group" writes it
        check_bias(ckpt, ref)

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        n, k = refs[0].out_features, refs[0].in_features
        groups = ckpt.info(refs[0].parts["weight_scale"]).shape[1]
        for ref in refs:
            if "weight_shape" in ref.parts:
                shape_name = ref.parts["weight_shape"]
                stored = [int(v) for v in ckpt.get_tensor(shape_name)]
                if stored != [n, k]:
                    raise BadInputError(f"weight_shape {stored} disagrees with weight_packed (implies [{n}, {k}])", path=str(ckpt.file_of(shape_name)), tensor=shape_name)
        zeros = [None] * len(refs)
        if not self.params.symmetric:
            packed_zeros = stacked(ckpt, refs, "weight_zero_point").transpose(1, 2)  # [B, groups, N/8]
            zeros = unpack_nibbles(packed_zeros)[..., :n].transpose(1, 2).contiguous()  # [B, N, groups]
        g_idx = g_idx_of(ckpt, refs, "weight_g_idx", k, self.params.group_size)
        return [
            RawLinear(
                kind="int4",
                packing="ct_int32",
                packed=ckpt.get_tensor(ref.parts["weight_packed"]),
                scales=ckpt.get_tensor(ref.parts["weight_scale"]),
                group_size=k // groups,
                zeros=zeros[i],
                g_idx=g_idx[i],
                bias=read_bias(ckpt, ref),
            )
            for i, ref in enumerate(refs)
        ]
