"""The model's sparse MoE block, computed from preshuffled weights."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import BadInputError, MoeprepError, UnsupportedError
from ..moe import Activation, ExpertWeights, Routing
from .loader import LoadedCheckpoint, load
from .torch_moe import moe_reference

BACKENDS = ("auto", "reference", "triton")


class MoEBlock(nn.Module):
    """``forward(hidden_states [T, H]) -> [T, H]``: router, routing, experts, weighted sum.

    The stored expert tensors are parameters (tagged ``is_shuffled``/``shuffle_kind``). The
    ``reference`` backend brings them back to the exact canonical form once and dequantizes per
    expert on each call; ``triton`` (the name is kept for compatibility) runs the fused kernels on
    the stored layout directly: whichever GPU backend each call's configuration names, the Triton
    GEMMs or the CUDA ones (moeprep.kernels.backend).
    """

    def __init__(
        self,
        experts: ExpertWeights,
        router_weight: torch.Tensor,
        router_bias: Optional[torch.Tensor],
        routing: Routing,
        activation: Activation,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise MoeprepError(f"unknown MoE backend {backend!r} (choose from {', '.join(BACKENDS)})")
        self.routing, self.activation, self.dtype = routing, activation, dtype
        self.router_weight = nn.Parameter(router_weight.to(dtype), requires_grad=False)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias.to(dtype), requires_grad=False)
        self.expert_weights = experts
        for role, t in experts.tensors.items():
            self.register_parameter(role, nn.Parameter(t, requires_grad=False))
        self.backend = self._pick_backend(backend)
        self._canonical = None

    def _pick_backend(self, backend: str) -> str:
        if backend != "auto":
            return backend
        if self.router_weight.is_cuda:
            if kernels.available() and kernels.supports(self.expert_weights):
                return "triton"
        return "reference"

    def stored(self) -> ExpertWeights:
        """The expert weights as this module holds them now (after any ``.to(device)``)."""
        w = self.expert_weights
        return w.with_tensors({role: getattr(self, role) for role in w.tensors})

    def canonical(self):
        if self._canonical is None:
            self._canonical = self.stored().canonical()
        return self._canonical

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.expert_weights.hidden_size:
            raise MoeprepError(f"expected hidden_states [T, {self.expert_weights.hidden_size}], got {list(hidden_states.shape)}")
        x = hidden_states.to(self.dtype)
        logits = F.linear(x, self.router_weight, self.router_bias)
        if self.backend == "triton":
            return kernels.fused_moe(x, logits, self.routing, self.stored(), self.activation)
        return moe_reference(x, logits, self.routing, self.canonical(), self.activation)


def build_moe_block(loaded: LoadedCheckpoint, layer_idx: int, dtype: torch.dtype, backend: str) -> MoEBlock:
    arch = loaded.model.arch
    if arch.servable:
        raise UnsupportedError(f"serving {arch.name} needs {arch.servable}, which moeprep does not compute yet "
                               "(dequant, convert and verify work)", path=str(loaded.root / "config.json"))
    experts = loaded.experts(layer_idx)
    router = f"{experts.prefix}.{arch.router_names[0]}"
    if f"{router}.weight" not in loaded:
        raise BadInputError("missing router weight", path=str(loaded.root), tensor=f"{router}.weight")
    weight = loaded[f"{router}.weight"]
    bias = loaded[f"{router}.bias"] if f"{router}.bias" in loaded else None
    where = dict(path=str(loaded.model.ckpt.file_of(f"{router}.weight")), tensor=f"{router}.weight")
    if tuple(weight.shape) != (experts.num_experts, experts.hidden_size):
        raise BadInputError(f"router is {list(weight.shape)}, the layer has {experts.num_experts} experts of hidden size "
                            f"{experts.hidden_size}", **where)
    if bias is not None and tuple(bias.shape) != (experts.num_experts,):
        raise BadInputError(f"router bias is {list(bias.shape)}, the layer has {experts.num_experts} experts", **where)
    routing = Routing.for_arch(arch, loaded.config)
    if routing.top_k > experts.num_experts:
        raise BadInputError(f"config.json routes each token to {routing.top_k} experts, the layer has {experts.num_experts}",
                            path=str(loaded.root / "config.json"))
    return MoEBlock(
        experts,
        weight,
        bias,
        routing,
        Activation.for_arch(arch.activation, loaded.config),
        dtype,
        backend,
    )


def load_moe_layer(
    path: str | os.PathLike | LoadedCheckpoint,
    layer_idx: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> MoEBlock:
    """The sparse MoE block of decoder layer ``layer_idx`` of a converted checkpoint."""
    loaded = path if isinstance(path, LoadedCheckpoint) else load(path, device)
    return build_moe_block(loaded, layer_idx, dtype, backend)
