"""What a GPU backend of the fused MoE provides, and their registry.

A backend runs a layer's two grouped GEMMs (gate/up with the activation, then down with the
weighted top-k sum) on the routed tokens. The dispatcher (``fused.call_config``) asks the backend
a configuration names whether it can run the call, and takes the Triton backend, which runs
everything, when it cannot. A new backend is one module with one registered class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..moe import Activation
from .configs import MoEConfig
from .layer import Layer
from .routing import RoutedTokens

BACKENDS: dict[str, "Backend"] = {}


def register(cls: type) -> type:
    BACKENDS[cls.name] = cls()
    return cls


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def problems(self, layer: Layer, hidden: torch.Tensor, activation: Activation) -> list[str]:
        """Why this backend cannot run this call (empty when it can)."""

    @abstractmethod
    def block_m(self, cfg: MoEConfig) -> int:
        """Routed rows per block: the routing pads every expert's rows to a multiple of it."""

    def h_rows(self, r: RoutedTokens) -> int:
        """Rows of the intermediate activations ``h``: one per routed (token, slot) pair."""
        return r.topk_ids.numel()

    @abstractmethod
    def launch(self, layer: Layer, hidden: torch.Tensor, r: RoutedTokens, h: torch.Tensor, out: torch.Tensor,
               activation: Activation, cfg: MoEConfig) -> None:
        """Both GEMMs: ``h = act(hidden W13^T)`` per routed pair, then ``out = sum_j w_j h_j W2^T``
        (``out`` is written whole; its old contents do not matter)."""
