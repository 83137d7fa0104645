"""Independent unpackers and dequantizers for every source format (numpy only).

Written from tests/data/FORMATS.md and checked bit for bit against the real fixtures'
ref_dequant.safetensors. This module deliberately imports nothing from the packers: a
packer bug must not be able to cancel out against the same bug here.

Arrays come in exactly as stored: int32 words, uint8 bytes, float16 scales, and bfloat16 as
uint16 bit patterns (numpy has no bfloat16). Every dequantizer returns float32 `[out, in]`
(`[E, out, in]` for fused gpt-oss experts) computed as one fp32 product `(q - z) * s`.
"""

from __future__ import annotations

import numpy as np

E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
AWQ_NIBBLE_COLUMN = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a word holds column 8w + this[p]
GPTQ_V1_ZERO_OFFSET = 0x11111111  # v1 stores every zero minus one, as one word-level subtraction


def widen(values: np.ndarray) -> np.ndarray:
    """float32 copy of stored scales: float16/float32 as is, uint16 as bfloat16 bits."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    if values.dtype in (np.float16, np.float32):
        return values.astype(np.float32)
    raise TypeError(f"not a float scale dtype: {values.dtype}")


def nibbles_of_words(words: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """Split int32 words along the last axis into 8 nibbles each, LSB first, placed by `order`."""
    w = words.view(np.uint32)
    nib = (w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    out = np.empty_like(nib)
    out[..., list(order)] = nib
    return out.reshape(*w.shape[:-1], w.shape[-1] * 8).astype(np.uint8)


def nibbles_of_bytes(packed: np.ndarray) -> np.ndarray:
    """Split uint8 bytes along the last axis, low nibble = even element."""
    out = np.stack([packed & 0xF, packed >> 4], axis=-1)
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def int4_dequant(q: np.ndarray, z: np.ndarray, s: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """`(q - z[:, g]) * s[:, g]` with q `[out, in]` and z, s `[out, groups]`, g = g_idx[in]."""
    diff = q.astype(np.int32) - z.astype(np.int32)[:, g_idx]
    return diff.astype(np.float32) * widen(s)[:, g_idx]


# compressed-tensors pack-quantized (FORMATS.md §1)

def unpack_ct_int4(
    weight_packed: np.ndarray,
    weight_shape: np.ndarray,
    weight_zero_point: np.ndarray | None = None,
    n_groups: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored nibbles (= signed value + 8) of the weight `[out, in]` and of the zero points
    `[out, groups]` (packed along dim 0), or None when symmetric."""
    out_f, in_f = (int(v) for v in weight_shape)
    q = nibbles_of_words(weight_packed)[:, :in_f]
    if weight_zero_point is None:
        return q, None
    z = nibbles_of_words(np.ascontiguousarray(weight_zero_point.T))[:, :out_f].T
    if n_groups is not None:
        z = z[:, :n_groups]
    return q, np.ascontiguousarray(z)


def dequant_ct_int4(
    weight_packed: np.ndarray,
    weight_scale: np.ndarray,
    weight_shape: np.ndarray,
    weight_zero_point: np.ndarray | None = None,
) -> np.ndarray:
    q, z = unpack_ct_int4(weight_packed, weight_shape, weight_zero_point, weight_scale.shape[1])
    in_f = q.shape[1]
    g_idx = np.arange(in_f) // (in_f // weight_scale.shape[1])
    if z is None:
        z = np.full(weight_scale.shape, 8, dtype=np.uint8)  # both offsets are +8: they cancel
    return int4_dequant(q, z, weight_scale, g_idx)


# GPTQ qweight/qzeros/scales/g_idx (FORMATS.md §2a)

def unpack_gptq(
    qweight: np.ndarray, qzeros: np.ndarray, checkpoint_format: str
) -> tuple[np.ndarray, np.ndarray]:
    """Codes `[out, in]` and plain (v2) zero points `[groups, out]`.

    v1 is turned into v2 the way GPTQModel's loader does it: add 0x11111111 to each int32
    word, so a stored 0xF (zero 0 minus one) carries into the next nibble."""
    q = nibbles_of_words(np.ascontiguousarray(qweight.T))
    if checkpoint_format == "gptq":
        words = (qzeros.view(np.uint32).astype(np.uint64) + GPTQ_V1_ZERO_OFFSET) & 0xFFFFFFFF
        qzeros = words.astype(np.uint32).view(np.int32)
    elif checkpoint_format != "gptq_v2":
        raise ValueError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
    return q, nibbles_of_words(qzeros)


def dequant_gptq(
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray,
    checkpoint_format: str,
) -> np.ndarray:
    q, z = unpack_gptq(qweight, qzeros, checkpoint_format)
    return int4_dequant(q, z.T, scales.T, g_idx.astype(np.int64))


# AWQ GEMM (FORMATS.md §3)

def unpack_awq(qweight: np.ndarray, qzeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes `[in, out]` and zero points `[groups, out]`, undoing the column interleave."""
    return nibbles_of_words(qweight, AWQ_NIBBLE_COLUMN), nibbles_of_words(qzeros, AWQ_NIBBLE_COLUMN)


def dequant_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    q, z = unpack_awq(qweight, qzeros)
    in_f = q.shape[0]
    g_idx = np.arange(in_f) // (in_f // scales.shape[0])
    return int4_dequant(q.T, z.T, scales.T, g_idx)


# MXFP4 (FORMATS.md §4: Quark `weight`, compressed-tensors `weight_packed`, gpt-oss `_blocks`)

def e8m0_values(scales: np.ndarray) -> np.ndarray:
    """2^(s - 127) as float32 (0xFF, NaN in E8M0, never occurs in these checkpoints)."""
    return np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127).astype(np.float32)


def dequant_mxfp4(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """e2m1 code value times its block's E8M0 scale; packed `[..., in/2]`, scales `[..., in/32]`."""
    values = E2M1_VALUES[nibbles_of_bytes(packed)]
    return values * np.repeat(e8m0_values(scales), 32, axis=-1)


def dequant_gptoss_experts(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """gpt-oss `*_blocks [E, out, in/32, 16]` + `*_scales [E, out, in/32]` -> `[E, out, in]`."""
    e, out_f, nblk, nbytes = blocks.shape
    return dequant_mxfp4(blocks.reshape(e, out_f, nblk * nbytes), scales)


def split_gate_up(fused: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss interleaves gate/up rows: gate = even rows, up = odd rows (axis -2)."""
    return fused[..., 0::2, :], fused[..., 1::2, :]
