"""Target layouts: one class per ``shuffle_kind``, behind a registry."""
from . import layouts  # noqa: F401  (importing registers the targets)
from .base import FORMAT_VERSION, LayerPlan, ProjShape, SourceLayer, Target, tensor_name
from .registry import TARGETS, get_target, preference

# Default target per source kind: the first of these that can hold it exactly.
PREFERENCE = {kind: preference(kind) for kind in ("int4", "mxfp4")}

__all__ = ["FORMAT_VERSION", "LayerPlan", "PREFERENCE", "ProjShape", "SourceLayer", "TARGETS", "Target", "get_target", "tensor_name"]
