"""Serve time: load preshuffled checkpoints and run their MoE blocks."""
from ..moe import Activation, ExpertWeights, Routing, route
from .loader import LoadedCheckpoint, load
from .moe_block import MoEBlock, load_moe_layer
from .tags import ShuffledTensor

__all__ = ["Activation", "ExpertWeights", "LoadedCheckpoint", "MoEBlock", "Routing", "ShuffledTensor", "load", "load_moe_layer", "route"]
