"""Checkpoints written by ``moeprep convert``: stacked, preshuffled experts plus every other
tensor exactly as the source had it.

Experts are read back through their target's exact inverse, one whole layer at a time (scale
shuffles span experts), and presented under the source's own per-expert module names. Other
quantized linears are read by the source format's reader, kept in ``quantization_config``.
Every expert tensor's header entry and metadata are checked against what the target would
have written for the layer's shapes before anything is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .canonical import QuantLinear
from .errors import BadInputError, UnsupportedError
from .formats import LinearFacts, LinearRef, QuantParams, RawLinear, SourceFormat, detect
from .formats.registry import register
from .io.checkpoint import Checkpoint
from .io.names import layer_of
from .lazy import torch
from .targets import TARGETS, LayerPlan, ProjShape
from .targets.base import int32_from_b64

SUPPORTED_VERSIONS = (1,)
_ROLE_OF_PROJ = (("gate", "w13", 0), ("up", "w13", 1), ("down", "w2", None))


@dataclass
class _Layer:
    prefix: str
    index: int
    plan: LayerPlan
    tensors: dict[str, str]  # role -> tensor name
    row_order: Optional[np.ndarray]  # act-order checkpoints: the folded row order, checked from the header

    @property
    def row_perm(self) -> Optional[torch.Tensor]:
        return None if self.row_order is None else torch.from_numpy(self.row_order)


@register
class Converted(SourceFormat):
    name = "moeprep"
    quant_methods = ("moeprep",)

    def __init__(self, qcfg: dict):
        super().__init__(qcfg)
        version = qcfg.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedError(f"moeprep format_version {version!r} is not supported (supported: {SUPPORTED_VERSIONS})", path="config.json")
        target = qcfg.get("target")
        if target not in TARGETS or qcfg.get("shuffle_kind") != target:
            raise UnsupportedError(f"unknown moeprep target/shuffle_kind {target!r}/{qcfg.get('shuffle_kind')!r}", path="config.json")
        self.target = TARGETS[target]
        self.source = detect(qcfg.get("source_quantization_config"))
        self.kind = self.source.kind
        self.params: QuantParams = self.source.params
        names = qcfg.get("expert_names") or {}
        if set(names) != {"gate", "up", "down"}:
            raise UnsupportedError("moeprep quantization_config has no expert_names for gate, up and down", path="config.json")
        self.expert_names = names
        self.fused_shared = qcfg.get("fused_shared_experts")  # the shared expert module stacked last, if any
        routed = qcfg.get("num_experts")
        if self.fused_shared is not None and not (isinstance(self.fused_shared, str) and self.fused_shared.isidentifier()
                                                  and isinstance(routed, int) and not isinstance(routed, bool) and routed > 0):
            raise UnsupportedError("moeprep quantization_config: fused_shared_experts needs a module name and num_experts",
                                   path="config.json")
        self.routed = routed
        self._layers: dict[str, _Layer] = {}
        self._cache: tuple[str, list] | None = None

    def describe(self) -> dict:
        return {
            **self.source.describe(),
            "format": self.name,
            "target": self.target.name,
            "shuffle_kind": self.target.name,
            "source_format": self.source.name,
            **({"fused_shared_experts": self.fused_shared} if self.fused_shared is not None else {}),
        }

    # --- discovery and validation (headers only) -----------------------------------------------

    def linears(self, ckpt: Checkpoint) -> list[LinearRef]:
        refs = self.source.linears(ckpt)
        for name in ckpt.names():
            if not name.endswith(".experts.w13_weight"):
                continue
            layer = self.layer(ckpt, name[: -len(".experts.w13_weight")])
            shapes = layer.plan.shapes
            stored = shapes["w13"].experts
            if self.fused_shared is not None and stored != self.routed + 1:
                raise BadInputError(f"holds {stored} experts; with the shared expert fused it should hold {self.routed} + 1",
                                    path=str(ckpt.file_of(name)), tensor=name)
            for e in range(stored):
                for role, proj, half in _ROLE_OF_PROJ:
                    s = shapes[proj]
                    rows = s.rows // 2 if half is not None else s.rows
                    block = f"experts.{e}" if self.fused_shared is None or e < self.routed else self.fused_shared
                    module = f"{layer.prefix}.{block}.{self.expert_names[role]}"
                    refs.append(LinearRef(module, layer.tensors, rows, s.cols, expert=e, role=role))
        return refs

    def _layer(self, ckpt: Checkpoint, prefix: str) -> _Layer:
        tensors = {n[len(prefix) + len(".experts.") :]: n for n in ckpt.names() if n.startswith(prefix + ".experts.")}
        shapes, facts = {}, {}
        for proj in ("w13", "w2"):
            weight, scale = tensors.get(f"{proj}_weight"), tensors.get(f"{proj}_weight_scale")
            for role, name in ((f"{proj}_weight", weight), (f"{proj}_weight_scale", scale)):
                if name is None:
                    raise BadInputError("missing tensor", path=str(ckpt.root), tensor=f"{prefix}.experts.{role}")
            wmeta, smeta = self._meta(ckpt, weight), self._meta(ckpt, scale)
            e, n, kb = _shape3(ckpt, weight, wmeta)
            groups = _shape3(ckpt, scale, smeta)[2]
            shapes[proj] = ProjShape(e, n, kb * 2, groups)
            bias = tensors.get(f"{proj}_bias")
            facts[proj] = LinearFacts(
                scale_dtype=ckpt.info(scale).torch_dtype_name,
                has_zeros=f"{proj}_weight_zero_point" in tensors,
                has_g_idx="w13_input_perm" in tensors or f"{proj}_g_idx" in tensors,
                has_bias=bias is not None,
                bias_dtype=ckpt.info(bias).torch_dtype_name if bias else None,
            )
        desc_act = facts["w13"].has_g_idx
        index = layer_of(prefix + ".")
        plan = LayerPlan(index, prefix, shapes, facts, self.kind, desc_act)
        expected = {spec.name: (spec, meta) for spec, meta in self.target.plan_layer(plan)}
        for role, name in tensors.items():
            if name not in expected:
                raise BadInputError(f"unexpected tensor for target {self.target.name}", path=str(ckpt.file_of(name)), tensor=name)
        for name, (spec, meta) in expected.items():
            if name not in ckpt:
                raise BadInputError(f"missing tensor (target {self.target.name} writes it)", path=str(ckpt.root), tensor=name)
            info = ckpt.info(name)
            where = dict(path=str(ckpt.file_of(name)), tensor=name)
            if info.torch_dtype_name != spec.dtype or tuple(info.shape) != spec.shape:
                raise BadInputError(
                    f"stored as {info.dtype} {list(info.shape)} but its metadata implies {spec.dtype} {list(spec.shape)}",
                    **where,
                )
            stored = self._meta(ckpt, name)
            for key, value in meta.items():
                if stored.get(key) != value:
                    raise BadInputError(f"metadata {key} is {stored.get(key)!r}, expected {value!r} for {self.target.name}", **where)
        row_perm = None
        if desc_act and not self.target.keeps_g_idx:
            row_perm = self._row_perm(ckpt, tensors["w13_weight"], shapes)
        return _Layer(prefix, index, plan, tensors, row_perm)

    def _meta(self, ckpt: Checkpoint, name: str) -> dict:
        meta = ckpt.tensor_metadata(name)
        if meta is None:
            raise BadInputError("converted tensor has no moeprep metadata in its shard header", path=str(ckpt.file_of(name)), tensor=name)
        if meta.get("shuffle_kind") != self.target.name:
            raise BadInputError(
                f"shuffle_kind {meta.get('shuffle_kind')!r} disagrees with config.json target {self.target.name!r}",
                path=str(ckpt.file_of(name)),
                tensor=name,
            )
        return meta

    def _row_perm(self, ckpt: Checkpoint, name: str, shapes) -> np.ndarray:
        text = self._meta(ckpt, name).get("row_perm")
        e, inter = shapes["w13"].experts, shapes["w13"].rows // 2
        try:
            perm = int32_from_b64(text, (e, inter))
        except Exception:
            raise BadInputError("metadata row_perm is missing or not [E, I] int32", path=str(ckpt.file_of(name)), tensor=name) from None
        if not bool((np.sort(perm, axis=1) == np.arange(inter)).all()):
            raise BadInputError("metadata row_perm is not a permutation per expert", path=str(ckpt.file_of(name)), tensor=name)
        return perm

    # --- reading --------------------------------------------------------------------------------

    def layer(self, ckpt: Checkpoint, prefix: str) -> _Layer:
        """One MoE layer's tensors, plan and folded row order, checked against its metadata."""
        if prefix not in self._layers:
            self._layers[prefix] = self._layer(ckpt, prefix)
        return self._layers[prefix]

    def read_layer(self, ckpt: Checkpoint, prefix: str) -> list[dict[str, QuantLinear]]:
        """Every expert of one layer, canonical, in the source's order (cached: one layer)."""
        if self._cache is None or self._cache[0] != prefix:
            layer = self.layer(ckpt, prefix)
            tensors = {role: ckpt.get_tensor(name) for role, name in layer.tensors.items()}
            experts = self.target.decode_layer(layer.plan, tensors, layer.row_perm)
            self._cache = (prefix, experts)
        return self._cache[1]

    def read(self, ckpt: Checkpoint, ref: LinearRef) -> QuantLinear:
        if ref.expert is None:
            return self.source.read(ckpt, ref)
        return self.read_layer(ckpt, ref.parts["w13_weight"][: -len(".experts.w13_weight")])[ref.expert][ref.role]

    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        if all(ref.expert is None for ref in refs):
            return self.source.read_raw_batch(ckpt, refs)
        raise UnsupportedError("experts of a converted checkpoint have no source packing; convert the original checkpoint", path=str(ckpt.root))

    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        if ref.expert is None:
            self.source.check(ckpt, ref)  # experts were checked against their metadata in linears()

    def facts(self, ckpt: Checkpoint, ref: LinearRef) -> LinearFacts:
        return self.source.facts(ckpt, ref)

    def shape(self, ckpt: Checkpoint, parts) -> tuple[int, int]:
        return self.source.shape(ckpt, parts)


def _shape3(ckpt: Checkpoint, name: str, meta: dict) -> tuple[int, int, int]:
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise BadInputError(f"metadata shape {shape!r} is not [E, N, K]", path=str(ckpt.file_of(name)), tensor=name)
    return tuple(shape)
