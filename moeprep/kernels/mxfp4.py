"""Dequantization of the MXFP4 targets (``mxfp4_preshuffle``, ``mxfp4_moe``) in registers.

Stored form (LAYOUTS.md): fp4x2 bytes (16,16)-shuffled in 16-row x 16-byte blocks, so the int32
word ``c`` (8 consecutive k) of row ``n`` holds value ``j`` in bits ``4j``; ``mxfp4_moe``
alternates the 16-row blocks of gate and up. E8M0 scales, one per 32 k, sit in 32-row x 8-group
tiles of 256 bytes: ``s[m, g]`` at ``(m // 32) * 32 * Ks' + (g // 8) * 256 + (g % 4) * 64 +
(m % 16) * 4 + ((g // 4) % 2) * 2 + (m // 16) % 2`` where ``Ks'`` is the padded group count and
``m`` counts stored 16-row blocks (the interleaved shuffle puts gate/up where ``(m // 16) % 2`` is).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._triton import join8, moved, packed_e2m1

WORDS_PER_STRIP = tl.constexpr(4)  # words per row in each 16-row x 16-byte block of the shuffle


@triton.jit
def _value(words, SHIFT: tl.constexpr, scale):
    h = (moved(words, SHIFT, 9) & 0x0E00) | (moved(words, SHIFT + 3, 15) & 0x8000)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * scale


@triton.jit
def dequant(words, s_ptr, block, row_in_block, row_ok, g, KSP, OUT: tl.constexpr):
    """words int32 ``[BN, NG, CPG]`` (row, group, word in group) -> ``[BN, NG, CPG, 2, 2, 2]`` (the
    last three dims are the word's 8 values in k order) in OUT: fp32 (portable) or bf16 (CUDA,
    two values per instruction, see ``_triton.packed_e2m1``).

    ``block`` is each row's stored 16-row block counted over all experts. An E2M1 code moved to
    bits 9..11 (magnitude) and 15 (sign) of an fp16 is that value times 2^-14, subnormals
    included, so the decode is exact without a table; the E8M0 scale, times 2^14, undoes it.
    """
    off = ((block // 2) * (32 * KSP) + (row_in_block * 4 + block % 2))[:, None] \
        + ((g // 8) * 256 + (g % 4) * 64 + ((g // 4) % 2) * 2)[None, :]
    e8 = tl.load(s_ptr + off, mask=row_ok[:, None], other=127).to(tl.int32)
    if OUT == tl.float32:
        s = ((e8 << 23).to(tl.float32, bitcast=True) * 16384.0)[:, :, None]
        w = join8(_value(words, 0, s), _value(words, 4, s), _value(words, 8, s), _value(words, 12, s),
                  _value(words, 16, s), _value(words, 20, s), _value(words, 24, s), _value(words, 28, s))
    else:  # the scale 2^(e8 - 127) is exact in bf16, which has fp32's exponents
        v = packed_e2m1(words, (e8 << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)[:, :, None])
        w = join8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7])
    return w
