"""Source formats: one reader module each, behind a registry (``detect``)."""
from . import awq, ct_int4, ct_mxfp4, gptoss_mxfp4, gptq, quark_mxfp4  # noqa: F401  (importing registers the readers)
from .base import LinearFacts, LinearRef, QuantParams, RawLinear, SourceFormat
from .registry import FORMATS, detect

__all__ = ["FORMATS", "LinearFacts", "LinearRef", "QuantParams", "RawLinear", "SourceFormat", "detect"]
