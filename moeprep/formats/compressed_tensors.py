"""compressed-tensors (llm-compressor): the scheme shared by its formats.

One checkpoint may list several ``config_groups``; moeprep converts checkpoints whose quantized
weights all follow one scheme, which is what llm-compressor's presets write.
"""
from __future__ import annotations

import json

from ..errors import UnsupportedError

WEIGHT_KEYS = ("num_bits", "type", "strategy", "group_size", "symmetric", "actorder")


def weights_scheme(qcfg: dict) -> tuple[str, dict]:
    """``(format, weights args)`` common to every config group, or a refusal."""
    status = qcfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedError(
            f"compressed-tensors quantization_status {status!r}: weights are not packed (need 'compressed')",
            path="config.json",
        )
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UnsupportedError("compressed-tensors config has no config_groups", path="config.json")
    schemes = set()
    args = None
    for group in groups.values():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            continue
        fmt = group.get("format") or qcfg.get("format")
        for key, value in [("format", fmt)] + [(f"weights.{k}", weights.get(k)) for k in WEIGHT_KEYS]:
            if not isinstance(value, (str, int, float, bool, type(None))):
                raise UnsupportedError(f"compressed-tensors {key} must be a single value, got {type(value).__name__} "
                                       f"{json.dumps(value)[:40]}", path="config.json")
        schemes.add((fmt, tuple(weights.get(k) for k in WEIGHT_KEYS)))
        args = weights
    if not schemes:
        raise UnsupportedError("compressed-tensors config quantizes no weights", path="config.json")
    if len(schemes) > 1:
        raise UnsupportedError(
            f"compressed-tensors config mixes {len(schemes)} weight schemes; moeprep converts one scheme per checkpoint",
            path="config.json",
        )
    (fmt, _), = schemes
    return str(fmt), args
