"""A MoE layer's stored tensors as every GPU backend takes them: the codes as int32 words, the
scales, zero points and biases, and the facts the launchers need. Derived from the layer's target
(its ``kernel_codes`` and gate/up interleaving), so a new target with a known code family needs
nothing here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UnsupportedError
from ..moe import ExpertWeights
from ..targets import TARGETS
from . import configs, moe_gemm

# a target's kernel_codes -> the GEMMs' FMT
CODES = {"int4_signed": moe_gemm.W4A16.value, "int4_unsigned": moe_gemm.W4A16_ZP.value, "e2m1": moe_gemm.MXFP4.value}


@dataclass(frozen=True)
class Proj:
    """One projection's stored tensors as the kernels take them."""

    words: torch.Tensor  # the packed codes viewed as int32
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    groups: int
    group_size: int
    scale_cols: int  # E8M0 groups after padding (MXFP4); unused for int4


@dataclass(frozen=True)
class Layer:
    """A MoE layer's stored tensors as the kernels take them."""

    fmt: int
    gate_up_interleaved: bool
    w13: Proj
    w2: Proj
    input_perm: Optional[torch.Tensor]
    experts: int
    hidden: int
    inter: int

    @property
    def family(self) -> str:
        """The code family the tuned tables key on: ``int4`` or ``mxfp4``."""
        return "mxfp4" if self.fmt == moe_gemm.MXFP4.value else "int4"


def problems(experts: ExpertWeights) -> list[str]:
    """Why the kernels cannot run this layer (empty when they can)."""
    target = experts.target
    if target.kernel_codes not in CODES:
        able = [name for name, t in TARGETS.items() if t.kernel_codes in CODES]
        return [f"target {target.name} has no fused kernel (supported: {', '.join(able)})"]
    found = []
    for proj in ("w13", "w2"):
        s = experts.plan.shapes[proj]
        if target.kernel_codes == "e2m1" and s.group_size != 32:
            found.append(f"{proj}: MXFP4 group size {s.group_size}, expected 32")
        if configs.fit_block_k(128, s.cols, s.group_size) == 0:
            found.append(f"{proj}: no K tile of >= 16 columns fits K={s.cols} with group size {s.group_size}")
    return found


def prepare(experts: ExpertWeights) -> Layer:
    found = problems(experts)
    if found:
        raise UnsupportedError("; ".join(found))
    target = experts.target
    perm = _plain(experts.get("w13_input_perm"))
    return Layer(CODES[target.kernel_codes], target.gate_up_interleaved, _proj(experts, "w13"), _proj(experts, "w2"),
                 None if perm is None else perm.contiguous(), experts.num_experts, experts.hidden_size,
                 experts.intermediate_size)


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.as_subclass(torch.Tensor)


def _proj(experts: ExpertWeights, proj: str) -> Proj:
    shape = experts.plan.shapes[proj]
    scale = _plain(experts.get(f"{proj}_weight_scale"))
    if scale.element_size() == 1:
        scale = scale.view(torch.uint8)
    return Proj(
        _plain(experts.get(f"{proj}_weight")).contiguous().view(torch.int32),
        scale.contiguous(),
        _plain(experts.get(f"{proj}_weight_zero_point")),
        _plain(experts.get(f"{proj}_bias")),
        shape.groups,
        shape.group_size,
        scale.shape[-1],
    )
