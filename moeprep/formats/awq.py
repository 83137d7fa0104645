"""AWQ GEMM (AutoAWQ layout, also written by GPTQModel): ``qweight`` / ``qzeros`` / ``scales``.

``qweight`` int32 ``[K, N/8]`` packs 8 output columns per word in AWQ's interleaved nibble order;
``qzeros`` int32 ``[K/G, N/8]`` the same way, holding the plain zero point; ``scales`` ``[K/G, N]``.
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
    group_count,
    group_size_param,
    param,
    read_bias,
    refuse,
    require,
    require_4bit,
    shape_2d,
    stacked,
)
from .packing import awq_natural_words, unpack_nibbles
from .registry import register


@register
class AWQ(SourceFormat):
    name = "awq"
    kind = "int4"
    quant_methods = ("awq",)
    weight_suffix = "qweight"
    companion_suffixes = ("qzeros", "scales")
    zeros_role = "qzeros"

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        require_4bit(qcfg, "AWQ")
        version = str(param(qcfg, "version", "format", "checkpoint_format", default="gemm")).lower()
        if version != "gemm":
            raise refuse(f"AWQ version {version!r} is not supported (supported: gemm)")
        if not param(qcfg, "zero_point", default=True):
            raise refuse("AWQ with zero_point=false is not supported (supported: zero_point=true)")
        self.params = QuantParams(4, group_size_param(qcfg, "AWQ", "group_size", "q_group_size", default=128), False, False)

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        rows, words = shape_2d(ckpt, parts["qweight"])  # [K, N/8]
        return words * 8, rows

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        n, k = ref.out_features, ref.in_features
        qweight, qzeros, scales = (require(ckpt, ref, r) for r in ("qweight", "qzeros", "scales"))
        groups = group_count(ckpt, qweight, k, self.params.group_size)
        if k % 2:
            raise BadInputError(f"in_features {k} is odd", path=str(ckpt.file_of(qweight)), tensor=qweight)
        check_tensor(ckpt, qweight, ("I32",), (k, n // 8))
        check_tensor(ckpt, qzeros, ("I32",), (groups, n // 8))
        check_tensor(ckpt, scales, ("F16", "BF16", "F32"), (groups, n))
        check_bias(ckpt, ref)

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        groups = ckpt.info(refs[0].parts["scales"]).shape[0]
        zeros = unpack_nibbles(awq_natural_words(stacked(ckpt, refs, "qzeros"))).transpose(1, 2).contiguous()  # [B, N, groups]
        scales = stacked(ckpt, refs, "scales").transpose(1, 2).contiguous()
        return [
            RawLinear(
                kind="int4",
                packing="awq_int32",
                packed=ckpt.get_tensor(ref.parts["qweight"]),
                scales=scales[i],
                group_size=ref.in_features // groups,
                zeros=zeros[i],
                bias=read_bias(ckpt, ref),
            )
            for i, ref in enumerate(refs)
        ]
