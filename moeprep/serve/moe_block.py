"""The model's MoE block, computed from preshuffled weights: the routed experts with the family's
routing, plus its shared experts (and their gate) where it has them; a dense layer's MLP where a
family has dense layers."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..errors import BadInputError, MoeprepError
from ..moe import Activation, ExpertWeights, Routing, route
from .loader import LoadedCheckpoint, load
from .torch_moe import experts_reference

BACKENDS = ("auto", "reference", "triton")


def _fused_here(tensor: torch.Tensor, experts: ExpertWeights) -> bool:
    """Whether the fused kernels compute these experts on ``tensor``'s device."""
    return tensor.is_cuda and kernels.available() and kernels.supports(experts)


class MoEBlock(nn.Module):
    """``forward(hidden_states [T, H]) -> [T, H]``: router, routing, experts, weighted sum.

    The stored expert tensors are parameters (tagged ``is_shuffled``/``shuffle_kind``). The
    ``reference`` backend brings them back to the exact canonical form once and dequantizes per
    expert on each call; ``triton`` (the name is kept for compatibility) runs the fused kernels on
    the stored layout directly: whichever GPU backend each call's configuration names, the Triton
    GEMMs or the CUDA ones (moeprep.kernels.backend), after the routing kernel, or after torch's
    routing for what the routing kernel does not compute (``noaux_tc`` groups over an expert count
    that is not a power of two).
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
        correction_bias: Optional[torch.Tensor] = None,
        shared: Optional["DenseMLP"] = None,
        shared_gate: Optional[torch.Tensor] = None,
        fused_shared: bool = False,
    ):
        super().__init__()
        # the shared expert stored as the last of the experts (convert --fuse-shared-experts): every
        # token chooses it too, at weight 1 (or its gate's), so the same GEMM launches compute it
        self.fused_shared = fused_shared
        self.routing, self.activation, self.dtype = routing, activation, dtype
        self.router_weight = nn.Parameter(router_weight.to(dtype), requires_grad=False)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias.to(dtype), requires_grad=False)
        # noaux_tc's bias takes part in the choice only, in fp32
        self.correction_bias = None if correction_bias is None else nn.Parameter(correction_bias.float(), requires_grad=False)
        self.shared = shared
        self.shared_gate = None if shared_gate is None else nn.Parameter(shared_gate.to(dtype), requires_grad=False)
        self.expert_weights = experts
        for role, t in experts.tensors.items():
            self.register_parameter(role, nn.Parameter(t, requires_grad=False))
        self._canonical = None
        self.use_backend(backend)

    def use_backend(self, backend: str) -> None:
        """Compute with ``backend``; ``auto`` takes the fused kernels where the weights' device
        allows, the reference elsewhere."""
        if backend not in BACKENDS:
            raise MoeprepError(f"unknown MoE backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if backend == "auto":
            backend = "triton" if _fused_here(self.router_weight, self.expert_weights) else "reference"
        self.backend = backend

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
        if self.backend == "triton" and not self.fused_shared and kernels.routes(self.routing, self.expert_weights.num_experts):
            out = kernels.fused_moe(x, logits, self.routing, self.stored(), self.activation, correction_bias=self.correction_bias)
        else:  # torch routes: the reference, a routing the routing kernel does not compute, a fused shared expert
            weights, ids = self._choices(x, logits)
            if self.backend == "triton":
                out = kernels.fused_experts(x, weights, ids, self.stored(), self.activation)
            else:
                out = experts_reference(x, weights, ids, self.canonical(), self.activation)
        if self.shared is not None and not self.fused_shared:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(x, self.shared_gate)) * s
            out = out + s.to(out.dtype)
        return out

    def _choices(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing's top-k weights and ids; with a fused shared expert, that expert (stored last)
        chosen by every token too, at weight 1 or at its gate's sigmoid."""
        weights, ids = route(logits, self.routing, self.correction_bias)
        if not self.fused_shared:
            return weights, ids
        shared_id = torch.full_like(ids[:, :1], logits.shape[1])
        shared_weight = torch.ones_like(weights[:, :1]) if self.shared_gate is None else \
            torch.sigmoid(F.linear(x, self.shared_gate)).to(weights.dtype)
        return torch.cat([weights, shared_weight], dim=1), torch.cat([ids, shared_id], dim=1)


class ChosenExperts:
    """One layer's routed experts, on top-k choices made elsewhere (a serving engine's own router):
    the fused kernels on a GPU where they take the layer, the exact reference everywhere else."""

    def __init__(self, experts: ExpertWeights, activation: Activation):
        self.experts, self.activation = experts, activation
        self._canonical = None

    def __call__(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if _fused_here(hidden, self.experts):
            return kernels.fused_experts(hidden, topk_weights, topk_ids, self.experts, self.activation)
        if self._canonical is None:
            self._canonical = self.experts.canonical()
        return experts_reference(hidden, topk_weights, topk_ids, self._canonical, self.activation).to(hidden.dtype)


class DenseMLP(nn.Module):
    """``down(silu(gate x) * up x)`` on dense weights ``[out, in]``: a shared expert, or the MLP of a
    family's dense layer (dequantized exactly where the checkpoint quantized it)."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            self.register_parameter(name, nn.Parameter(w.to(dtype), requires_grad=False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(self.dtype)
        return F.linear(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


def _dense_mlp(loaded: LoadedCheckpoint, module: str, dtype: torch.dtype) -> Optional[DenseMLP]:
    """The gate/up/down projections under ``module``, or None where the checkpoint has none."""
    weights = [loaded.dense_weight(f"{module}.{proj}") for proj in ("gate_proj", "up_proj", "down_proj")]
    if all(w is None for w in weights):
        return None
    if any(w is None for w in weights):
        raise BadInputError("has some but not all of gate_proj, up_proj and down_proj", path=str(loaded.root), tensor=module)
    return DenseMLP(*weights, dtype=dtype)


def build_moe_block(loaded: LoadedCheckpoint, layer_idx: int, dtype: torch.dtype, backend: str) -> nn.Module:
    arch = loaded.model.arch
    if not isinstance(layer_idx, int) or isinstance(layer_idx, bool):
        raise BadInputError(f"a layer index is an int, got {layer_idx!r}", path=str(loaded.root))
    if layer_idx not in loaded.moe_layer_indices():
        dense = _dense_mlp(loaded, f"{_layers_prefix(loaded)}{layer_idx}.mlp", dtype)
        if dense is not None:
            return dense
    experts = loaded.experts(layer_idx)
    fused = loaded.fmt.fused_shared is not None
    routed = experts.num_experts - fused  # a fused shared expert is stored last, never routed to
    router = f"{experts.prefix}.{arch.router_names[0]}"
    if f"{router}.weight" not in loaded:
        raise BadInputError("missing router weight", path=str(loaded.root), tensor=f"{router}.weight")
    weight = loaded[f"{router}.weight"]
    bias = loaded[f"{router}.bias"] if f"{router}.bias" in loaded else None
    where = dict(path=str(loaded.model.ckpt.file_of(f"{router}.weight")), tensor=f"{router}.weight")
    if tuple(weight.shape) != (routed, experts.hidden_size):
        raise BadInputError(f"router is {list(weight.shape)}, the layer has {routed} routed experts of hidden size "
                            f"{experts.hidden_size}", **where)
    if bias is not None and tuple(bias.shape) != (routed,):
        raise BadInputError(f"router bias is {list(bias.shape)}, the layer has {routed} routed experts", **where)
    routing = Routing.for_arch(arch, loaded.config)
    if routing.top_k > routed:
        raise BadInputError(f"config.json routes each token to {routing.top_k} experts, the layer has {routed}",
                            path=str(loaded.root / "config.json"))
    correction = f"{router}.e_score_correction_bias"
    shared = _dense_mlp(loaded, f"{experts.prefix}.{arch.shared_experts}", dtype) \
        if arch.shared_experts and not fused else None
    gate = f"{experts.prefix}.{arch.shared_expert_gate}.weight" if arch.shared_expert_gate else None
    return MoEBlock(
        experts,
        weight,
        bias,
        routing,
        Activation.for_arch(arch.activation, loaded.config),
        dtype,
        backend,
        correction_bias=loaded[correction] if routing.scoring == "noaux_tc" and correction in loaded else None,
        shared=shared,
        shared_gate=loaded[gate] if (shared is not None or fused) and gate and gate in loaded else None,
        fused_shared=fused,
    )


def _layers_prefix(loaded: LoadedCheckpoint) -> str:
    """``model.layers.`` or, in multimodal checkpoints, ``model.language_model.layers.``."""
    for layer in loaded.model.moe_layers:
        return layer.prefix[: layer.prefix.rindex("layers.") + len("layers.")]
    return "model.layers."


def load_moe_layer(
    path: str | os.PathLike | LoadedCheckpoint,
    layer_idx: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> MoEBlock:
    """The MLP of decoder layer ``layer_idx`` of a converted checkpoint as the family defines it: the
    MoE block (routed experts, the family's routing, shared experts and their gate), or the dense
    MLP of a dense layer."""
    loaded = path if isinstance(path, LoadedCheckpoint) else load(path, device)
    return build_moe_block(loaded, layer_idx, dtype, backend)
