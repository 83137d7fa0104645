"""What a conversion target provides: a pure encoder and decoder of one MoE layer.

A target fixes, for the stacked expert tensors of one MoE layer (``w13`` = ``[gate; up]`` rows,
``w2`` = down), how codes, scales and zero points are laid out. ``encode_layer`` takes the
layer's source linears from a :class:`SourceLayer` (which a conversion implements over its
reader) and writes each expert's codes straight from their source packing into the target layout
through the fused ``moeprep.ops.repack_into``; scales, zero points and biases are small and go
through the target's ``encode_*`` hooks. ``decode_layer`` is the exact inverse, back to the
canonical form in the source's own order, for ``verify``, ``dequant`` and the reference serving
path. Everything a target is to the rest of the code (its preference among the targets of a
kind, the codes its kernels decode, the layout its ``repack_into`` writes) is a class attribute.
"""
from __future__ import annotations

import base64
import json
from abc import ABC
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Protocol, Sequence

import numpy as np

from .. import ops
from ..canonical import QuantLinear, explicit_zeros, pack_codes, unpack_codes
from ..errors import BadInputError, TargetError
from ..formats import LinearFacts, QuantParams, RawLinear
from ..io.safetensors_writer import TensorSpec
from ..lazy import torch

PROJS = ("w13", "w2")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProjShape:
    """Logical (unpadded) shape of one stacked projection: E experts of [N, K], G groups."""

    experts: int
    rows: int
    cols: int
    groups: int

    @property
    def group_size(self) -> int:
        return self.cols // self.groups


@dataclass(frozen=True)
class LayerPlan:
    """Everything about a layer's output known before reading data."""

    index: int  # the decoder layer
    prefix: str  # the MoE block, e.g. model.layers.3.mlp
    shapes: dict[str, ProjShape]
    facts: dict[str, LinearFacts]  # per projection, from expert 0 (gate for w13, down for w2)
    kind: str
    desc_act: bool

    def tensor_name(self, role: str) -> str:
        return tensor_name(self.prefix, role)


def tensor_name(prefix: str, role: str) -> str:
    """The stored name of one of a layer's stacked expert tensors (vLLM's FusedMoE names)."""
    return f"{prefix}.experts.{role}"


class SourceLayer(Protocol):
    """One MoE layer of a source checkpoint, read on demand while a target encodes it."""

    def read(self, role: str) -> list[RawLinear]:
        """Projection ``role`` ("gate", "up" or "down") of every expert, in expert order; the codes
        stay in their source packing (memory-mapped), the small tensors are decoded."""

    def module(self, expert: int, role: str) -> str:
        """The source module name of one projection, for error messages."""

    def g_idx(self, role: str) -> list[Optional[torch.Tensor]]:
        """The group index of projection ``role`` of every expert (``None`` where it is ``k // G``),
        read without the weights."""


def b64_int32(t: torch.Tensor) -> str:
    return base64.b64encode(t.to(torch.int32).contiguous().numpy().tobytes()).decode()


def int32_from_b64(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """Header metadata back to int32 values, with numpy: reading headers needs no torch."""
    return np.frombuffer(base64.b64decode(text), dtype=np.int32).reshape(shape).copy()


def _new_block(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.uint8)


class Target(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]
    # Rank among the targets of a kind when none is asked for: the first that holds the source
    # exactly is the default (see targets.preference).
    preference: ClassVar[int]
    # repack_into layout and gate_up flag per projection
    weight_layout: ClassVar[dict[str, tuple[str, bool]]]
    # The stored codes the fused kernels decode ("int4_signed", "int4_unsigned", "e2m1"), or None
    # where no kernel reads this layout.
    kernel_codes: ClassVar[Optional[str]] = None
    keeps_g_idx: ClassVar[bool] = False

    # --- what the target accepts ----------------------------------------------------------------

    def problems(self, kind: str, params: QuantParams, plans: Sequence[LayerPlan]) -> list[str]:
        """Why this target cannot hold the source exactly (empty when it can). Headers only."""
        if kind not in self.kinds:
            return [f"{self.name} holds {'/'.join(self.kinds)} weights, the source is {kind}"]
        found = []
        for plan in plans:
            for proj in PROJS:
                for msg in self.shape_problems(proj, plan.shapes[proj], plan.facts[proj]):
                    found.append(f"layer {plan.index} {proj}: {msg}")
            if found:
                break
        return found

    def shape_problems(self, proj: str, shape: ProjShape, facts: LinearFacts) -> list[str]:
        return []

    @property
    def gate_up_interleaved(self) -> bool:
        """Whether w13 interleaves gate and up blocks (else gate rows, then up rows)."""
        return self.weight_layout["w13"][1]

    # --- planning -----------------------------------------------------------------------------

    def scale_stored_shape(self, proj: str, s: ProjShape) -> tuple[int, ...]:
        return (s.experts, s.rows, s.groups)

    def has_zeros(self, plan: LayerPlan, proj: str) -> bool:
        return plan.facts[proj].has_zeros

    def layout_params(self, role: str, proj: str, plan: LayerPlan) -> dict:
        return {"op": "none"}

    def plan_layer(self, plan: LayerPlan) -> list[tuple[TensorSpec, dict]]:
        """Output tensors of one layer, in write order, each with its metadata."""
        out = []
        for proj in PROJS:
            s, f = plan.shapes[proj], plan.facts[proj]
            entries = [
                (f"{proj}_weight", "uint8", (s.experts, s.rows, s.cols // 2), (s.experts, s.rows, s.cols // 2)),
                (f"{proj}_weight_scale", f.scale_dtype, self.scale_stored_shape(proj, s), (s.experts, s.rows, s.groups)),
            ]
            if self.has_zeros(plan, proj):
                entries.append((f"{proj}_weight_zero_point", "uint8", self.scale_stored_shape(proj, s), (s.experts, s.rows, s.groups)))
            if f.has_bias:
                entries.append((f"{proj}_bias", f.bias_dtype, (s.experts, s.rows), (s.experts, s.rows)))
            if plan.desc_act and self.keeps_g_idx:
                entries.append((f"{proj}_g_idx", "int32", (s.experts, s.cols), (s.experts, s.cols)))
            elif plan.desc_act and proj == "w13":
                entries.append(("w13_input_perm", "int32", (s.experts, s.cols), (s.experts, s.cols)))
            for role, dtype, stored, logical in entries:
                meta = {
                    "shuffle_kind": self.name,
                    "role": role,
                    "shape": list(logical),
                    "layout": self.layout_params(role, proj, plan),
                    "group_size": s.group_size,
                    "format_version": FORMAT_VERSION,
                }
                out.append((TensorSpec(plan.tensor_name(role), dtype, tuple(stored)), meta))
        return out

    # --- conversion ---------------------------------------------------------------------------

    def encode_scales(self, proj: str, s: torch.Tensor, shape: ProjShape) -> torch.Tensor:
        """Canonical stacked scales ``[E, N, G]`` -> stored form."""
        return s

    def decode_scales(self, proj: str, t: torch.Tensor, shape: ProjShape) -> torch.Tensor:
        return t

    def encode_zeros(self, proj: str, z: torch.Tensor, shape: ProjShape) -> torch.Tensor:
        return self.encode_scales(proj, z, shape)

    def decode_zeros(self, proj: str, t: torch.Tensor, shape: ProjShape) -> torch.Tensor:
        return self.decode_scales(proj, t, shape)

    def check_expert(self, proj: str, raw: RawLinear, where: str) -> None:
        """Data-level checks a target needs beyond the headers (e.g. symmetric zero points)."""

    def encode_layer(
        self, plan: LayerPlan, source: SourceLayer, alloc: Callable[[tuple[int, ...]], torch.Tensor] = _new_block
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The layer's stored tensors in plan order, as ``(role, piece)`` pairs.

        The stacked weights come one expert at a time (an expert's block is contiguous in every
        layout), in uint8 blocks from ``alloc`` (a consumer may recycle them), everything else
        whole. Each source tensor is read once, and memory holds one expert plus the layer's
        small scales, zero points and biases.
        """
        down_perms = self._down_perms(plan, source)
        for proj, members in (("w13", ("gate", "up")), ("w2", ("down",))):
            s = plan.shapes[proj]
            rows_each = s.rows // len(members)
            scales, zeros, bias, g_idx, in_perms = [], [], [], [], []
            batches = {m: source.read(m) for m in members}
            for e in range(s.experts):
                raws = {m: batches[m][e] for m in members}
                for m, raw in raws.items():
                    self.check_expert(proj, raw, source.module(e, m))
                rows, cols = self._perms(plan, proj, raws, lambda m: source.module(e, m), down_perms[e] if down_perms else None)
                block = alloc((1, s.rows, s.cols // 2))
                for i, m in enumerate(members):
                    self._repack(block, raws[m], proj, i * rows_each, rows, cols)
                yield f"{proj}_weight", block
                scales.append(torch.cat([_rows(raws[m].scales, rows) for m in members]))
                if self.has_zeros(plan, proj):
                    zeros.append(torch.cat([_rows(explicit_zeros(raws[m].zeros, raws[m].scales), rows) for m in members]))
                if plan.facts[proj].has_bias:
                    bias.append(torch.cat([_rows(raws[m].bias, rows) for m in members]))
                if plan.desc_act and self.keeps_g_idx:
                    g_idx.append(_g_idx_of(raws[members[0]], s))
                in_perms.append(cols)
            yield f"{proj}_weight_scale", self.encode_scales(proj, torch.stack(scales), s)
            if zeros:
                yield f"{proj}_weight_zero_point", self.encode_zeros(proj, torch.stack(zeros), s)
            if bias:
                yield f"{proj}_bias", torch.stack(bias)
            if g_idx:
                yield f"{proj}_g_idx", torch.stack(g_idx)
            if proj == "w13" and down_perms is not None:
                yield "w13_input_perm", torch.stack(in_perms).to(torch.int32)

    def _down_perms(self, plan: LayerPlan, source: SourceLayer) -> Optional[list[torch.Tensor]]:
        """Per expert, the stable sort of the down projection's inputs by group (desc_act), which
        becomes w2's column order and w13's row order; ``None`` when nothing is folded."""
        if not plan.desc_act or self.keeps_g_idx:
            return None
        return [_sorting_perm(g, plan.shapes["w2"]) for g in source.g_idx("down")]

    def extra_metadata(self, plan: LayerPlan, source: SourceLayer) -> dict[str, str]:
        """Metadata of ``w13_weight`` that depends on data: the folded w2 input order (desc_act).
        Reads only the small ``g_idx`` tensors, so a shard header is written before its layers."""
        perms = self._down_perms(plan, source)
        return {} if perms is None else {"row_perm": b64_int32(torch.stack(perms))}

    def _perms(self, plan: LayerPlan, proj: str, raws: dict[str, RawLinear], module: Callable[[str], str], down_perm):
        """(row gather, column gather) of one projection of one expert: the folded desc_act orders."""
        if down_perm is None:
            if not plan.desc_act:
                for role, raw in raws.items():
                    if raw.g_idx is not None:
                        raise TargetError("g_idx is not k // group_size although the config says desc_act is false", tensor=module(role))
            return None, None
        if proj == "w2":
            return None, down_perm
        gate, up = raws["gate"].g_idx, raws["up"].g_idx
        if not _same_g_idx(gate, up):
            raise TargetError(
                "gate and up have different g_idx, so their input permutation cannot be shared; use --target canonical",
                tensor=module("gate"),
            )
        return down_perm, _sorting_perm(gate, plan.shapes["w13"])

    def _repack(self, dst, raw: RawLinear, proj: str, row_offset: int, row_index, col_index) -> None:
        layout, gate_up = self.weight_layout[proj]
        ops.repack_into(
            dst,
            raw.packed,
            src_packing=raw.packing,
            layout=layout,
            expert=0,
            row_offset=row_offset,
            gate_up=gate_up,
            row_index=row_index,
            col_index=col_index,
        )

    # --- the inverse ----------------------------------------------------------------------------

    def decode_weight(self, proj: str, t: torch.Tensor) -> torch.Tensor:
        """Stored codes ``[E, N, K/2]`` -> canonical codes ``[E, N, K/2]``."""
        layout, gate_up = self.weight_layout[proj]
        return ops.decode_layout(t, layout, gate_up)

    def decode_layer(
        self,
        plan: LayerPlan,
        tensors: dict[str, torch.Tensor],
        row_perm: Optional[torch.Tensor] = None,
    ) -> list[dict[str, QuantLinear]]:
        """Stored tensors of one layer (by role, e.g. ``"w13_weight"``) -> per expert ``{"gate",
        "up", "down"}`` canonical linears, in the source's own row and column order."""
        get = tensors.get

        kind = plan.kind
        decoded = {}
        for proj in PROJS:
            s = plan.shapes[proj]
            codes = self.decode_weight(proj, get(f"{proj}_weight"))
            scales = self.decode_scales(proj, get(f"{proj}_weight_scale"), s)
            zp = get(f"{proj}_weight_zero_point")
            zeros = self.decode_zeros(proj, zp, s) if zp is not None else None
            g_idx = get(f"{proj}_g_idx") if self.keeps_g_idx else None
            decoded[proj] = (codes, scales, zeros, get(f"{proj}_bias"), g_idx)
        in_perm = get("w13_input_perm")
        experts = []
        inter = plan.shapes["w13"].rows // 2
        for e in range(plan.shapes["w13"].experts):
            linears = {}
            for proj, roles in (("w13", (("gate", 0), ("up", inter))), ("w2", (("down", 0),))):
                s = plan.shapes[proj]
                codes, scales, zeros, bias, g_idx = decoded[proj]
                n = inter if proj == "w13" else s.rows
                for role, r0 in roles:
                    rows = slice(r0, r0 + n)
                    ql = QuantLinear(
                        kind=kind,
                        codes=codes[e, rows],
                        scales=scales[e, rows],
                        group_size=s.group_size,
                        zeros=None if zeros is None else zeros[e, rows],
                        g_idx=None if g_idx is None else _nontrivial(g_idx[e], s),
                        bias=None if bias is None else bias[e, rows],
                    )
                    if row_perm is not None and proj == "w13":
                        ql = _unpermute_rows(ql, row_perm[e])
                    col_perm = in_perm[e] if (in_perm is not None and proj == "w13") else None
                    if row_perm is not None and proj == "w2":
                        col_perm = row_perm[e]
                    if col_perm is not None:
                        ql = _unpermute_cols(ql, col_perm, s)
                    linears[role] = ql
            experts.append(linears)
        return experts


# --- helpers -----------------------------------------------------------------------------------


def _rows(t: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    return t if perm is None else t[perm]


def _g_idx_of(raw: RawLinear, shape: ProjShape) -> torch.Tensor:
    if raw.g_idx is not None:
        return raw.g_idx.to(torch.int32)
    return (torch.arange(shape.cols) // shape.group_size).to(torch.int32)


def _same_g_idx(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def _sorting_perm(g_idx: Optional[torch.Tensor], shape: ProjShape) -> torch.Tensor:
    """Stable sort of input channels by group: column j of the result is source column perm[j]."""
    if g_idx is None:
        return torch.arange(shape.cols, dtype=torch.int64)
    return torch.sort(g_idx.to(torch.int64), stable=True).indices


def _nontrivial(g_idx: torch.Tensor, shape: ProjShape) -> Optional[torch.Tensor]:
    trivial = (torch.arange(shape.cols) // shape.group_size).to(g_idx.dtype)
    return None if torch.equal(g_idx, trivial) else g_idx.to(torch.int32)


def _unpermute_rows(ql: QuantLinear, perm: torch.Tensor) -> QuantLinear:
    """Stored row j came from source row perm[j]: put it back."""
    inv = torch.argsort(perm.to(torch.int64))
    return ql.with_(
        codes=ql.codes[inv],
        scales=ql.scales[inv],
        zeros=None if ql.zeros is None else ql.zeros[inv],
        bias=None if ql.bias is None else ql.bias[inv],
    )


def _unpermute_cols(ql: QuantLinear, perm: torch.Tensor, shape: ProjShape) -> QuantLinear:
    """Stored column j came from source column perm[j], and sits in group j // G."""
    perm = perm.to(torch.int64)
    if not torch.equal(torch.sort(perm).values, torch.arange(shape.cols)):
        raise BadInputError("w13_input_perm is not a permutation of the input channels")
    q = unpack_codes(ql.codes)
    restored = torch.empty_like(q)
    restored[:, perm] = q
    g_idx = torch.empty(shape.cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(shape.cols) // shape.group_size).to(torch.int32)
    return ql.with_(codes=pack_codes(restored), g_idx=_nontrivial(g_idx, shape))


def metadata_json(meta: dict) -> str:
    return json.dumps(meta, separators=(",", ":"), sort_keys=True)
