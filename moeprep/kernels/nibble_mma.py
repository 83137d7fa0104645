"""The weights as the MMA's register operand, one MMA per nibble half (``GemmConfig.nibbles``).

With swapped operands (see ``moe_gemm._product``) the decoded weight tile is the first operand
of Hopper's wgmma, which takes it from registers. Decoded from int32 words it has to be moved
between threads into the operand layout, through shared memory: 4 bytes written and read per
4-bit code, which bounds the decode GEMMs (the H200 profile shows the L1/shared-memory pipe
busy and DRAM at a third of its bandwidth). Here the codes are loaded as bytes, Triton places
them straight in the operand layout, and each byte feeds two MMAs over half the tile's k: its
low nibbles and its high nibbles, each decoded on its own by one instruction per two values
into the exact integer ``128 + u`` (or the E2M1 value). A tile lies inside one scale group, and
the group's scale and zero point apply to the MMA's result:
``acc += s * (t - (128 + z) * sum_k a)``, per weight row and token.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import mxfp4, w4a16
from ._triton import mma, packed_e2m1_bytes, packed_u4_bytes

@triton.jit
def byte_ptrs(w_ptr, expert, rows, blocks, N, K, MX: tl.constexpr, BK: tl.constexpr):
    """uint8 pointers ``[BN, BK / 2]`` to the code bytes of ``W[rows, 0:BK]``, byte i of a row
    being byte ``i % 4`` of its word ``i // 4``; those of columns ``k0:k0+BK`` are ``8 * k0``
    bytes further."""
    CPB: tl.constexpr = mxfp4.WORDS_PER_STRIP if MX else w4a16.WORDS_PER_STRIP
    RUN: tl.constexpr = min(4 * CPB, BK // 2)  # contiguous bytes of a row
    i = tl.arange(0, BK // 2)
    word = i // 4
    col = ((word // CPB) * (16 * CPB) + word % CPB) * 4 + i % 4
    col = tl.max_contiguous(tl.multiple_of(col, RUN), RUN)
    row_off = (blocks * (2 * K) + (rows % 16) * CPB) * 4
    return w_ptr.to(tl.pointer_type(tl.uint8)) + expert * (N * (K // 8)) * 4 + row_off[:, None] + col[None, :]


@triton.jit
def _halves(b, MX: tl.constexpr, SIGNED: tl.constexpr, DT: tl.constexpr, PACKED: tl.constexpr):
    """Code bytes ``[BN, BK / 2]`` -> (low, high) nibble values in DT: ``128 + u`` for int4 (u
    the unsigned code), the E2M1 value for MXFP4; all exact."""
    if PACKED:
        if MX:
            lo, hi = packed_e2m1_bytes(b)
        else:
            lo, hi = packed_u4_bytes(b, SIGNED)
    else:
        x = b.to(tl.int32)
        if SIGNED:
            x = x ^ 0x88
        if MX:
            lo = _e2m1(x & 0xF)
            hi = _e2m1(x >> 4)
        else:  # through fp32: the interpreter casts integers to bf16 bit for bit
            lo = ((x & 0xF) + 128).to(tl.float32)
            hi = ((x >> 4) + 128).to(tl.float32)
        lo = lo.to(DT)
        hi = hi.to(DT)
    return lo, hi


@triton.jit
def _e2m1(code):
    """An E2M1 code's value in fp32: its magnitude bits moved to bits 9..11 and its sign to bit 15
    of an fp16 give the value times 2^-14, subnormals included."""
    h = ((code & 7) << 9) | ((code & 8) << 12)
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32) * 16384.0


@triton.jit
def _split(a, MX: tl.constexpr):
    """Activations ``[BM, BK]`` -> those of each byte's (low, high) nibble, ``[BM, BK / 2]`` each."""
    BM: tl.constexpr = a.shape[0]
    BK: tl.constexpr = a.shape[1]
    if MX:  # byte i holds k = 2i and 2i + 1
        pairs = tl.reshape(a, (BM, BK // 2, 2))
    else:  # byte b of word c holds k = 8c + b and 8c + b + 4
        pairs = tl.reshape(tl.permute(tl.reshape(a, (BM, BK // 8, 2, 4)), (0, 1, 3, 2)), (BM, BK // 2, 2))
    return tl.split(pairs)


@triton.jit
def product(a, ptrs, k0, s_ptr, z_ptr, expert, rows, row_ok, blocks, N, G, KSP, acc, MX: tl.constexpr,
            SIGNED: tl.constexpr, HAS_ZP: tl.constexpr, GS: tl.constexpr, PACKED: tl.constexpr):
    """``acc += a @ W[rows, k0:k0+BK]^T`` with the transposed accumulator ``[BN, BM]``; the tile
    lies inside scale group ``k0 // GS``. MX: MXFP4 (else int4, SIGNED or with zero points
    HAS_ZP); scales and zero points as ``mxfp4.dequant`` and ``w4a16.dequant`` read them."""
    b = tl.load(ptrs + 8 * k0, mask=row_ok[:, None], other=0)
    w_lo, w_hi = _halves(b, MX, SIGNED, a.dtype, PACKED)
    a_lo, a_hi = _split(a, MX)
    t = mma(w_lo, tl.trans(a_lo), tl.zeros(acc.shape, tl.float32))
    t = mma(w_hi, tl.trans(a_hi), t)
    g = k0 // GS
    if MX:
        block = expert * (N // 16) + blocks  # stored 16-row blocks counted over all experts
        off = (block // 2) * (32 * KSP) + (rows % 16) * 4 + block % 2 + ((g // 8) * 256 + (g % 4) * 64 + ((g // 4) % 2) * 2)
        e8 = tl.load(s_ptr + off, mask=row_ok, other=127).to(tl.int32)
        acc += (e8 << 23).to(tl.float32, bitcast=True)[:, None] * t
    else:
        off = expert * G * N + rows * 2 + ((g // 2) * (2 * N) + g % 2)
        s = tl.load(s_ptr + off, mask=row_ok, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_ptr + off, mask=row_ok, other=0).to(tl.float32)
        else:
            z = tl.full(s.shape, 8.0, tl.float32)
        a_sum = tl.sum(a.to(tl.float32), axis=1)
        acc += s[:, None] * (t - (128.0 + z)[:, None] * a_sum[None, :])
    return acc
