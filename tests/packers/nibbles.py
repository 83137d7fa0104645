"""Packing of 4-bit codes (0..15) into int32 words or uint8 bytes, along the last axis.

Only the packing direction lives here; unpacking is the oracle's job, written separately.
"""

from __future__ import annotations

import numpy as np

SEQUENTIAL = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p (LSB first) of a word holds column 8w + AWQ_ORDER[p]


def pack_words(codes: np.ndarray, order: tuple[int, ...] = SEQUENTIAL) -> np.ndarray:
    """`[..., n]` codes -> int32 `[..., n/8]`; nibble p of word w holds element 8w + order[p]."""
    if codes.shape[-1] % 8:
        raise ValueError(f"cannot pack {codes.shape[-1]} nibbles into whole int32 words")
    c = codes.astype(np.uint32).reshape(*codes.shape[:-1], -1, 8)[..., list(order)]
    words = np.zeros(c.shape[:-1], dtype=np.uint32)
    for p in range(8):
        words |= c[..., p] << np.uint32(4 * p)
    return words.view(np.int32)


def pack_bytes(codes: np.ndarray) -> np.ndarray:
    """`[..., n]` codes -> uint8 `[..., n/2]`, low nibble = even element."""
    c = codes.astype(np.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def subtract_per_nibble_one(words: np.ndarray) -> np.ndarray:
    """GPTQModel's v2 -> v1 qzeros conversion: `word - 0x11111111` on the whole int32 word.

    It is not a per-nibble "zero - 1": a zero point of 0 borrows from the next nibble (and the
    top nibble wraps), and the reader's word-level `+ 0x11111111` carries it back."""
    w = words.view(np.uint32).astype(np.int64) - 0x11111111
    return (w & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def pack_source(codes: np.ndarray, packing: str) -> np.ndarray:
    """Codes ``[n, K]`` (row = output channel) in one of the source packings that
    ``moeprep.ops.repack_into`` reads: canonical bytes, or compressed-tensors / GPTQ / AWQ words."""
    if packing == "canonical":
        out = pack_bytes(codes)
    elif packing == "ct_int32":
        out = pack_words(codes)
    elif packing == "gptq_int32":
        out = pack_words(codes).T
    elif packing == "awq_int32":
        out = pack_words(np.ascontiguousarray(codes.T), AWQ_ORDER)
    else:
        raise ValueError(f"unknown packing {packing!r}")
    return np.ascontiguousarray(out)
