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
    param,
    read_bias,
    refuse,
    require,
)
from .packing import awq_natural_order, unpack_nibbles
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
        bits = param(qcfg, "bits", "w_bit")
        if bits != 4:
            raise refuse(f"AWQ with bits={bits} is not supported (moeprep reads 4-bit weights only)")
        version = str(param(qcfg, "version", "format", "checkpoint_format", default="gemm")).lower()
        if version != "gemm":
            raise refuse(f"AWQ version {version!r} is not supported (supported: gemm)")
        if not param(qcfg, "zero_point", default=True):
            raise refuse("AWQ with zero_point=false is not supported (supported: zero_point=true)")
        group_size = param(qcfg, "group_size", "q_group_size", default=128)
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise refuse(f"AWQ group_size {group_size!r} is not supported")
        self.params = QuantParams(4, group_size, False, False)

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        qweight = ckpt.info(parts["qweight"])
        if len(qweight.shape) != 2:
            raise BadInputError(f"qweight must be 2-D, got shape {list(qweight.shape)}", path=str(ckpt.file_of(parts["qweight"])), tensor=parts["qweight"])
        return qweight.shape[1] * 8, qweight.shape[0]

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

    def read_raw(self, ckpt: Checkpoint, ref: LinearRef) -> RawLinear:
        groups = ckpt.info(ref.parts["scales"]).shape[0]
        zeros = awq_natural_order(unpack_nibbles(ckpt.get_tensor(ref.parts["qzeros"])))  # [groups, N]
        return RawLinear(
            kind="int4",
            packing="awq_int32",
            packed=ckpt.get_tensor(ref.parts["qweight"]),
            scales=ckpt.get_tensor(ref.parts["scales"]).t().contiguous(),
            group_size=ref.in_features // groups,
            zeros=zeros.t().contiguous(),
            bias=read_bias(ckpt, ref),
        )
