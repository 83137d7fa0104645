"""Pure-torch reference of every op in :mod:`moeprep.ops`, written from docs/layouts.md.

Each layout is the index formula of the layout spec as a view/permute, spelled out; each inverse
is its own view/permute, not the forward run backwards. Slow and memory-hungry (int4 codes are
expanded), but obviously correct: the tests and ``moeprep verify`` compare the compiled ops with
these. No argument checking beyond what the views themselves enforce.
"""
from __future__ import annotations

import torch

from ..canonical import unpack_codes
from ..formats.packing import to_canonical

E8M0_PAD = 0x7F  # 2^0 = 1.0: the value written into scale padding

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _permuted(x: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    """x viewed as `view`, permuted by `perm`, materialized, same shape and dtype as x.

    Works on an integer view of the same element size, so any dtype (fp4x2, e8m0, bf16) moves.
    """
    xi = x.view(_SAME_SIZE_INT[x.element_size()])
    return xi.reshape(view).permute(perm).contiguous().view(x.shape).view(x.dtype)


# ---- (16,16) weight shuffle -------------------------------------------------------------------
def shuffle_weight(
    x: torch.Tensor,
    layout: tuple[int, int] = (16, 16),
    use_int4: bool = False,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    assert tuple(layout) == (16, 16)
    if is_guinterleave:
        e, n, k = x.shape
        if gate_up:
            return _permuted(x, (e, 2, n // 32, 16, k // 64, 4, 16), (0, 2, 1, 4, 5, 3, 6))
        return _permuted(x, (e, n // 16, 16, k // 64, 4, 16), (0, 1, 3, 4, 2, 5))
    n, k = x.shape[-2:]
    kin = 32 if use_int4 else 16 // x.element_size()
    return _permuted(x, (-1, n // 16, 16, k // 32, 32 // kin, kin), (0, 1, 3, 4, 2, 5))


def unshuffle_weight(
    y: torch.Tensor,
    layout: tuple[int, int] = (16, 16),
    use_int4: bool = False,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    assert tuple(layout) == (16, 16)
    if is_guinterleave:
        e, n, k = y.shape
        if gate_up:
            return _permuted(y, (e, n // 32, 2, k // 64, 4, 16, 16), (0, 2, 1, 5, 3, 4, 6))
        return _permuted(y, (e, n // 16, k // 64, 4, 16, 16), (0, 1, 4, 2, 3, 5))
    n, k = y.shape[-2:]
    kin = 32 if use_int4 else 16 // y.element_size()
    return _permuted(y, (-1, n // 16, k // 32, 32 // kin, 16, kin), (0, 1, 4, 2, 3, 5))


# ---- E8M0 scale shuffles ----------------------------------------------------------------------
def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def _padded(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.full((rows, cols), E8M0_PAD, dtype=torch.uint8).view(s.dtype)
    out[: s.shape[0], : s.shape[1]] = s
    return out


def shuffle_scale(
    s: torch.Tensor, experts_cnt: int | None = None, is_guinterleave: bool = False, gate_up: bool = False
) -> torch.Tensor:
    m, ks = s.shape
    if not is_guinterleave:
        p = _padded(s, _ceil(m, 256), _ceil(ks, 8))
        mp, kp = p.shape
        return _permuted(p, (mp // 32, 2, 16, kp // 8, 2, 4), (0, 3, 5, 2, 4, 1))
    e = experts_cnt
    n = m // e
    p = _padded(s, m, _ceil(ks, 8))
    kp = p.shape[1]
    if gate_up:
        return _permuted(p, (e, 2, n // 32, 16, kp // 8, 2, 4), (0, 2, 4, 6, 3, 5, 1))
    return _permuted(p, (e, n // 32, 2, 16, kp // 8, 2, 4), (0, 1, 4, 6, 3, 5, 2))


def unshuffle_scale(
    y: torch.Tensor,
    shape: tuple[int, int],
    experts_cnt: int | None = None,
    is_guinterleave: bool = False,
    gate_up: bool = False,
) -> torch.Tensor:
    m, ks = shape
    mp, kp = y.shape
    if not is_guinterleave:
        full = _permuted(y, (mp // 32, kp // 8, 4, 16, 2, 2), (0, 5, 3, 1, 4, 2))
    else:
        e = experts_cnt
        n = m // e
        perm = (0, 6, 1, 4, 2, 5, 3) if gate_up else (0, 1, 6, 4, 2, 5, 3)
        full = _permuted(y, (e, n // 32, kp // 8, 4, 16, 2, 2), perm)
    return full[:m, :ks].contiguous()


# ---- int4 helpers -----------------------------------------------------------------------------
def int4_to_int8(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    nib = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2).to(torch.int8)
    return nib - 8 if signed else nib


def int8_to_int4(v: torch.Tensor, signed: bool) -> torch.Tensor:
    q = (v.to(torch.int16) + (8 if signed else 0)) & 0xF
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def pack_int4_per8(v: torch.Tensor) -> torch.Tensor:
    g = (v.to(torch.int16) & 0xF).unflatten(-1, (-1, 2, 4))  # [..., K/8, (v0..v3 | v4..v7)]
    return (g[..., 0, :] | (g[..., 1, :] << 4)).to(torch.uint8).flatten(-2)


def unpack_int4_per8(b: torch.Tensor, signed: bool) -> torch.Tensor:
    g = b.unflatten(-1, (-1, 4))
    nib = torch.stack([g & 0xF, g >> 4], dim=-2).flatten(-3).to(torch.int8)  # [..., K]
    return ((nib ^ 8) - 8) if signed else nib


def preshuffle_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    return pack_int4_per8(shuffle_weight(int4_to_int8(codes, signed)))


def unpreshuffle_int4(y: torch.Tensor, signed: bool) -> torch.Tensor:
    return int8_to_int4(unshuffle_weight(unpack_int4_per8(y, signed)), signed)


def shuffle_scale_w4a16(s: torch.Tensor) -> torch.Tensor:
    e, n, g = s.shape
    t = s.transpose(1, 2).contiguous()  # [E, G, N]
    return _permuted(t, (e, g // 2, 2, n), (0, 1, 3, 2))


def unshuffle_scale_w4a16(y: torch.Tensor) -> torch.Tensor:
    e, g, n = y.shape
    t = _permuted(y, (e, g // 2, n, 2), (0, 1, 3, 2))  # [E, G, N]
    return t.transpose(1, 2).contiguous()


# ---- repack_into ------------------------------------------------------------------------------
def source_codes(src: torch.Tensor, src_packing: str) -> torch.Tensor:
    """Unsigned 4-bit codes of a repack_into source as int64 [n, K] (row = output channel): the
    readers' own torch unpacking of each source packing (``moeprep.formats.packing``)."""
    return unpack_codes(to_canonical(src, src_packing)).to(torch.int64)


def _canonical_bytes(codes: torch.Tensor) -> torch.Tensor:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


_TO_LAYOUT = {
    "canonical": (lambda c, gu: c, lambda y, gu: y),
    "shuffle": (lambda c, gu: shuffle_weight(c), lambda y, gu: unshuffle_weight(y)),
    "guinterleave": (
        lambda c, gu: shuffle_weight(c, is_guinterleave=True, gate_up=gu),
        lambda y, gu: unshuffle_weight(y, is_guinterleave=True, gate_up=gu),
    ),
    "w4a16_signed": (lambda c, gu: preshuffle_int4(c, True), lambda y, gu: unpreshuffle_int4(y, True)),
    "w4a16_unsigned": (lambda c, gu: preshuffle_int4(c, False), lambda y, gu: unpreshuffle_int4(y, False)),
}


def decode_layout(y: torch.Tensor, layout: str, gate_up: bool = False) -> torch.Tensor:
    """Reference of :func:`moeprep.ops.decode_layout`."""
    return _TO_LAYOUT[layout][1](y, gate_up)


def repack_into(
    dst: torch.Tensor,
    src: torch.Tensor,
    *,
    src_packing: str,
    layout: str,
    expert: int,
    row_offset: int = 0,
    gate_up: bool = False,
    row_index: torch.Tensor | None = None,
    col_index: torch.Tensor | None = None,
) -> None:
    """Decodes dst to canonical codes, writes the rows, re-encodes the whole of dst."""
    codes = source_codes(src, src_packing)
    if row_index is not None:
        codes = codes[row_index]
    if col_index is not None:
        codes = codes[:, col_index]
    forward, inverse = _TO_LAYOUT[layout]
    canonical = inverse(dst, gate_up).clone()
    canonical[expert, row_offset : row_offset + codes.shape[0]] = _canonical_bytes(codes)
    dst.copy_(forward(canonical, gate_up))
