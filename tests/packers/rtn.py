"""Round-to-nearest quantizers producing the integer codes every packer starts from.

All int4 formats are handled in one unsigned domain: codes q and zero points z in 0..15,
W = (q - z) * s. compressed-tensors' signed values are q - 8 and z - 8 (its stored nibble
is the same unsigned code); symmetric means z = 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .floats import e2m1_codes, round_to


@dataclass(frozen=True)
class Int4Codes:
    codes: np.ndarray  # uint8 [out, in], 0..15
    zeros: np.ndarray  # uint8 [out, groups], 0..15 (all 8 when symmetric)
    scales: np.ndarray  # float32 [out, groups], exactly representable in scale_dtype
    g_idx: np.ndarray  # int32 [in], the group of each input channel
    sym: bool
    scale_dtype: str


def sequential_g_idx(in_features: int, group_size: int) -> np.ndarray:
    return (np.arange(in_features) // group_size).astype(np.int32)


def act_order_g_idx(in_features: int, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """desc_act map: channels visited in a random order, group = rank // group_size, so every
    group holds exactly group_size scattered channels (qweight rows keep their order)."""
    rank = np.empty(in_features, dtype=np.int64)
    rank[rng.permutation(in_features)] = np.arange(in_features)
    return (rank // group_size).astype(np.int32)


def quantize_int4(
    w: np.ndarray,
    g_idx: np.ndarray,
    sym: bool,
    scale_dtype: str,
    zero_to_zero: np.ndarray | None = None,
    divide_in: str | None = None,
) -> Int4Codes:
    """RTN per (row, group). sym: s = absmax / 7.5, z = 8 (GPTQ's and compressed-tensors'
    convention, reaching code 0 at -absmax). asym: min/max range widened to include 0,
    s = range / 15, z = round(-min / s). `zero_to_zero` ([out, groups] bool) forces z = 0 on
    those groups (the group is then coded relative to its own minimum). `divide_in` rounds
    x / s to that float dtype before rounding to an integer, as compressed-tensors does in
    the model dtype (with it, the bf16 fixture base re-quantizes to the real fixture's bytes)."""
    out_f, in_f = w.shape
    n_groups = int(g_idx.max()) + 1
    order = np.argsort(g_idx, kind="stable")
    counts = np.bincount(g_idx, minlength=n_groups)
    if not (counts == counts[0]).all():
        raise ValueError("every group must hold the same number of input channels")
    grouped = w[:, order].reshape(out_f, n_groups, counts[0]).astype(np.float32)
    lo = np.minimum(grouped.min(axis=2), 0.0)
    hi = np.maximum(grouped.max(axis=2), 0.0)
    if sym:
        scales = np.maximum(np.abs(lo), hi) / 7.5
    else:
        scales = (hi - lo) / 15.0
    scales = round_to(np.where(scales > 0, scales, 1.0), scale_dtype)
    if sym:
        zeros = np.full((out_f, n_groups), 8.0, dtype=np.float32)
    else:
        zeros = np.clip(np.round(-lo / scales), 0, 15)
    shift = np.zeros_like(zeros)
    if zero_to_zero is not None:
        shift = np.where(zero_to_zero, grouped.min(axis=2), 0.0)
        zeros = np.where(zero_to_zero, 0.0, zeros)
    ratio = (grouped - shift[..., None]) / scales[..., None]
    if divide_in is not None:
        ratio = round_to(ratio, divide_in)
    q = np.round(ratio) + zeros[..., None]
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(out_f, in_f)
    codes = np.empty_like(q)
    codes[:, order] = q
    return Int4Codes(codes, zeros.astype(np.uint8), scales, g_idx.astype(np.int32), sym, scale_dtype)


@dataclass(frozen=True)
class Mxfp4Codes:
    codes: np.ndarray  # uint8 [..., in], e2m1 codes 0..15
    scales: np.ndarray  # uint8 [..., in/32], E8M0 biased exponents


def _round_mantissa_to_one_bit(x: np.ndarray) -> np.ndarray:
    """Round positive float32 to 1 mantissa bit (e2m1's precision), ties to even."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    keep = np.uint64(1 << 22)
    u = (u + (keep >> np.uint64(1)) - 1 + ((u >> np.uint64(22)) & 1)) & ~(keep - np.uint64(1))
    return u.astype(np.uint32).view(np.float32)


def quantize_mxfp4(w: np.ndarray, signed_zero: bool = True) -> Mxfp4Codes:
    """Per 32 elements along the last axis: shared exponent floor(log2 amax') - 2 (e2m1's top
    exponent), where amax' is amax rounded to e2m1 precision ("even" scale mode of Quark and
    llm-compressor, checked against the Quark fixture); elements rounded to nearest e2m1, ties
    to even, saturating at 6. With `signed_zero`, small negatives keep their sign (code 8, -0);
    Quark and compressed-tensors write +0 (code 0) instead."""
    blocks = w.astype(np.float32).reshape(*w.shape[:-1], -1, 32)
    amax = _round_mantissa_to_one_bit(np.abs(blocks).max(axis=-1))
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127)
    exp = np.clip(exp, -127, 127).astype(np.int32)
    scaled = blocks / np.ldexp(np.float32(1.0), exp)[..., None]
    codes = e2m1_codes(scaled).reshape(w.shape)
    if not signed_zero:
        codes = np.where(codes == 8, 0, codes).astype(np.uint8)
    return Mxfp4Codes(codes, (exp + 127).astype(np.uint8))
