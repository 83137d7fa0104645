"""Float encodings the formats store: bfloat16/float16 scales, e2m1 codes, E8M0 exponents."""

from __future__ import annotations

import numpy as np

from .oracle import E2M1_VALUES, widen

FLOAT_DTYPES = ("bfloat16", "float16")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = u + 0x7FFF + ((u >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def to_stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the array that stores it: uint16 bits for bfloat16, float16 for float16."""
    if dtype == "bfloat16":
        return to_bf16_bits(x)
    if dtype == "float16":
        return np.asarray(x, dtype=np.float32).astype(np.float16)
    raise ValueError(f"unsupported float dtype {dtype!r}; use one of {FLOAT_DTYPES}")


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values exactly representable in `dtype` (the quantizer's cast of its scales)."""
    return widen(to_stored(x, dtype))


_E2M1_MAGNITUDES = E2M1_VALUES[:8]  # codes 0..7, ascending


def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Nearest e2m1 code (ties to the even code, i.e. even mantissa), saturating at 6.

    Sign-magnitude: small negatives become -0 (code 8), as a sign-preserving quantizer writes."""
    mag = np.minimum(np.abs(x), 6.0)
    idx = np.searchsorted(_E2M1_MAGNITUDES, mag)  # first magnitude >= mag
    idx = np.clip(idx, 1, 7)
    lo, hi = _E2M1_MAGNITUDES[idx - 1], _E2M1_MAGNITUDES[idx]
    take_hi = (mag - lo > hi - mag) | ((mag - lo == hi - mag) & (idx % 2 == 0))
    code = np.where(take_hi, idx, idx - 1).astype(np.uint8)
    return code | (np.signbit(x).astype(np.uint8) << 3)
