"""The five target layouts (``shuffle_kind`` values), specified in docs/layouts.md."""
from __future__ import annotations

from typing import Sequence

from .. import ops
from ..canonical import SYMMETRIC_ZERO
from ..formats import LinearFacts, QuantParams, RawLinear
from ..errors import TargetError
from .base import LayerPlan, ProjShape, Target
from .registry import register


@register
class Canonical(Target):
    name = "canonical"
    summary = "codes [E,N,K/2] low nibble = even k, scales/zeros [E,N,K/G] as stored; every source"
    kinds = ("int4", "mxfp4")
    preference = 99
    weight_layout = {"w13": ("canonical", False), "w2": ("canonical", False)}
    keeps_g_idx = True

    def shape_problems(self, proj, shape, facts):
        return [] if shape.cols % 2 == 0 else [f"in_features {shape.cols} is odd"]


def divisibility(proj: str, shape: ProjShape, w13_rows: int, w2_rows: int, cols: int) -> list[str]:
    """A layout's tile rules: the rows of each projection (gate and up separately for w13) and
    the input features must be multiples of the tile."""
    found = []
    rows, unit = (shape.rows // 2, w13_rows) if proj == "w13" else (shape.rows, w2_rows)
    if rows % unit:
        found.append(f"{rows} output rows is not a multiple of {unit}")
    if shape.cols % cols:
        found.append(f"in_features {shape.cols} is not a multiple of {cols}")
    return found


class _W4A16(Target):
    """Int4 codes as int8 values, (16,16)-shuffled, packed 8 values per 4 bytes; scales [E, G, N]
    with pairs of groups interleaved per row."""

    kinds = ("int4",)

    def shape_problems(self, proj: str, shape: ProjShape, facts: LinearFacts) -> list[str]:
        found = divisibility(proj, shape, 16, 16, 32)
        if shape.groups % 2:
            found.append(f"{shape.groups} groups along K is odd (the scale layout pairs groups)")
        return found

    def scale_stored_shape(self, proj, s):
        return (s.experts, s.groups, s.rows)

    def layout_params(self, role, proj, plan):
        if role.endswith("_weight"):
            return {"op": "preshuffle_int4", "layout": [16, 16], "signed": self.signed}
        if role.endswith(("_weight_scale", "_weight_zero_point")):
            return {"op": "shuffle_scale_w4a16"}
        return {"op": "none"}

    def encode_scales(self, proj, s, shape):
        return ops.shuffle_scale_w4a16(s)

    def decode_scales(self, proj, t, shape):
        return ops.unshuffle_scale_w4a16(t)


@register
class W4A16Preshuffle(_W4A16):
    name = "w4a16_preshuffle"
    summary = "signed int4 (z = 8), bf16 scales, group 32: aiter a16wi4 MoE"
    preference = 0
    signed = True
    weight_layout = {"w13": ("w4a16_signed", False), "w2": ("w4a16_signed", False)}
    kernel_codes = "int4_signed"

    def problems(self, kind: str, params: QuantParams, plans: Sequence[LayerPlan]) -> list[str]:
        found = super().problems(kind, params, plans)
        if kind == "int4":
            if not params.symmetric:
                found.insert(0, "the source has asymmetric zero points")
            if params.group_size != 32:
                found.insert(0, f"group size {params.group_size}, this target needs 32")
        return found

    def shape_problems(self, proj, shape, facts):
        found = super().shape_problems(proj, shape, facts)
        if facts.scale_dtype != "bfloat16":
            found.append(f"scales are {facts.scale_dtype}, this target holds bfloat16 only")
        return found

    def has_zeros(self, plan, proj):
        return False

    def check_expert(self, proj: str, raw: RawLinear, where: str) -> None:
        if raw.zeros is not None and bool((raw.zeros != SYMMETRIC_ZERO).any()):
            raise TargetError(
                "zero points other than 8 cannot be held by w4a16_preshuffle; use --target w4a16_preshuffle_zp",
                tensor=where,
            )


@register
class W4A16PreshuffleZP(_W4A16):
    name = "w4a16_preshuffle_zp"
    summary = "unsigned int4 + zero points, any group size: moeprep's own kernels (AWQ, GPTQ, asym)"
    preference = 1
    signed = False
    weight_layout = {"w13": ("w4a16_unsigned", False), "w2": ("w4a16_unsigned", False)}
    kernel_codes = "int4_unsigned"

    def has_zeros(self, plan, proj):
        return True


class _MXFP4(Target):
    kinds = ("mxfp4",)
    kernel_codes = "e2m1"


@register
class MXFP4MoE(_MXFP4):
    name = "mxfp4_moe"
    summary = "gate/up-interleaved shuffle of weights and E8M0 scales: aiter a16w4 MoE (gfx950), ATOM"
    preference = 0
    weight_layout = {"w13": ("guinterleave", True), "w2": ("guinterleave", False)}

    def shape_problems(self, proj, shape, facts):
        # 64-byte K blocks of the interleaved shuffle; the scale shuffle pairs 16-row blocks
        return divisibility(proj, shape, 16, 32, 128)

    def scale_stored_shape(self, proj, s):
        return (s.experts, s.rows, -(-s.groups // 8) * 8)

    def layout_params(self, role, proj, plan):
        gate_up = proj == "w13"
        if role.endswith("_weight"):
            return {"op": "shuffle_weight", "layout": [16, 16], "is_guinterleave": True, "gate_up": gate_up}
        if role.endswith("_weight_scale"):
            return {"op": "shuffle_scale", "is_guinterleave": True, "gate_up": gate_up, "pad": 127}
        return {"op": "none"}

    def encode_scales(self, proj, s, shape):
        flat = s.reshape(shape.experts * shape.rows, shape.groups)
        out = ops.shuffle_scale(flat, experts_cnt=shape.experts, is_guinterleave=True, gate_up=proj == "w13")
        return out.reshape(self.scale_stored_shape(proj, shape))

    def decode_scales(self, proj, t, shape):
        flat = t.reshape(shape.experts * shape.rows, -1)
        s = ops.unshuffle_scale(
            flat, (shape.experts * shape.rows, shape.groups), experts_cnt=shape.experts, is_guinterleave=True, gate_up=proj == "w13"
        )
        return s.reshape(shape.experts, shape.rows, shape.groups)


@register
class MXFP4Preshuffle(_MXFP4):
    name = "mxfp4_preshuffle"
    summary = "(16,16) shuffle_weight + e8m0_shuffle, gate/up separated: aiter CK MXFP4 MoE"
    preference = 1
    weight_layout = {"w13": ("shuffle", False), "w2": ("shuffle", False)}

    def shape_problems(self, proj, shape, facts):
        return divisibility(proj, shape, 16, 16, 64)

    def scale_stored_shape(self, proj, s):
        return (-(-(s.experts * s.rows) // 256) * 256, -(-s.groups // 8) * 8)

    def layout_params(self, role, proj, plan):
        if role.endswith("_weight"):
            return {"op": "shuffle_weight", "layout": [16, 16]}
        if role.endswith("_weight_scale"):
            return {"op": "e8m0_shuffle", "pad": 127}
        return {"op": "none"}

    def encode_scales(self, proj, s, shape):
        return ops.shuffle_scale(s.reshape(shape.experts * shape.rows, shape.groups))

    def decode_scales(self, proj, t, shape):
        s = ops.unshuffle_scale(t, (shape.experts * shape.rows, shape.groups))
        return s.reshape(shape.experts, shape.rows, shape.groups)
