"""Property tests (hypothesis) of moeprep.ops on CPU: for random valid shapes every op matches the
reference and its inverse restores the input exactly; random invalid shapes raise TargetError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packers.nibbles import pack_bytes, pack_source

from moeprep import ops
from moeprep.errors import TargetError
from moeprep.ops import reference as ref

PROPERTY = settings(max_examples=50, deadline=None)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = [d for d in (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.float64,
                      getattr(torch, "float4_e2m1fn_x2", None)) if d is not None]

seeds = st.integers(0, 2**31 - 1)
batch_dims = st.lists(st.integers(1, 3), max_size=2).map(tuple)


def random_of(dtype: torch.dtype, shape: tuple, seed: int) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=g).view(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    size = a.element_size()
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_INT_OF_SIZE[size]), b.view(_INT_OF_SIZE[size]))


def not_multiple(m: int, hi: int):
    return st.integers(1, hi).filter(lambda v: v % m)


# ---- valid shapes: reference match and exact round trip -----------------------------------
@PROPERTY
@given(dtype=st.sampled_from(DTYPES), batch=batch_dims, n=st.integers(1, 4), k=st.integers(1, 4),
       use_int4=st.booleans(), seed=seeds)
def test_shuffle_weight_round_trip(dtype, batch, n, k, use_int4, seed):
    x = random_of(dtype, (*batch, 16 * n, 32 * k), seed)
    y = ops.shuffle_weight(x, use_int4=use_int4)
    assert same(y, ref.shuffle_weight(x, use_int4=use_int4))
    assert same(ops.unshuffle_weight(y, use_int4=use_int4), x)


@PROPERTY
@given(dtype=st.sampled_from(DTYPES), e=st.integers(1, 3), n=st.integers(1, 4), k=st.integers(1, 3),
       gate_up=st.booleans(), seed=seeds)
def test_guinterleave_round_trip(dtype, e, n, k, gate_up, seed):
    x = random_of(dtype, (e, (32 if gate_up else 16) * n, 64 * k), seed)
    y = ops.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up)
    assert same(y, ref.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up))
    assert same(ops.unshuffle_weight(y, is_guinterleave=True, gate_up=gate_up), x)


@PROPERTY
@given(m=st.integers(1, 600), ks=st.integers(1, 40), seed=seeds)
def test_e8m0_shuffle_round_trip(m, ks, seed):
    s = random_of(torch.uint8, (m, ks), seed)
    y = ops.shuffle_scale(s)
    assert same(y, ref.shuffle_scale(s))
    assert same(ops.unshuffle_scale(y, (m, ks)), s)


@PROPERTY
@given(e=st.integers(1, 4), n=st.integers(1, 3), ks=st.integers(1, 20), gate_up=st.booleans(), seed=seeds)
def test_interleaved_scale_round_trip(e, n, ks, gate_up, seed):
    s = random_of(torch.uint8, (e * 32 * n, ks), seed)
    y = ops.shuffle_scale(s, e, True, gate_up)
    assert same(y, ref.shuffle_scale(s, e, True, gate_up))
    assert same(ops.unshuffle_scale(y, tuple(s.shape), e, True, gate_up), s)


@PROPERTY
@given(batch=batch_dims, half_k=st.integers(1, 24), signed=st.booleans(), seed=seeds)
def test_int4_int8_round_trip(batch, half_k, signed, seed):
    codes = random_of(torch.uint8, (*batch, half_k), seed)
    v = ops.int4_to_int8(codes, signed)
    assert same(v, ref.int4_to_int8(codes, signed))
    assert same(ops.int8_to_int4(v, signed), codes)


@PROPERTY
@given(batch=batch_dims, groups=st.integers(1, 8), seed=seeds)
def test_pack_per8_round_trip(batch, groups, seed):
    b = random_of(torch.uint8, (*batch, 4 * groups), seed)
    for signed in (False, True):
        v = ops.unpack_int4_per8(b, signed)
        assert same(v, ref.unpack_int4_per8(b, signed))
        assert same(ops.pack_int4_per8(v), b)


@PROPERTY
@given(batch=batch_dims, n=st.integers(1, 4), k=st.integers(1, 4), signed=st.booleans(), seed=seeds)
def test_preshuffle_int4_round_trip(batch, n, k, signed, seed):
    codes = random_of(torch.uint8, (*batch, 16 * n, 16 * k), seed)
    y = ops.preshuffle_int4(codes, signed)
    assert same(y, ref.preshuffle_int4(codes, signed))
    assert same(ops.unpreshuffle_int4(y, signed), codes)


@PROPERTY
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.uint8]), e=st.integers(1, 3),
       n=st.integers(1, 40), g=st.integers(1, 6), seed=seeds)
def test_w4a16_scale_round_trip(dtype, e, n, g, seed):
    s = random_of(dtype, (e, n, 2 * g), seed)
    y = ops.shuffle_scale_w4a16(s)
    assert same(y, ref.shuffle_scale_w4a16(s))
    assert same(ops.unshuffle_scale_w4a16(y), s)


LAYOUTS = [("canonical", False), ("shuffle", False), ("guinterleave", False), ("guinterleave", True),
           ("w4a16_signed", False), ("w4a16_unsigned", False)]


def pack(codes: np.ndarray, packing: str) -> torch.Tensor:
    return torch.from_numpy(pack_source(codes, packing))


@PROPERTY
@given(packing=st.sampled_from(["canonical", "ct_int32", "gptq_int32", "awq_int32"]), layout=st.sampled_from(LAYOUTS),
       experts=st.integers(1, 3), blocks=st.integers(1, 3), k=st.integers(1, 3), data=st.data())
def test_repack_into_round_trip(packing, layout, experts, blocks, k, data):
    layout, gate_up = layout
    n_total, big_k = 32 * blocks, 128 * k
    expert = data.draw(st.integers(0, experts - 1))
    tiles = data.draw(st.integers(1, 2 * blocks))
    offset = 16 * data.draw(st.integers(0, 2 * blocks - tiles))
    codes = np.random.default_rng(data.draw(seeds)).integers(0, 16, size=(16 * tiles, big_k), dtype=np.uint8)
    dst = torch.zeros((experts, n_total, big_k // 2), dtype=torch.uint8)
    ops.repack_into(dst, pack(codes, packing), src_packing=packing, layout=layout, expert=expert,
                    row_offset=offset, gate_up=gate_up)
    canonical = ops.decode_layout(dst, layout, gate_up)
    assert torch.equal(canonical[expert, offset:offset + 16 * tiles], torch.from_numpy(pack_bytes(codes)))


# ---- invalid shapes: a TargetError, never a crash or a silent result -------------------------
@PROPERTY
@given(n=st.integers(1, 70), k=st.integers(1, 100))
def test_shuffle_weight_refuses_untileable_shapes(n, k):
    x = torch.zeros((n, k), dtype=torch.uint8)
    if n % 16 == 0 and k % 32 == 0:
        assert ops.shuffle_weight(x).shape == x.shape
    else:
        with pytest.raises(TargetError):
            ops.shuffle_weight(x)
        with pytest.raises(TargetError):
            ops.unshuffle_weight(x)


@PROPERTY
@given(n=st.integers(1, 100), k=st.integers(1, 200), gate_up=st.booleans())
def test_guinterleave_refuses_untileable_shapes(n, k, gate_up):
    x = torch.zeros((2, n, k), dtype=torch.uint8)
    if n % (32 if gate_up else 16) == 0 and k % 64 == 0:
        assert ops.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up).shape == x.shape
    else:
        with pytest.raises(TargetError):
            ops.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up)


@PROPERTY
@given(e=st.integers(1, 4), rows=not_multiple(32, 200), ks=st.integers(1, 16), gate_up=st.booleans())
def test_interleaved_scale_refuses_bad_rows(e, rows, ks, gate_up):
    with pytest.raises(TargetError):
        ops.shuffle_scale(torch.zeros((e * rows, ks), dtype=torch.uint8), e, True, gate_up)


@PROPERTY
@given(n=st.integers(1, 70), half_k=st.integers(1, 70))
def test_preshuffle_int4_refuses_untileable_shapes(n, half_k):
    codes = torch.zeros((n, half_k), dtype=torch.uint8)
    if n % 16 == 0 and half_k % 16 == 0:
        assert ops.preshuffle_int4(codes, True).shape == codes.shape
    else:
        with pytest.raises(TargetError):
            ops.preshuffle_int4(codes, True)


@PROPERTY
@given(e=st.integers(1, 3), n=st.integers(1, 20), g=st.integers(0, 5))
def test_w4a16_scales_refuse_odd_groups(e, n, g):
    with pytest.raises(TargetError):
        ops.shuffle_scale_w4a16(torch.zeros((e, n, 2 * g + 1)))


@PROPERTY
@given(layout=st.sampled_from(["shuffle", "guinterleave", "w4a16_signed", "w4a16_unsigned"]),
       offset=st.integers(0, 48), rows=st.integers(1, 48))
def test_repack_into_refuses_untiled_windows(layout, offset, rows):
    dst = torch.zeros((1, 112, 64), dtype=torch.uint8)
    src = torch.zeros((rows, 64), dtype=torch.uint8)
    call = lambda: ops.repack_into(dst, src, src_packing="canonical", layout=layout, expert=0, row_offset=offset)
    if offset % 16 == 0 and rows % 16 == 0:
        call()
    else:
        with pytest.raises(TargetError):
            call()
