"""The MoE block in plain torch: exact dequantized experts, the architecture's own math.

It works for every target (the stored tensors are first brought back to the canonical form by
the target's exact inverse) on any device: the ``reference`` backend of :class:`MoEBlock`, and
what the fused kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..canonical import QuantLinear, dequantize
from ..moe import Activation


def _linear(x: torch.Tensor, ql: QuantLinear) -> torch.Tensor:
    w = dequantize(ql, x.dtype).to(x.device)
    bias = None if ql.bias is None else ql.bias.to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, bias)


def expert_hidden(x: torch.Tensor, expert: dict[str, QuantLinear], act: Activation) -> torch.Tensor:
    """The expert's activation of its gate and up projections: the down projection's input."""
    gate, up = _linear(x, expert["gate"]), _linear(x, expert["up"])
    if act.kind == "swiglu_oai":
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
    return F.silu(gate) * up


def expert_down(h: torch.Tensor, expert: dict[str, QuantLinear]) -> torch.Tensor:
    return _linear(h, expert["down"])


def expert_forward(x: torch.Tensor, expert: dict[str, QuantLinear], act: Activation) -> torch.Tensor:
    return expert_down(expert_hidden(x, expert, act), expert)


def experts_reference(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts: list[dict[str, QuantLinear]],
    act: Activation,
) -> torch.Tensor:
    """Sum over each token's chosen experts of ``weight * expert(x)``, accumulated in ``hidden.dtype``."""
    out = torch.zeros_like(hidden)
    for e in torch.unique(topk_ids).tolist():
        tokens, slot = torch.where(topk_ids == e)
        y = expert_forward(hidden[tokens], experts[e], act) * topk_weights[tokens, slot, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out

