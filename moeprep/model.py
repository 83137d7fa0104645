"""A checkpoint's quantized linears, grouped into MoE layers of experts, other quantized linears
and plain tensors: the map every command works from (built from headers alone)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .canonical import QuantLinear
from .arch import EXPERT_MODULE, PROJ_ROLE, ROLES, Architecture, detect_architecture
from .errors import BadInputError, MoeprepError
from .formats import LinearFacts, LinearRef, RawLinear, SourceFormat, detect
from .io.checkpoint import Checkpoint


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


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

    @property
    def num_experts(self) -> int:
        return self.arch.num_experts(self.ckpt.config)

    def read(self, ref: LinearRef) -> QuantLinear:
        return self.fmt.read(self.ckpt, ref)

    def read_raw_batch(self, refs: list[LinearRef]) -> list[RawLinear]:
        return self.fmt.read_raw_batch(self.ckpt, refs)

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


def build_model_map(ckpt: Checkpoint, fmt: SourceFormat | None = None) -> ModelMap:
    try:
        arch = detect_architecture(ckpt.config)
        fmt = fmt or detect(ckpt.quantization_config)
        arch.num_experts(ckpt.config)
    except MoeprepError as e:
        if e.path != "config.json":
            raise
        raise e.at(str(ckpt.root / "config.json")) from None
    n_experts = arch.num_experts(ckpt.config)
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
    moe_layers = [_check_layer(ckpt, i, *layers[i], n_experts) for i in sorted(layers)]
    consumed = {t for layer in moe_layers for r in layer.refs() for t in r.parts.values()}
    consumed |= {t for r in others for t in r.parts.values()}
    plain = sorted((n for n in ckpt.names() if n not in consumed), key=natural_key)
    return ModelMap(ckpt, arch, fmt, moe_layers, sorted(others, key=lambda r: natural_key(r.module)), plain)


def _check_layer(ckpt: Checkpoint, index: int, prefix: str, experts: dict, n_experts: int) -> MoELayer:
    where = dict(path=str(ckpt.root))
    if max(experts) >= n_experts:
        raise BadInputError(f"config.json says {n_experts} experts but layer {index} has expert {max(experts)}", **where, tensor=f"{prefix}.experts.{max(experts)}")
    missing = [e for e in range(n_experts) if e not in experts]
    if missing:
        raise BadInputError(f"MoE layer {index} has no expert {missing[0]} ({len(missing)} of {n_experts} missing)", **where, tensor=f"{prefix}.experts.{missing[0]}")
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
