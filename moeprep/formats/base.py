"""What every source-format reader provides, and the helpers they share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

from ..lazy import torch

from ..canonical import Kind, QuantLinear
from ..errors import BadInputError, UnsupportedError
from ..io.checkpoint import Checkpoint
from . import packing


@dataclass(frozen=True)
class QuantParams:
    bits: int
    group_size: int  # -1: one group per row (per-channel)
    symmetric: bool
    desc_act: bool


@dataclass(frozen=True)
class LinearRef:
    """Where one quantized linear lives in a checkpoint (header facts only)."""

    module: str
    parts: Mapping[str, str]  # role ("qweight", "scales", "bias", ...) -> tensor name
    out_features: int
    in_features: int
    expert: Optional[int] = None  # index into stacked-experts tensors (gpt-oss, converted checkpoints)
    role: Optional[str] = None  # "gate", "up" or "down": which projection of a stacked tensor this is


@dataclass(frozen=True)
class LinearFacts:
    """What the canonical form of one linear will hold, known from headers alone."""

    scale_dtype: str  # torch's dtype names: header facts need no torch
    has_zeros: bool
    has_g_idx: bool
    has_bias: bool
    bias_dtype: Optional[str] = None


@dataclass
class RawLinear:
    """One linear as stored: codes in the source packing, everything else already canonical."""

    kind: Kind
    packing: str  # one of moeprep.ops.SRC_PACKINGS
    packed: torch.Tensor
    scales: torch.Tensor
    group_size: int
    zeros: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    def to_canonical(self) -> QuantLinear:
        return QuantLinear(
            kind=self.kind,
            codes=packing.to_canonical(self.packed, self.packing),
            scales=self.scales,
            group_size=self.group_size,
            zeros=self.zeros,
            g_idx=self.g_idx,
            bias=self.bias,
        )


class SourceFormat(ABC):
    """One quantized checkpoint format: detection, parameters, and per-linear reading."""

    name: ClassVar[str]
    kind: ClassVar[Kind]
    quant_methods: ClassVar[tuple[str, ...]]
    # The default `linears` finds a quantized module by this tensor suffix and collects the
    # companion suffixes present beside it.
    weight_suffix: ClassVar[str] = ""
    companion_suffixes: ClassVar[tuple[str, ...]] = ()
    # Roles (keys of LinearRef.parts) of the scale, zero-point and group-index tensors.
    scale_role: ClassVar[str] = "scales"
    zeros_role: ClassVar[Optional[str]] = None
    g_idx_role: ClassVar[Optional[str]] = None

    params: QuantParams

    def __init__(self, qcfg: dict):
        self.qcfg = qcfg

    # Readers that share a quant_method tell their schemes apart (compressed-tensors formats).
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def scheme(cls, qcfg: dict) -> str:
        return str(qcfg.get("quant_method"))

    @classmethod
    def claims(cls, qcfg: dict) -> bool:
        return not cls.schemes or cls.scheme(qcfg) in cls.schemes

    def describe(self) -> dict:
        return {
            "format": self.name,
            "bits": self.params.bits,
            "group_size": self.params.group_size,
            "symmetric": self.params.symmetric,
            "desc_act": self.params.desc_act,
        }

    def describe_extra(self, model) -> dict:
        """Format-specific facts for ``inspect`` beyond the common parameters."""
        return {}

    def is_weight(self, ckpt: Checkpoint, name: str) -> bool:
        return name.endswith("." + self.weight_suffix)

    def linears(self, ckpt: Checkpoint) -> list[LinearRef]:
        refs = []
        for name in ckpt.names():
            if not self.is_weight(ckpt, name):
                continue
            module = name[: -len(self.weight_suffix) - 1]
            parts = {self.weight_suffix: name}
            for suffix in self.companion_suffixes + ("bias",):
                other = f"{module}.{suffix}"
                if other in ckpt:
                    parts[suffix] = other
            out_f, in_f = self.shape(ckpt, parts)
            refs.append(LinearRef(module, parts, out_f, in_f))
        return refs

    def facts(self, ckpt: Checkpoint, ref: LinearRef) -> LinearFacts:
        scale = ckpt.info(require(ckpt, ref, self.scale_role))
        bias = ref.parts.get("bias")
        return LinearFacts(
            scale_dtype=scale.torch_dtype_name,
            has_zeros=self.zeros_role is not None and self.zeros_role in ref.parts,
            has_g_idx=self.g_idx_role is not None and self.g_idx_role in ref.parts,
            has_bias=bias is not None,
            bias_dtype=ckpt.info(bias).torch_dtype_name if bias else None,
        )

    @abstractmethod
    def shape(self, ckpt: Checkpoint, parts: Mapping[str, str]) -> tuple[int, int]:
        """``(out_features, in_features)`` from headers alone."""

    @abstractmethod
    def check(self, ckpt: Checkpoint, ref: LinearRef) -> None:
        """Header-level consistency of one linear: every tensor present, dtypes, shapes, group
        size. Run for every linear when a checkpoint is opened, so even ``inspect`` refuses."""

    @abstractmethod
    def read_raw_batch(self, ckpt: Checkpoint, refs: list[LinearRef]) -> list[RawLinear]:
        """Read (checked) linears of one shape, e.g. one projection of every expert of a layer:
        codes left in their source packing, the small tensors decoded in one batch. Data-level
        checks (g_idx maps, stored shapes) happen here."""

    def read_raw(self, ckpt: Checkpoint, ref: LinearRef) -> RawLinear:
        return self.read_raw_batch(ckpt, [ref])[0]

    def read(self, ckpt: Checkpoint, ref: LinearRef) -> QuantLinear:
        return self.read_raw(ckpt, ref).to_canonical()


# --- helpers shared by the readers -------------------------------------------------------------


def require(ckpt: Checkpoint, ref_or_parts, role: str, module: str | None = None) -> str:
    parts = ref_or_parts.parts if isinstance(ref_or_parts, LinearRef) else ref_or_parts
    name = parts.get(role)
    if name is None:
        mod = module or (ref_or_parts.module if isinstance(ref_or_parts, LinearRef) else "?")
        raise BadInputError(f"missing tensor {role!r} of quantized module", path=str(ckpt.root), tensor=f"{mod}.{role}")
    return name


def check_tensor(ckpt: Checkpoint, name: str, dtypes: tuple[str, ...], shape: tuple[int, ...]) -> None:
    """Header-level check of one tensor's dtype and shape, naming file and tensor on failure."""
    info = ckpt.info(name)
    if info.dtype not in dtypes:
        want = " or ".join(dtypes)
        raise BadInputError(f"dtype {info.dtype}, expected {want}", path=str(ckpt.file_of(name)), tensor=name)
    if tuple(info.shape) != tuple(shape):
        raise BadInputError(
            f"shape {list(info.shape)}, expected {list(shape)}", path=str(ckpt.file_of(name)), tensor=name
        )


def group_count(ckpt: Checkpoint, name: str, in_features: int, group_size: int) -> int:
    """Number of groups along K, refusing a group size that does not divide K."""
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g:
        raise BadInputError(
            f"group size {group_size} does not divide in_features {in_features}", path=str(ckpt.file_of(name)), tensor=name
        )
    return in_features // g


def check_bias(ckpt: Checkpoint, ref: LinearRef) -> None:
    if "bias" in ref.parts:
        check_tensor(ckpt, ref.parts["bias"], ("BF16", "F16", "F32"), (ref.out_features,))


def read_bias(ckpt: Checkpoint, ref: LinearRef) -> Optional[torch.Tensor]:
    return ckpt.get_tensor(ref.parts["bias"]) if "bias" in ref.parts else None


def g_idx_of(ckpt: Checkpoint, refs: list[LinearRef], role: str, in_features: int, group_size: int) -> list[Optional[torch.Tensor]]:
    if role not in refs[0].parts:
        return [None] * len(refs)
    return checked_g_idx(ckpt, [ref.parts[role] for ref in refs], in_features, group_size)


def checked_g_idx(ckpt: Checkpoint, names: list[str], in_features: int, group_size: int) -> list[Optional[torch.Tensor]]:
    """Read and validate g_idx tensors (one per linear, all of one shape) in one batch; each is
    ``None`` when it is the trivial ``k // G`` map."""
    g = in_features if group_size == -1 else group_size
    groups = in_features // g
    g_idx = torch.stack([ckpt.get_tensor(name) for name in names]).to(torch.int64)
    in_range = (g_idx >= 0) & (g_idx < groups)
    counts = torch.zeros(len(names), groups + 1, dtype=torch.int64).scatter_add_(1, torch.where(in_range, g_idx, groups), torch.ones_like(g_idx))
    bad = (~in_range.all(dim=1)) | (counts[:, :groups] != g).any(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        where = dict(path=str(ckpt.file_of(names[row])), tensor=names[row])
        if not bool(in_range[row].all()):
            raise BadInputError(f"not a valid group map: values outside [0, {groups})", **where)
        grp = int((counts[row, :groups] != g).nonzero()[0, 0])
        raise BadInputError(f"not a valid group map: group {grp} has {int(counts[row, grp])} channels, expected {g}", **where)
    trivial = (g_idx == torch.arange(in_features) // g).all(dim=1)
    return [None if bool(t) else row.to(torch.int32) for t, row in zip(trivial, g_idx)]


def stacked(ckpt: Checkpoint, refs: list[LinearRef], role: str) -> torch.Tensor:
    """One tensor role of several linears of one shape (the experts of a projection), stacked."""
    return torch.stack([ckpt.get_tensor(ref.parts[role]) for ref in refs])


def param(qcfg: dict, *keys: str, default=None):
    for key in keys:
        if key in qcfg and qcfg[key] is not None:
            return qcfg[key]
    return default


def refuse(what: str) -> UnsupportedError:
    return UnsupportedError(what, path="config.json")


def require_4bit(qcfg: dict, method: str) -> None:
    bits = param(qcfg, "bits", "w_bit")
    if bits != 4:
        raise refuse(f"{method} with bits={bits} is not supported (moeprep reads 4-bit weights only)")


def group_size_param(qcfg: dict, method: str, *keys: str, default: int) -> int:
    """A group size from the config: a positive int, or -1 for one group per row."""
    group_size = param(qcfg, *keys, default=default)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or (group_size <= 0 and group_size != -1):
        raise refuse(f"{method} group_size {group_size!r} is not supported")
    return group_size


def shape_2d(ckpt: Checkpoint, name: str) -> tuple[int, int]:
    info = ckpt.info(name)
    if len(info.shape) != 2:
        raise BadInputError(f"must be 2-D, got shape {list(info.shape)}", path=str(ckpt.file_of(name)), tensor=name)
    return info.shape
