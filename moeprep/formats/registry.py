"""The registry of source formats and detection from ``quantization_config``."""
from __future__ import annotations

from ..errors import UnsupportedError
from .base import SourceFormat

FORMATS: list[type[SourceFormat]] = []


def register(cls: type) -> type:
    FORMATS.append(cls)
    return cls


def detect(qcfg: dict | None):
    """The reader for a checkpoint's quantization config, or a one-line refusal saying what was found."""
    if qcfg is None:
        raise UnsupportedError(
            "not a quantized checkpoint: config.json has no quantization_config (and there is no quantize_config.json)",
            path="config.json",
        )
    if not isinstance(qcfg, dict):
        raise UnsupportedError("quantization_config is not a JSON object", path="config.json")
    method = qcfg.get("quant_method")
    candidates = [cls for cls in FORMATS if method in cls.quant_methods]
    if not candidates:
        known = sorted({m for cls in FORMATS for m in cls.quant_methods})
        raise UnsupportedError(f"unsupported quant_method {method!r} (supported: {', '.join(known)})", path="config.json")
    for cls in candidates:
        if cls.claims(qcfg):
            fmt: SourceFormat = cls(qcfg)
            return fmt
    # Several readers share a quant_method (compressed-tensors) and tell apart their schemes.
    found = candidates[0].scheme(qcfg)
    supported = ", ".join(s for cls in candidates for s in cls.schemes)
    raise UnsupportedError(f"unsupported {method} scheme {found!r} (supported: {supported})", path="config.json")
