"""GPTQ (AutoGPTQ / GPTQModel): ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``.

``qweight`` int32 ``[K/8, N]`` packs 8 consecutive input rows per word; ``qzeros`` int32
``[K/G, N/8]`` packs 8 output columns per word; ``scales`` ``[K/G, N]``; ``g_idx`` int32 ``[K]``.
``checkpoint_format: gptq`` (v1) stores every zero point minus one. GPTQModel converts v1 to v2
by adding 0x11111111 to each whole int32 word (the carry crosses nibbles when a zero is 0), and
writes v1 by the same word-level subtraction, so reading with the word-level add is the exact
inverse of what it wrote.
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
    group_size_param,
    param,
    read_bias,
    refuse,
    require,
    require_4bit,
    shape_2d,
    stacked,
)
from .packing import unpack_nibbles
from .registry import register

SCALE_DTYPES = ("F16", "BF16", "F32")
_V1_ZERO_OFFSET = 0x11111111


@register
class GPTQ(SourceFormat):
    name = "gptq"
    kind = "int4"
    quant_methods = ("gptq",)
    weight_suffix = "qweight"
    companion_suffixes = ("qzeros", "scales", "g_idx")
    zeros_role = "qzeros"
    g_idx_role = "g_idx"

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        require_4bit(qcfg, "GPTQ")
        fmt = str(param(qcfg, "checkpoint_format", "format", default="gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise refuse(f"GPTQ checkpoint_format {fmt!r} is not supported (supported: gptq, gptq_v2)")
        self.v1 = fmt == "gptq"
        self.params = QuantParams(4, group_size_param(qcfg, "GPTQ", "group_size", default=-1), bool(param(qcfg, "sym", default=True)), bool(param(qcfg, "desc_act", default=False)))
        self.checkpoint_format = fmt

    def describe(self) -> dict:
        return {**super().describe(), "checkpoint_format": self.checkpoint_format}

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        words, cols = shape_2d(ckpt, parts["qweight"])  # [K/8, N]
        return cols, words * 8

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        n, k = ref.out_features, ref.in_features
        qweight, qzeros, scales = (require(ckpt, ref, r) for r in ("qweight", "qzeros", "scales"))
        groups = group_count(ckpt, qweight, k, self.params.group_size)
        if n % 8:
            raise BadInputError(f"out_features {n} is not a multiple of 8", path=str(ckpt.file_of(qweight)), tensor=qweight)
        check_tensor(ckpt, qweight, ("I32",), (k // 8, n))
        check_tensor(ckpt, qzeros, ("I32",), (groups, n // 8))
        check_tensor(ckpt, scales, SCALE_DTYPES, (groups, n))
        if "g_idx" in ref.parts:
            check_tensor(ckpt, ref.parts["g_idx"], ("I32", "I64"), (k,))
        elif self.params.desc_act:
            require(ckpt, ref, "g_idx")  # desc_act without its input order cannot be read
        check_bias(ckpt, ref)

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        k = refs[0].in_features
        groups = ckpt.info(refs[0].parts["scales"]).shape[0]
        g_idx = g_idx_of(ckpt, refs, "g_idx", k, self.params.group_size)
        words = stacked(ckpt, refs, "qzeros")
        if self.v1:
            words = words + _V1_ZERO_OFFSET  # int32 arithmetic wraps mod 2**32, as GPTQModel's does
        zeros = unpack_nibbles(words).transpose(1, 2).contiguous()  # [B, N, groups]
        scales = stacked(ckpt, refs, "scales").transpose(1, 2).contiguous()
        return [
            RawLinear(
                kind="int4",
                packing="gptq_int32",
                packed=ckpt.get_tensor(ref.parts["qweight"]),
                scales=scales[i],
                group_size=k // groups,
                zeros=zeros[i],
                g_idx=g_idx[i],
                bias=read_bias(ckpt, ref),
            )
            for i, ref in enumerate(refs)
        ]
