"""OpenAI gpt-oss MXFP4: per layer, stacked experts with interleaved gate/up rows."""
from __future__ import annotations

from typing import Mapping

from ..errors import BadInputError
from ..io.checkpoint import Checkpoint
from .base import LinearRef, RawLinear, SourceFormat, check_tensor, require
from .mxfp4 import MXFP4_PARAMS, mxfp4_raw
from .registry import register


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
    # (module name, stored tensor, role); gate_up_proj interleaves its rows: gate even, up odd
    _PROJS = (("gate_proj", "gate_up_proj", "gate"), ("up_proj", "gate_up_proj", "up"), ("down_proj", "down_proj", "down"))
    _ROWS = {"gate": slice(0, None, 2), "up": slice(1, None, 2), "down": slice(None)}

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
                for proj, fused, role in self._PROJS:
                    parts = {s: f"{block}.{fused}_{s}" for s in ("blocks", "scales", "bias") if f"{block}.{fused}_{s}" in ckpt}
                    out_f, in_f = self.shape(ckpt, parts)
                    if role != "down":
                        out_f //= 2
                    refs.append(LinearRef(f"{block}.{e}.{proj}", parts, out_f, in_f, expert=e, role=role))
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
        rows = self._ROWS[ref.role]
        codes = ckpt.get_expert(blocks, ref.expert).reshape(n_all, kb * 16)[rows].contiguous()
        scale = ckpt.get_expert(ref.parts["scales"], ref.expert)[rows].contiguous()
        bias = ckpt.get_expert(ref.parts["bias"], ref.expert)[rows].contiguous() if "bias" in ref.parts else None
        return mxfp4_raw(codes, scale, bias)
