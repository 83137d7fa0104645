"""Target layouts: one class per ``shuffle_kind``, behind a registry."""
from . import layouts  # noqa: F401  (importing registers the targets)
from .base import FORMAT_VERSION, LayerPlan, ProjShape, Target, layer_plan, tensor_name
from .registry import TARGETS, get_target

# Default target per source format: the first of these that can hold it exactly.
PREFERENCE = {
    "int4": ("w4a16_preshuffle", "w4a16_preshuffle_zp", "canonical"),
    "mxfp4": ("mxfp4_moe", "mxfp4_preshuffle", "canonical"),
}

__all__ = ["FORMAT_VERSION", "LayerPlan", "PREFERENCE", "ProjShape", "TARGETS", "Target", "get_target", "layer_plan", "tensor_name"]
