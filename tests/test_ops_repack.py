"""moeprep.ops.repack_into (CPU): every source packing x every layout, with and without the
desc_act gathers, against the reference; the sources are packed by the independent test packers
(tests/packers/nibbles.py, validated against the real fixtures), never by moeprep."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from packers.nibbles import pack_bytes, pack_source

from moeprep import ops
from moeprep.errors import TargetError
from moeprep.ops import reference as ref

LAYOUTS = [("canonical", False), ("shuffle", False), ("guinterleave", False), ("guinterleave", True),
           ("w4a16_signed", False), ("w4a16_unsigned", False)]
PACKINGS = ["canonical", "ct_int32", "gptq_int32", "awq_int32"]


def pack(codes: np.ndarray, packing: str) -> torch.Tensor:
    return torch.from_numpy(pack_source(codes, packing))


def random_codes(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 16, size=(n, k), dtype=np.uint8)


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout, gate_up", LAYOUTS)
def test_stacked_fill_matches_reference(packing, layout, gate_up):
    """Gate and up of 2 experts written into one stacked w13 tensor, as the converter does."""
    experts, inter, k = 2, 48, 256
    dst = torch.full((experts, 2 * inter, k // 2), 0xA5, dtype=torch.uint8)
    want = dst.clone()
    codes = {}
    for e in range(experts):
        for half in range(2):
            codes[e, half] = random_codes(inter, k, seed=10 * e + half)
            src = pack(codes[e, half], packing)
            kw = dict(src_packing=packing, layout=layout, expert=e, row_offset=half * inter, gate_up=gate_up)
            ops.repack_into(dst, src, **kw)
            ref.repack_into(want, src, **kw)
    assert torch.equal(dst, want)
    # and the stored layout decodes to the codes the packers were given
    canonical = ref.decode_layout(dst, layout, gate_up)
    for (e, half), c in codes.items():
        assert torch.equal(canonical[e, half * inter:(half + 1) * inter], torch.from_numpy(pack_bytes(c)))


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("layout, gate_up", LAYOUTS)
@pytest.mark.parametrize("gathers", ["rows", "cols", "both"])
def test_gathers_match_reference(packing, layout, gate_up, gathers):
    n, k = 32, 128
    g = torch.Generator().manual_seed(11)
    row_index = torch.randperm(n, generator=g) if gathers in ("rows", "both") else None
    col_index = torch.randperm(k, generator=g) if gathers in ("cols", "both") else None
    src = pack(random_codes(n, k, seed=3), packing)
    dst = torch.zeros((2, 64, k // 2), dtype=torch.uint8)
    want = dst.clone()
    kw = dict(src_packing=packing, layout=layout, expert=1, row_offset=32, gate_up=gate_up,
              row_index=row_index, col_index=col_index)
    ops.repack_into(dst, src, **kw)
    ref.repack_into(want, src, **kw)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("packing", PACKINGS)
def test_canonical_layout_takes_any_row_window(packing):
    n, k = 24, 40  # neither a multiple of 16; K/8 whole words
    src = pack(random_codes(n, k, seed=5), packing)
    dst = torch.zeros((1, 40, k // 2), dtype=torch.uint8)
    want = dst.clone()
    ops.repack_into(dst, src, src_packing=packing, layout="canonical", expert=0, row_offset=8)
    ref.repack_into(want, src, src_packing=packing, layout="canonical", expert=0, row_offset=8)
    assert torch.equal(dst, want)


@pytest.mark.parametrize("packing", ["gptq_int32", "awq_int32"])
def test_long_rows_cross_the_column_chunks(packing):
    """K/2 = 4112 bytes: more than one internal column chunk, and a remainder."""
    n, k = 16, 8224
    src = pack(random_codes(n, k, seed=6), packing)
    dst = torch.zeros((1, n, k // 2), dtype=torch.uint8)
    want = dst.clone()
    for layout in ("canonical", "w4a16_signed"):
        ops.repack_into(dst, src, src_packing=packing, layout=layout, expert=0)
        ref.repack_into(want, src, src_packing=packing, layout=layout, expert=0)
        assert torch.equal(dst, want), layout


def test_signed_layout_stores_q_xor_8():
    codes = random_codes(16, 32, seed=8)
    dst_s = torch.zeros((1, 16, 16), dtype=torch.uint8)
    dst_u = torch.zeros_like(dst_s)
    src = pack(codes, "canonical")
    ops.repack_into(dst_s, src, src_packing="canonical", layout="w4a16_signed", expert=0)
    ops.repack_into(dst_u, src, src_packing="canonical", layout="w4a16_unsigned", expert=0)
    assert torch.equal(dst_s, dst_u ^ 0x88)


def test_strided_source_rows():
    codes = random_codes(32, 64, seed=9)
    wide = torch.from_numpy(pack_bytes(np.concatenate([codes, codes], axis=1)))  # [32, 64]
    src = wide[:, :32]  # row stride 64, not contiguous
    dst = torch.zeros((1, 32, 32), dtype=torch.uint8)
    want = dst.clone()
    ops.repack_into(dst, src, src_packing="canonical", layout="shuffle", expert=0)
    ref.repack_into(want, src.contiguous(), src_packing="canonical", layout="shuffle", expert=0)
    assert torch.equal(dst, want)


def _dst(e=2, n=64, half_k=64):
    return torch.zeros((e, n, half_k), dtype=torch.uint8)


def _canon(n=32, half_k=64):
    return torch.zeros((n, half_k), dtype=torch.uint8)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(src_packing="nf4"), ("src_packing must be one of",)),
        (dict(layout="preshuffle"), ("layout must be one of",)),
        (dict(dst=_dst().to(torch.int8)), ("dst must be uint8",)),
        (dict(dst=torch.zeros(64, 64, dtype=torch.uint8)), ("[E, N, K/2]",)),
        (dict(src=_canon().to(torch.int32)), ("canonical source must be uint8",)),
        (dict(src=_canon(half_k=32)), ("K=64", "K=128")),
        (dict(src_packing="gptq_int32", src=torch.zeros(16, 32, dtype=torch.uint8)), ("must be int32",)),
        (dict(src_packing="gptq_int32", src=torch.zeros(8, 32, dtype=torch.int32)), ("K=64",)),
        (dict(src_packing="awq_int32", src=torch.zeros(128, 3, dtype=torch.int32), row_offset=0, layout="shuffle"),
         ("n=24", "multiples of 16")),
        (dict(src_packing="ct_int32", src=torch.zeros(32, 16, dtype=torch.int32, device="meta")), ("meta",)),
        (dict(expert=2), ("expert 2 out of range",)),
        (dict(row_offset=48), ("do not fit",)),
        (dict(row_offset=8, layout="shuffle"), ("row_offset=8", "multiples of 16")),
        (dict(src=_canon(n=24), layout="w4a16_signed", row_offset=0), ("n=24",)),
        (dict(gate_up=True), ("only applies to layout 'guinterleave'",)),
        (dict(layout="guinterleave", dst=_dst(half_k=32), src=_canon(half_k=32)), ("multiple of 128", "K=64")),
        (dict(layout="guinterleave", gate_up=True, dst=_dst(n=48), row_offset=16), ("N_total a multiple of 32",)),
        (dict(dst=_dst(half_k=8), src=_canon(half_k=8), layout="w4a16_unsigned"), ("multiple of 32", "K=16")),
        (dict(row_index=torch.arange(31)), ("row_index must have shape (32,)",)),
        (dict(row_index=torch.arange(32, dtype=torch.int32)), ("row_index must be int64",)),
        (dict(row_index=torch.arange(1, 33)), ("row_index must lie in [0, 31]",)),
        (dict(col_index=torch.arange(128) - 1), ("col_index must lie in [0, 127]",)),
    ],
)
def test_bad_repack_arguments(kwargs, fragments):
    args = dict(dst=_dst(), src=_canon(), src_packing="canonical", layout="canonical", expert=0, row_offset=32)
    args.update(kwargs)
    dst, src = args.pop("dst"), args.pop("src")
    with pytest.raises(TargetError) as info:
        ops.repack_into(dst, src, **args)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
