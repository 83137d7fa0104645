"""Triton, and the two spots where Triton's CPU interpreter differs from the compiled kernels.

The interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels on CPU) multiplies bf16
operands of ``tl.dot`` as raw 16-bit integers, truncates fp32 to bf16 instead of rounding, and has
no 16-bit float atomics; :func:`mma`, :func:`rounded` and :func:`accumulate` route around these
there and compile to the plain instructions on a GPU.
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
