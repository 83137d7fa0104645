"""Source packings of 4-bit codes, and their (torch) unpacking to the canonical ``[N, K/2]``.

This is the plain, readable path used to read sources and to verify conversions. The converter
itself uses the fused C++ path (``moeprep.ops.repack_into``) with the same packing names.
"""
from __future__ import annotations

from ..lazy import torch

from ..canonical import pack_codes, unpack_codes

# AWQ GEMM stores column 8w + (0, 2, 4, 6, 1, 3, 5, 7)[p] in nibble p of word w: nibble 4a + b
# holds column 2b + a, so the natural order is the (2, 4) -> (4, 2) transpose of each group of 8.

def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 8W]``: nibble i of each word, LSB first.

    On a little-endian machine a word's bytes hold its nibbles (0, 1), (2, 3), ... low first, so
    this is the byte view split into low and high nibbles.
    """
    return unpack_codes(words.contiguous().view(torch.uint8))


def awq_natural_order(nibbles: torch.Tensor) -> torch.Tensor:
    """Undo AWQ's interleave on unpacked nibbles ``[..., 8W]`` (groups of 8 along the last dim)."""
    shape = nibbles.shape
    return nibbles.reshape(*shape[:-1], shape[-1] // 8, 2, 4).transpose(-1, -2).reshape(shape)


def _bytes_of_words(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, W]`` -> uint8 ``[R, 4W]`` in memory order (little-endian: nibble 0 is low)."""
    return words.contiguous().view(torch.uint8)


def to_canonical(packed: torch.Tensor, packing: str) -> torch.Tensor:
    if packing == "canonical":
        return packed.contiguous()
    if packing == "ct_int32":  # [N, K/8], element j in nibble j % 8: already canonical bytes
        return _bytes_of_words(packed)
    if packing == "gptq_int32":  # [K/8, N]: each word holds 8 consecutive k of one column
        return _bytes_of_words(packed.t())
    if packing == "awq_int32":  # [K, N/8], interleaved along N
        q = awq_natural_order(unpack_nibbles(packed))  # [K, N]
        return pack_codes(q.t())
    raise ValueError(f"unknown packing {packing!r}")
