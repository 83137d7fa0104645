"""Serve time: load preshuffled checkpoints and run their MoE blocks."""
from .loader import ExpertWeights, LoadedCheckpoint, load
from .moe_block import MoEBlock, load_moe_layer
from .reference import Activation
from .routing import Routing, route
from .tags import ShuffledTensor

__all__ = ["Activation", "ExpertWeights", "LoadedCheckpoint", "MoEBlock", "Routing", "ShuffledTensor", "load", "load_moe_layer", "route"]
