"""Dequantization of the w4a16 targets (``w4a16_preshuffle``, ``w4a16_preshuffle_zp``) in registers.

Stored form (LAYOUTS.md): int4 values ``[E, N, K]`` (16,16)-shuffled as int8 then packed 8 per
4 bytes, so the int32 word ``c`` (8 consecutive k) of row ``n`` holds value ``j`` in bits
``8 * (j % 4) + 4 * (j // 4)``; the signed target stores ``q ^ 8``. Scales and zero points are
``[E, G, N]`` with each pair of groups interleaved per row: ``(g // 2) * 2N + 2n + g % 2``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton import join8, moved, packed_nibbles

WORDS_PER_STRIP = tl.constexpr(2)  # words per row in each 16-row x 16-value block of the shuffle
_ONE = tl.constexpr(0x3F800000)  # fp32 1.0; a code q in mantissa bits 19..22 makes it 1 + q / 16, exactly
_CODE_BITS = tl.constexpr(0xF << 19)
_FLIP_SIGNS = tl.constexpr(-0x77777778)  # 0x88888888 as int32: q ^ 8 in every nibble


@triton.jit
def _value(words, SHIFT: tl.constexpr, scale16, bias):
    f = ((moved(words, SHIFT, 19) & _CODE_BITS) | _ONE).to(tl.float32, bitcast=True)
    # (1 + q/16) * 16s - (16 + z)s = (q - z)s: every product and the difference are exact in fp32
    return f * scale16 - bias


@triton.jit
def _scales(s_ptr, z_ptr, expert, rows, row_ok, g, N, G, HAS_ZP: tl.constexpr):
    """(scale, zero point) of each row and group, ``[BN, NG]``, as stored (zero point 8 if none)."""
    off = expert * G * N + rows[:, None] * 2 + ((g // 2) * (2 * N) + g % 2)[None, :]
    s = tl.load(s_ptr + off, mask=row_ok[:, None], other=0.0)
    if HAS_ZP:
        z = tl.load(z_ptr + off, mask=row_ok[:, None], other=0).to(tl.int32)
    else:
        z = tl.full(s.shape, 8, tl.int32)
    return s, z


@triton.jit
def dequant(words, s_ptr, z_ptr, expert, rows, row_ok, g, N, G, SIGNED: tl.constexpr, HAS_ZP: tl.constexpr,
            OUT: tl.constexpr):
    """words int32 ``[BN, NG, CPG]`` (row, group, word in group) -> ``[BN, NG, CPG, 2, 2, 2]`` (the
    last three dims are the word's 8 values in k order) in OUT.

    OUT fp32 is the portable decode. OUT bf16 (CUDA only, bf16 scales) decodes two values per
    instruction: each nibble lands in the mantissa of the bf16 128, whose unit in the last place
    is 1, so ``(128 + q) - (128 + z)`` is exact and one rounding of its product with the scale
    gives the bf16 of the exact ``(q - z) * s``.
    """
    if SIGNED:
        words = words ^ _FLIP_SIGNS
    s, z = _scales(s_ptr, z_ptr, expert, rows, row_ok, g, N, G, HAS_ZP)
    # value j of a word sits in bits 8 * (j % 4) + 4 * (j // 4): byte j % 4, nibble j // 4
    if OUT == tl.float32:
        b = ((16.0 + z.to(tl.float32)) * s.to(tl.float32))[:, :, None]
        s = (16.0 * s.to(tl.float32))[:, :, None]
        w = join8(_value(words, 0, s, b), _value(words, 8, s, b), _value(words, 16, s, b), _value(words, 24, s, b),
                  _value(words, 4, s, b), _value(words, 12, s, b), _value(words, 20, s, b), _value(words, 28, s, b))
    else:
        v = packed_nibbles(words, s[:, :, None], (z + 128).to(tl.bfloat16)[:, :, None])
        w = join8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7])
    return w
