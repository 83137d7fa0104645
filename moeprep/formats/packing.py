"""Source packings of 4-bit codes, and their (torch) unpacking to the canonical ``[N, K/2]``.

This is the plain, readable path used to read sources and to verify conversions. The converter
itself uses the fused C++ path (``moeprep.ops.repack_into``) with the same packing names.
"""
from __future__ import annotations

from ..lazy import torch

from ..canonical import pack_codes, unpack_codes

# AWQ GEMM stores column 8w + (0, 2, 4, 6, 1, 3, 5, 7)[p] in nibble p of word w: column c of a
# word sits in nibble AWQ_NIBBLE_OF_COLUMN[c].
AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)

def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., W]`` -> uint8 ``[..., 8W]``: nibble i of each word, LSB first.

    On a little-endian machine a word's bytes hold its nibbles (0, 1), (2, 3), ... low first, so
    this is the byte view split into low and high nibbles.
    """
    return unpack_codes(words.contiguous().view(torch.uint8))


def awq_natural_words(words: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 words with their nibbles moved into column order (nibble c = column 8w + c).

    Nibbles (0..7) hold columns (0, 2, 4, 6, 1, 3, 5, 7): column order interleaves the low four
    nibbles with the high four, a perfect shuffle, done as two swaps of bit fields on whole words
    (nibbles 2-3 with 4-5, then 1 with 2 and 5 with 6). No intermediate leaves bits 0-27 of a
    shift, so the signed int32 arithmetic never overflows."""
    x = words
    for shift, mask in ((8, 0x0000FF00), (4, 0x00F000F0)):
        t = ((x >> shift) ^ x) & mask
        x = x ^ t ^ (t << shift)
    return x


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
        q = unpack_nibbles(awq_natural_words(packed))  # [K, N]
        return pack_codes(q.t())
    raise ValueError(f"unknown packing {packing!r}")
