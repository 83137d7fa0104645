"""Triton, the spots where Triton's CPU interpreter differs from the compiled kernels, and the
CUDA-only packed decodes.

The interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels on CPU) multiplies bf16
operands of ``tl.dot`` as raw 16-bit integers, truncates fp32 to bf16 instead of rounding, and has
no 16-bit float atomics; :func:`mma`, :func:`rounded` and :func:`accumulate` route around these
there and compile to the plain instructions on a GPU.

:func:`packed_nibbles` and :func:`packed_e2m1` decode 4-bit codes two at a time into bf16 pairs
with PTX (``prmt``, ``lop3``, ``fma.rn.bf16x2``): under half the instructions of the portable fp32
decode, which bounds the GEMMs' throughput. Only the compiled CUDA kernels call them (and
:func:`launch_dependents`); the interpreter and HIP take the portable path.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRET = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b`` in fp32."""
    if _INTERPRET:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even."""
    if _INTERPRET and dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def moved(x, FROM: tl.constexpr, TO: tl.constexpr):
    """x shifted so that its bit FROM lands on bit TO."""
    if TO >= FROM:
        return x << (TO - FROM)
    return x >> (FROM - TO)


@triton.jit
def join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight same-shape tensors -> shape + [2, 2, 2], element ``[a, b, c]`` of the new dims being
    ``v(4a + 2b + c)``.

    Each thread keeps the eight values side by side (joins add register-local dims), so a reshape
    to consecutive k hands the MMA operand conversion whole 16-byte runs. A join appends its dim
    last, so the first join picks the high bit.
    """
    return tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))


@triton.jit
def accumulate(ptrs, val, mask):
    """``*ptrs += val`` from many programs at once (atomic on the GPU)."""
    if _INTERPRET:
        # interpreted programs run one after another: a read-modify-write is race free
        cur = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, rounded(cur + val, ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, val.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")


def _spread(b: int) -> str:
    """prmt selector copying byte b of the first word to bytes 0-1 and of the second to bytes 2-3,
    so that the byte's nibbles of two words sit at the same bits of each 16-bit half."""
    return f"0x{4 + b:x}{4 + b:x}{b:x}{b:x}"


def _nibbles_asm() -> str:
    # $0-$7: value j of both words; $8, $9: the words; $10: scale pair; $11: (128 + zero) pair.
    # 0x4300 | q is the bf16 128 + q; 0xBF80 is -1.0 and 0x8000 -0.0
    lines = [".reg .b32 t, x, m, n1, nz;", "mov.b32 m, 0x43004300;", "mov.b32 n1, 0xBF80BF80;",
             "mov.b32 nz, 0x80008000;"]
    for b in range(4):  # byte b holds value b (low nibble) and b + 4
        lines.append(f"prmt.b32 t, $8, $9, {_spread(b)};")
        for out, shift in ((b, 0), (b + 4, 4)):
            # (x & 0x000F000F) | m in one lop3 (0xEA = (a & b) | c)
            lines += [f"shr.u32 x, t, {shift};" if shift else "mov.b32 x, t;", "lop3.b32 x, x, 0x000F000F, m, 0xEA;",
                      "fma.rn.bf16x2 x, $11, n1, x;", f"fma.rn.bf16x2 ${out}, x, $10, nz;"]
    return "{\n" + "\n".join(lines) + "\n}"


def _e2m1_asm() -> str:
    # $0-$7: value j of both words; $8, $9: the words; $10: scale pair. A code's magnitude bits in
    # bits 6-8 of a bf16 and its sign in bit 15 make the value times 2^-126, subnormals included
    lines = [".reg .b32 t, x, y, k, nz;", "mov.b32 k, 0x7E807E80;", "mov.b32 nz, 0x80008000;"]
    for b in range(4):  # byte b holds value 2b (low nibble) and 2b + 1
        lines.append(f"prmt.b32 t, $8, $9, {_spread(b)};")
        for out, shift in ((2 * b, 0), (2 * b + 1, 4)):
            # (x & 0x01C001C0) | (y & 0x80008000) as and + lop3 (0xF8 = a | (b & c))
            lines += [f"shl.b32 x, t, {6 - shift};", "and.b32 x, x, 0x01C001C0;", f"shl.b32 y, t, {12 - shift};",
                      "lop3.b32 x, x, y, 0x80008000, 0xF8;", "fma.rn.bf16x2 x, x, k, nz;",
                      f"fma.rn.bf16x2 ${out}, x, $10, nz;"]
    return "{\n" + "\n".join(lines) + "\n}"


_NIBBLES_BF16 = tl.constexpr(_nibbles_asm())
_E2M1_BF16 = tl.constexpr(_e2m1_asm())
_NIBBLES_ARGS = tl.constexpr("=r," * 8 + "r,r,r,r")
_BF16_X8 = tl.constexpr((tl.bfloat16,) * 8)
_E2M1_ARGS = tl.constexpr("=r," * 8 + "r,r,r")


@triton.jit
def packed_nibbles(words, scale, offset):
    """int32 words of 8 unsigned int4 codes (value j in bits ``8 * (j % 4) + 4 * (j // 4)``) -> the
    8 bf16 tensors ``(128 + q_j - offset) * scale``; scale and offset (``128 + zero point``) are
    bf16 and broadcast against words."""
    return tl.inline_asm_elementwise(_NIBBLES_BF16, _NIBBLES_ARGS, [words, scale, offset], _BF16_X8, is_pure=True,
                                     pack=2)


@triton.jit
def packed_e2m1(words, scale):
    """int32 words of 8 E2M1 codes (value j in bits ``4j``) -> the 8 bf16 tensors ``value_j * scale``
    (scale bf16, a power of two, broadcast against words)."""
    return tl.inline_asm_elementwise(_E2M1_BF16, _E2M1_ARGS, [words, scale], _BF16_X8, is_pure=True, pack=2)


@triton.jit
def launch_dependents():
    """Lets the next kernel on the stream start now if it was launched as a programmatic dependent
    (``griddepcontrol.launch_dependents``, CUDA sm_90+ only): ``gdc_launch_dependents`` of
    ``triton.language.extra.cuda``, which builds of Triton without the CUDA backend do not ship."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


@triton.jit
def opaque(x):
    """x, through an identity the compiler cannot see into (free after ptxas). Triton 3.6 fails
    ("Illegal shared layout") when it folds a reshape into the shared-memory store of a wgmma
    operand, as it tries for the decoded [BN, BK] tile; this keeps the two apart."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], x.dtype, is_pure=True, pack=2)
