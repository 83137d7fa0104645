"""Per-module packers: integer codes -> the tensors each format stores (suffix -> array).

Orientation and nibble order follow FORMATS.md; the comments cite the section.
"""

from __future__ import annotations

import numpy as np

from .floats import to_stored
from .nibbles import AWQ_ORDER, pack_bytes, pack_words, subtract_per_nibble_one
from .rtn import Int4Codes, Mxfp4Codes

GPTQ_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


def _c(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def pack_ct_int4(c: Int4Codes) -> dict[str, np.ndarray]:
    """§1: weight_packed int32 [out, in/8] along in; the unsigned code is the stored nibble
    (signed value + 8). Asym zero points: int32 [out/8, groups], packed along dim 0."""
    packed = {
        "weight_packed": pack_words(c.codes),
        "weight_scale": to_stored(c.scales, c.scale_dtype),
    }
    if not c.sym:
        packed["weight_zero_point"] = _c(pack_words(_c(c.zeros.T)).T)
    packed["weight_shape"] = np.array(c.codes.shape, dtype=np.int64)
    return packed


def pack_gptq(c: Int4Codes, checkpoint_format: str) -> dict[str, np.ndarray]:
    """§2a: qweight int32 [in/8, out] along in, qzeros int32 [groups, out/8] along out,
    scales [groups, out], g_idx [in]. v1 ("gptq") stores zeros minus one, as GPTQModel's
    writer does it: one `- 0x11111111` on each word (see nibbles.subtract_per_nibble_one)."""
    if checkpoint_format not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {GPTQ_CHECKPOINT_FORMATS}, not {checkpoint_format!r}")
    qzeros = pack_words(_c(c.zeros.T))
    if checkpoint_format == "gptq":
        qzeros = subtract_per_nibble_one(qzeros)
    return {
        "g_idx": c.g_idx.astype(np.int32),
        "scales": to_stored(_c(c.scales.T), c.scale_dtype),
        "qweight": _c(pack_words(c.codes).T),
        "qzeros": qzeros,
    }


def pack_awq(c: Int4Codes) -> dict[str, np.ndarray]:
    """§3: qweight int32 [in, out/8] along out with the interleaved nibble order, qzeros
    int32 [groups, out/8] likewise (plain zeros), scales [groups, out]."""
    return {
        "scales": to_stored(_c(c.scales.T), c.scale_dtype),
        "qweight": pack_words(_c(c.codes.T), AWQ_ORDER),
        "qzeros": pack_words(_c(c.zeros.T), AWQ_ORDER),
    }


def pack_quark_mxfp4(c: Mxfp4Codes) -> dict[str, np.ndarray]:
    """§4b: codes under the plain `weight` key, uint8 [out, in/2], low nibble = even element."""
    return {"weight": pack_bytes(c.codes), "weight_scale": c.scales}


def pack_ct_mxfp4(c: Mxfp4Codes) -> dict[str, np.ndarray]:
    """§4c: weight_packed uint8 [out, in/2], weight_scale uint8 [out, in/32], no weight_shape."""
    return {"weight_packed": pack_bytes(c.codes), "weight_scale": c.scales}


def pack_gptoss_experts(c: Mxfp4Codes) -> dict[str, np.ndarray]:
    """§4a: fused experts [E, out, in] -> `_blocks` [E, out, in/32, 16] + `_scales` [E, out, in/32]."""
    e, out_f, in_f = c.codes.shape
    return {
        "blocks": pack_bytes(c.codes).reshape(e, out_f, in_f // 32, 16),
        "scales": c.scales,
    }


def interleave(gate: np.ndarray, up: np.ndarray, axis: int) -> np.ndarray:
    """gpt-oss fused gate_up: gate at even, up at odd positions of `axis` (rows of the
    weights, entries of the biases)."""
    axis = axis % gate.ndim
    shape = list(gate.shape)
    shape[axis] *= 2
    return np.stack([gate, up], axis=axis + 1).reshape(shape)
