"""A checkpoint's quantized linears, grouped into MoE layers of experts, other quantized linears
and plain tensors: the map every command works from (built from headers alone), and each MoE
layer's plan and on-demand reading for a target to encode."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

from .lazy import torch

from . import converted  # noqa: F401  (importing registers the reader of converted checkpoints)
from .canonical import QuantLinear, invalid_scales
from .arch import EXPERT_MODULE, PROJ_ROLE, ROLES, Architecture, detect_architecture, unknown_architecture
from .errors import BadInputError, MoeprepError, UnsupportedError
from .formats import LinearFacts, LinearRef, RawLinear, SourceFormat, detect
from .formats.base import g_idx_of
from .io.checkpoint import Checkpoint
from .io.names import natural_key
from .targets import LayerPlan, ProjShape


@dataclass
class MoELayer:
    index: int
    prefix: str  # the MoE block, e.g. model.layers.3.mlp
    experts: list[dict[str, LinearRef]]  # per expert: role ("gate", "up", "down") -> linear

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def hidden_size(self) -> int:
        return self.experts[0]["gate"].in_features

    @property
    def intermediate_size(self) -> int:
        return self.experts[0]["gate"].out_features

    def refs(self):
        for expert in self.experts:
            for role in ROLES:
                yield expert[role]


@dataclass
class ModelMap:
    ckpt: Checkpoint
    arch: Architecture
    fmt: SourceFormat
    moe_layers: list[MoELayer]
    other_linears: list[LinearRef]
    plain: list[str] = field(default_factory=list)
    allow_invalid_scales: bool = False  # carry NaN, infinite, zero or negative scales through as they are
    fused_shared: bool = False  # each layer's shared expert appended to its experts (``fuse_shared_experts``)

    @property
    def num_experts(self) -> int:
        if not self.arch.known:  # only dequant maps such a family: its experts are what the tensors hold
            return self.moe_layers[0].num_experts if self.moe_layers else 0
        return self.arch.num_experts(self.ckpt.config)

    def read(self, ref: LinearRef) -> QuantLinear:
        ql = self.fmt.read(self.ckpt, ref)
        self._check_scales(ref, ql.scales)
        return ql

    def read_raw_batch(self, refs: list[LinearRef]) -> list[RawLinear]:
        raws = self.fmt.read_raw_batch(self.ckpt, refs)
        for ref, raw in zip(refs, raws):
            self._check_scales(ref, raw.scales)
        return raws

    def check_other_scales(self) -> None:
        """The scales of the quantized linears that a conversion copies without reading them."""
        if not self.allow_invalid_scales:
            for ref in self.other_linears:
                self.read_raw_batch([ref])

    def _check_scales(self, ref: LinearRef, scales) -> None:
        """Scales are checked where they are read: what no quantizer writes is refused, unless
        asked to carry it through."""
        if self.allow_invalid_scales:
            return
        count, first = invalid_scales(self.fmt.kind, scales)
        if count:
            name = ref.parts.get(self.fmt.scale_role, ref.module)
            what = "E8M0 0xFF (NaN)" if self.fmt.kind == "mxfp4" else f"NaN, infinite, zero or negative (first {first:g})"
            raise BadInputError(f"{count} scale(s) of {ref.module} are {what}; --allow-invalid-scales carries them through",
                                path=str(self.ckpt.file_of(name)) if name in self.ckpt else str(self.ckpt.root),
                                tensor=name)

    def facts(self, ref: LinearRef) -> LinearFacts:
        return self.fmt.facts(self.ckpt, ref)

    def linears(self) -> list[LinearRef]:
        """Every quantized linear, experts first within each layer, in natural name order."""
        refs = [r for layer in self.moe_layers for r in layer.refs()] + self.other_linears
        return sorted(refs, key=lambda r: natural_key(r.module))

    def expert_tensors(self) -> list[str]:
        return sorted({t for layer in self.moe_layers for r in layer.refs() for t in r.parts.values()}, key=natural_key)

    def other_linear_tensors(self) -> list[str]:
        return sorted({t for r in self.other_linears for t in r.parts.values()}, key=natural_key)

    def shared_expert(self, layer: MoELayer) -> Optional[dict[str, LinearRef]]:
        """The quantized shared expert of a layer (role -> linear), where its family has one."""
        if not self.arch.shared_experts:
            return None
        module = f"{layer.prefix}.{self.arch.shared_experts}"
        found = {}
        for ref in self.other_linears:
            block, _, proj = ref.module.rpartition(".")
            if block == module and proj in PROJ_ROLE:
                found[PROJ_ROLE[proj]] = ref
        return found or None

    def fuse_shared_experts(self) -> "ModelMap":
        """The map with each layer's shared expert appended to its routed experts as one more
        expert (aiter's fused-shared-expert convention), so a target stacks and encodes it with
        them. Refused, naming the layer, where a shared expert is missing, unquantized, or not
        quantized and shaped like the routed experts."""
        where = dict(path=str(self.ckpt.root))
        if not self.arch.shared_experts:
            raise UnsupportedError(f"--fuse-shared-experts: {self.arch.name} has no shared experts", **where)
        layers, taken = [], set()
        for layer in self.moe_layers:
            module = f"{layer.prefix}.{self.arch.shared_experts}"
            shared = self.shared_expert(layer)
            if shared is None or set(shared) != set(ROLES):
                raise UnsupportedError(f"--fuse-shared-experts: layer {layer.index} has no shared expert quantized like its "
                                       "experts (it is stored unquantized, or missing)", **where, tensor=module)
            for role in ROLES:
                a, b = layer.experts[0][role], shared[role]
                if self._stored_as(a) != self._stored_as(b):
                    raise UnsupportedError(
                        f"--fuse-shared-experts: the shared {role} projection is stored as {self._stored_as(b)}, the "
                        f"experts' as {self._stored_as(a)}", **where, tensor=b.module)
            layers.append(MoELayer(layer.index, layer.prefix, [*layer.experts, shared]))
            taken |= {ref.module for ref in shared.values()}
        others = [ref for ref in self.other_linears if ref.module not in taken]
        return replace(self, moe_layers=layers, other_linears=others, fused_shared=True)

    def _stored_as(self, ref: LinearRef) -> str:
        """A linear's shape and each stored part's dtype and shape (group size and packing with them)."""
        parts = ", ".join(f"{role} {self.ckpt.info(name).dtype} {list(self.ckpt.info(name).shape)}"
                          for role, name in sorted(ref.parts.items()))
        return f"[{ref.out_features}, {ref.in_features}] ({parts})"

    def plan(self, layer: MoELayer) -> LayerPlan:
        """The layer's stacked shapes and header facts, as a target plans its output."""
        e0 = layer.experts[0]
        shapes, facts = {}, {}
        for proj, ref in (("w13", e0["gate"]), ("w2", e0["down"])):
            raw_group = self.fmt.params.group_size
            group = ref.in_features if raw_group == -1 else raw_group
            rows = ref.out_features * (2 if proj == "w13" else 1)
            shapes[proj] = ProjShape(layer.num_experts, rows, ref.in_features, ref.in_features // group)
            facts[proj] = self.facts(ref)
        desc_act = self.fmt.params.desc_act and facts["w13"].has_g_idx
        return LayerPlan(layer.index, layer.prefix, shapes, facts, self.fmt.kind, desc_act)

    def plans(self) -> list[LayerPlan]:
        return [self.plan(layer) for layer in self.moe_layers]

    def source_layer(self, layer: MoELayer) -> "ModelLayer":
        return ModelLayer(self, layer)

    def target_problems(self, target) -> list[str]:
        """Why ``target`` cannot hold this checkpoint exactly (empty when it can)."""
        return target.problems(self.fmt.kind, self.fmt.params, self.plans())


@dataclass
class ModelLayer:
    """One MoE layer of a mapped checkpoint, read through its format's reader (a
    :class:`moeprep.targets.SourceLayer`)."""

    model: ModelMap
    layer: MoELayer

    def read(self, role: str) -> list[RawLinear]:
        return self.model.read_raw_batch([expert[role] for expert in self.layer.experts])

    def module(self, expert: int, role: str) -> str:
        return self.layer.experts[expert][role].module

    def g_idx(self, role: str) -> list[Optional[torch.Tensor]]:
        refs = [expert[role] for expert in self.layer.experts]
        fmt = self.model.fmt
        if fmt.g_idx_role is None:
            return [None] * len(refs)
        return g_idx_of(self.model.ckpt, refs, fmt.g_idx_role, refs[0].in_features, fmt.params.group_size)


def build_model_map(ckpt: Checkpoint, fmt: SourceFormat | None = None, any_architecture: bool = False) -> ModelMap:
    """The map of a checkpoint. ``any_architecture``: a family moeprep does not know is mapped too
    (for ``dequant``, which needs the format alone), its experts counted from the tensors."""
    try:
        fmt = fmt or detect(ckpt.quantization_config)
        try:
            arch = detect_architecture(ckpt.config)
        except UnsupportedError:
            if not any_architecture:
                raise
            arch = None
        n_experts = arch.num_experts(ckpt.config) if arch is not None else None
    except MoeprepError as e:
        if e.path != "config.json":
            raise
        raise e.at(str(ckpt.root / "config.json")) from None
    _refuse_fused_3d_experts(ckpt)
    layers: dict[int, tuple[str, dict[int, dict[str, LinearRef]]]] = {}
    others: list[LinearRef] = []
    for ref in fmt.linears(ckpt):
        fmt.check(ckpt, ref)
        m = EXPERT_MODULE.match(ref.module)
        if not m:
            others.append(ref)
            continue
        layer, expert, role = int(m["layer"]), int(m["expert"]), PROJ_ROLE[m["proj"]]
        prefix, experts = layers.setdefault(layer, (m["prefix"], {}))
        if prefix != m["prefix"]:
            raise BadInputError(f"layer {layer} names its experts under both {prefix} and {m['prefix']}", path=str(ckpt.root), tensor=ref.module)
        slot = experts.setdefault(expert, {})
        if role in slot:
            raise BadInputError(f"expert {expert} of layer {layer} has two {role} projections ({slot[role].module})", path=str(ckpt.root), tensor=ref.module)
        slot[role] = ref
    moe_layers = [_check_layer(ckpt, i, *layers[i], n_experts or max(layers[i][1]) + 1) for i in sorted(layers)]
    consumed = {t for layer in moe_layers for r in layer.refs() for t in r.parts.values()}
    consumed |= {t for r in others for t in r.parts.values()}
    plain = sorted((n for n in ckpt.names() if n not in consumed), key=natural_key)
    arch = arch or unknown_architecture(ckpt.config)
    return ModelMap(ckpt, arch, fmt, moe_layers, sorted(others, key=lambda r: natural_key(r.module)), plain)


# llm-compressor's optional repack_moe: every expert of a layer in one 3-D tensor per projection
FUSED_EXPERTS = re.compile(r"\.experts\.(?:gate_up_proj|down_proj)\.")


def _refuse_fused_3d_experts(ckpt: Checkpoint) -> None:
    """Experts quantized as fused 3-D tensors are not a layout moeprep reads (it could not be pinned
    down from compressed-tensors' own code here): refused by name, not misread."""
    for name in ckpt.names():
        if FUSED_EXPERTS.search(name) and len(ckpt.info(name).shape) == 3:
            raise UnsupportedError("experts stored fused in 3-D (llm-compressor's repack_moe layout): moeprep reads "
                                   "quantized experts one 2-D module per expert; save the model without repack_moe",
                                   path=str(ckpt.file_of(name)), tensor=name)


def _check_layer(ckpt: Checkpoint, index: int, prefix: str, experts: dict, n_experts: int) -> MoELayer:
    where = dict(path=str(ckpt.root))
    if max(experts) >= n_experts:
        raise BadInputError(f"config.json says {n_experts} experts but layer {index} has expert {max(experts)}", **where, tensor=f"{prefix}.experts.{max(experts)}")
    if len(experts) != n_experts:  # sized by what the layer holds: the config's count is not trusted yet
        first = next(e for e in range(len(experts) + 1) if e not in experts)
        raise BadInputError(f"MoE layer {index} has no expert {first} ({n_experts - len(experts)} of {n_experts} missing)",
                            **where, tensor=f"{prefix}.experts.{first}")
    ordered = []
    for e in range(n_experts):
        slot = experts[e]
        for role in ROLES:
            if role not in slot:
                raise BadInputError(f"expert {e} of layer {index} has no {role} projection", **where, tensor=f"{prefix}.experts.{e}")
        ordered.append(slot)
    gate0 = ordered[0]["gate"]
    hidden, inter = gate0.in_features, gate0.out_features
    for e, slot in enumerate(ordered):
        for role, want in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
            ref = slot[role]
            if (ref.out_features, ref.in_features) != want:
                raise BadInputError(
                    f"{role} of expert {e} is [{ref.out_features}, {ref.in_features}], expected {list(want)} like expert 0",
                    **where,
                    tensor=ref.module,
                )
    return MoELayer(index, prefix, ordered)
