"""moeprep.ops (the compiled layout ops, CPU) against the pure-torch reference and against aiter's
own functions (aiter_oracle), byte for byte; inverses; padding; clear errors."""
from __future__ import annotations

import sys

import pytest
import torch
from aiter_oracle import aiter  # noqa: F401  (session fixture)

from moeprep import ops
from moeprep.errors import MoeprepError, TargetError
from moeprep.ops import reference as ref

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FP4X2 = getattr(torch, "float4_e2m1fn_x2", None)
E8M0 = getattr(torch, "float8_e8m0fnu", None)
WEIGHT_DTYPES = [d for d in (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32, torch.float64,
                             torch.float8_e4m3fn, FP4X2) if d is not None]
WEIGHT_SHAPES = [(16, 32), (32, 64), (2, 48, 96), (3, 16, 160), (2, 2, 32, 64)]
GU_SHAPES = [(1, 32, 64), (2, 64, 128), (3, 96, 192)]
SCALE_SHAPES = [(1, 1), (32, 8), (256, 8), (300, 13), (513, 90), (192, 7)]
GU_SCALE_SHAPES = [(1, 32, 8), (2, 64, 13), (3, 32, 1), (4, 96, 24)]
CODE_SHAPES = [(16, 16), (1, 16, 16), (2, 32, 48), (3, 48, 80), (2, 2, 16, 32)]


def random_of(dtype: torch.dtype, shape: tuple, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of any dtype (compared bitwise, so NaNs are fine)."""
    size = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(bits(got), bits(want))


def pad_e8m0(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.full((rows, cols), 0x7F, dtype=torch.uint8).view(s.dtype)
    out[: s.shape[0], : s.shape[1]] = s
    return out


def ceil_to(a: int, b: int) -> int:
    return -(-a // b) * b


# ---- (16,16) weight shuffle -------------------------------------------------------------------
@pytest.mark.parametrize("use_int4", [False, True])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_shuffle_weight_matches_reference_and_inverts(dtype, shape, use_int4):
    x = random_of(dtype, shape, seed=len(shape))
    y = ops.shuffle_weight(x, use_int4=use_int4)
    assert_same(y, ref.shuffle_weight(x, use_int4=use_int4))
    assert_same(ops.unshuffle_weight(y, use_int4=use_int4), x)
    assert_same(ref.unshuffle_weight(y, use_int4=use_int4), x)


@pytest.mark.parametrize("use_int4", [False, True])
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES, ids=str)
def test_shuffle_weight_matches_aiter(aiter, dtype, shape, use_int4):
    x = random_of(dtype, shape, seed=7)
    assert_same(ops.shuffle_weight(x, (16, 16), use_int4), aiter.shuffle_weight(x.clone(), (16, 16), use_int4))


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("shape", GU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, FP4X2] if FP4X2 else [torch.uint8, torch.bfloat16], ids=str)
def test_guinterleave_matches_reference_aiter_and_inverts(aiter, dtype, shape, gate_up):
    x = random_of(dtype, shape, seed=3)
    y = ops.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up)
    assert_same(y, ref.shuffle_weight(x, is_guinterleave=True, gate_up=gate_up))
    assert_same(y, aiter.shuffle_weight_a16w4(x.clone(), 16, gate_up))
    assert_same(ops.unshuffle_weight(y, is_guinterleave=True, gate_up=gate_up), x)
    assert_same(ref.unshuffle_weight(y, is_guinterleave=True, gate_up=gate_up), x)


def test_guinterleave_without_gate_up_is_the_plain_byte_shuffle():
    x = random_of(torch.uint8, (2, 32, 128))
    assert_same(ops.shuffle_weight(x, is_guinterleave=True), ops.shuffle_weight(x))


def test_shuffle_weight_reads_non_contiguous_and_empty_inputs():
    x = random_of(torch.uint8, (64, 32)).t()  # [32, 64] transposed view
    assert_same(ops.shuffle_weight(x), ref.shuffle_weight(x.contiguous()))
    empty = torch.empty((0, 16, 32), dtype=torch.bfloat16)
    assert ops.shuffle_weight(empty).shape == empty.shape


def test_gate_and_up_blocks_alternate():
    """Independent of any formula: row-block b of the output is gate block b/2 or up block b/2."""
    e, n, k = 1, 64, 64
    x = torch.arange(n, dtype=torch.uint8).view(1, n, 1).expand(e, n, k).contiguous()  # byte = row index
    y = ops.shuffle_weight(x, is_guinterleave=True, gate_up=True).view(e, n // 16, 16 * k)
    for block in range(n // 16):
        rows = set(y[0, block].tolist())
        half, which = block // 2, block % 2
        first = which * (n // 2) + 16 * half
        assert rows == set(range(first, first + 16)), block


# ---- E8M0 scales ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SCALE_SHAPES)
def test_e8m0_shuffle_matches_reference_aiter_and_inverts(aiter, shape):
    s = random_of(torch.uint8, shape, seed=shape[0])
    y = ops.shuffle_scale(s)
    rows, cols = ceil_to(shape[0], 256), ceil_to(shape[1], 8)
    assert y.shape == (rows, cols)
    assert_same(y, ref.shuffle_scale(s))
    # aiter leaves its padding uninitialised: give it input that is already padded with 0x7F
    assert_same(y, aiter.e8m0_shuffle(pad_e8m0(s, rows, cols)))
    assert_same(ops.unshuffle_scale(y, shape), s)
    assert_same(ref.unshuffle_scale(y, shape), s)


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("shape", GU_SCALE_SHAPES)
def test_interleaved_scale_matches_reference_aiter_and_inverts(aiter, shape, gate_up):
    e, n, ks = shape
    s = random_of(torch.uint8, (e * n, ks), seed=ks)
    y = ops.shuffle_scale(s, experts_cnt=e, is_guinterleave=True, gate_up=gate_up)
    assert y.shape == (e * n, ceil_to(ks, 8))
    assert_same(y, ref.shuffle_scale(s, e, True, gate_up))
    assert_same(y, aiter.shuffle_scale_a16w4(pad_e8m0(s, e * n, ceil_to(ks, 8)), e, gate_up))
    assert_same(ops.unshuffle_scale(y, (e * n, ks), experts_cnt=e, is_guinterleave=True, gate_up=gate_up), s)
    assert_same(ref.unshuffle_scale(y, (e * n, ks), e, True, gate_up), s)


@pytest.mark.parametrize("kwargs", [{}, {"experts_cnt": 2, "is_guinterleave": True}, {"experts_cnt": 2, "is_guinterleave": True, "gate_up": True}])
def test_scale_padding_is_0x7f(kwargs):
    m, ks = 64, 13
    y = ops.shuffle_scale(torch.zeros((m, ks), dtype=torch.uint8), **kwargs)
    pads = y.numel() - m * ks
    assert pads > 0
    assert int((y == 0x7F).sum()) == pads and int((y == 0).sum()) == m * ks
    marked = ops.shuffle_scale(torch.full((m, ks), 3, dtype=torch.uint8), **kwargs)
    assert torch.equal(marked == 3, y == 0)  # the same positions hold data


@pytest.mark.skipif(E8M0 is None, reason="torch has no float8_e8m0fnu")
def test_scale_ops_keep_the_e8m0_dtype():
    s = random_of(torch.uint8, (40, 9)).view(E8M0)
    y = ops.shuffle_scale(s)
    assert y.dtype == E8M0
    assert_same(ops.unshuffle_scale(y, (40, 9)), s)


# ---- int4 helpers -----------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 16)])
def test_int4_int8_conversions(shape, signed):
    codes = random_of(torch.uint8, shape, seed=1)
    v = ops.int4_to_int8(codes, signed)
    assert v.dtype == torch.int8 and v.shape == (*shape[:-1], 2 * shape[-1])
    assert_same(v, ref.int4_to_int8(codes, signed))
    # by hand: element 2i is the low nibble of byte i
    lo = (codes & 0xF).to(torch.int8) - (8 if signed else 0)
    assert torch.equal(v[..., 0::2], lo)
    assert_same(ops.int8_to_int4(v, signed), codes)
    assert_same(ref.int8_to_int4(v, signed), codes)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 2, 40)])
def test_pack_int4_per8(shape, signed):
    g = torch.Generator().manual_seed(5)
    v = torch.randint(-8 if signed else 0, 8 if signed else 16, shape, generator=g, dtype=torch.int8)
    b = ops.pack_int4_per8(v)
    assert b.dtype == torch.uint8 and b.shape == (*shape[:-1], shape[-1] // 2)
    assert_same(b, ref.pack_int4_per8(v))
    # by hand: byte j of a group of 4 = v[j] | v[j+4] << 4
    flat_v, flat_b = v.reshape(-1, 8), b.reshape(-1, 4)
    for j in range(4):
        assert torch.equal(flat_b[:, j], ((flat_v[:, j] & 0xF) | ((flat_v[:, j + 4] & 0xF) << 4)).to(torch.uint8))
    assert_same(ops.unpack_int4_per8(b, signed), v)
    assert_same(ref.unpack_int4_per8(b, signed), v)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", CODE_SHAPES)
def test_preshuffle_int4_is_the_composition(aiter, shape, signed):
    codes = random_of(torch.uint8, shape, seed=2)
    y = ops.preshuffle_int4(codes, signed)
    assert y.dtype == torch.uint8 and y.shape == codes.shape
    assert_same(y, ref.preshuffle_int4(codes, signed))
    composed = ops.pack_int4_per8(ops.shuffle_weight(ops.int4_to_int8(codes, signed)))
    assert_same(y, composed)
    assert_same(y, ref.pack_int4_per8(aiter.shuffle_weight(ref.int4_to_int8(codes, signed))))
    assert_same(ops.unpreshuffle_int4(y, signed), codes)
    assert_same(ref.unpreshuffle_int4(y, signed), codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1, 16, 2), (2, 40, 6), (3, 7, 10)])
def test_shuffle_scale_w4a16(shape, dtype):
    s = random_of(dtype, shape, seed=4)
    e, n, g = shape
    y = ops.shuffle_scale_w4a16(s)
    assert y.dtype == dtype and y.shape == (e, g, n)
    assert_same(y, ref.shuffle_scale_w4a16(s))
    # by hand: memory [E, G/2, N, 2] holds s[e, n, 2j + p] at [e, j, n, p]
    mem = bits(y).reshape(e, g // 2, n, 2)
    for j in range(g // 2):
        for p in range(2):
            assert torch.equal(mem[:, j, :, p], bits(s)[:, :, 2 * j + p])
    assert_same(ops.unshuffle_scale_w4a16(y), s)
    assert_same(ref.unshuffle_scale_w4a16(y), s)


# ---- errors -----------------------------------------------------------------------------------
def assert_target_error(fn, *fragments):
    with pytest.raises(TargetError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


U8 = torch.uint8


@pytest.mark.parametrize(
    "call, fragments",
    [
        (lambda: ops.shuffle_weight(torch.zeros(8, 32, dtype=U8)), ("N=8", "multiple of 16")),
        (lambda: ops.shuffle_weight(torch.zeros(16, 48, dtype=U8)), ("K=48", "multiple of 32")),
        (lambda: ops.shuffle_weight(torch.zeros(32, dtype=U8)), (">= 2 dims",)),
        (lambda: ops.shuffle_weight(torch.zeros(16, 32, dtype=U8), layout=(32, 16)), ("(16, 16)",)),
        (lambda: ops.shuffle_weight(torch.zeros(16, 64, dtype=U8), is_guinterleave=True), ("3-D",)),
        (lambda: ops.shuffle_weight(torch.zeros(1, 16, 64, dtype=U8), is_guinterleave=True, gate_up=True), ("multiple of 32",)),
        (lambda: ops.shuffle_weight(torch.zeros(1, 16, 32, dtype=U8), is_guinterleave=True), ("K=32", "multiple of 64")),
        (lambda: ops.unshuffle_weight(torch.zeros(17, 32, dtype=U8)), ("N=17",)),
        (lambda: ops.shuffle_weight("x"), ("torch.Tensor",)),
        (lambda: ops.shuffle_scale(torch.zeros(2, 32, 8, dtype=U8)), ("2-D",)),
        (lambda: ops.shuffle_scale(torch.zeros(32, 8)), ("E8M0", "float32")),
        (lambda: ops.shuffle_scale(torch.zeros(64, 8, dtype=U8), is_guinterleave=True), ("experts_cnt is required",)),
        (lambda: ops.shuffle_scale(torch.zeros(64, 8, dtype=U8), experts_cnt=3, is_guinterleave=True), ("3 experts",)),
        (lambda: ops.shuffle_scale(torch.zeros(96, 8, dtype=U8), experts_cnt=2, is_guinterleave=True), ("48 rows", "multiple of 32")),
        (lambda: ops.unshuffle_scale(torch.zeros(256, 8, dtype=U8), (300, 8)), ("(512, 8)",)),
        (lambda: ops.int8_to_int4(torch.tensor([0, 8], dtype=torch.int8), True), ("[-8, 7]",)),
        (lambda: ops.int8_to_int4(torch.tensor([0, -1], dtype=torch.int8), False), ("[0, 15]",)),
        (lambda: ops.int8_to_int4(torch.zeros(3, dtype=torch.int8), False), ("multiple of 2",)),
        (lambda: ops.int8_to_int4(torch.zeros(2, dtype=U8), False), ("int8", "uint8")),
        (lambda: ops.int4_to_int8(torch.zeros(2, dtype=torch.int8), False), ("uint8",)),
        (lambda: ops.pack_int4_per8(torch.zeros(12, dtype=torch.int8)), ("multiple of 8",)),
        (lambda: ops.pack_int4_per8(torch.full((8,), 16, dtype=torch.int8)), ("[-8, 15]",)),
        (lambda: ops.unpack_int4_per8(torch.zeros(6, dtype=U8), True), ("multiple of 4",)),
        (lambda: ops.preshuffle_int4(torch.zeros(8, 16, dtype=U8), True), ("N=8",)),
        (lambda: ops.preshuffle_int4(torch.zeros(16, 8, dtype=U8), True), ("K=16", "multiple of 32")),
        (lambda: ops.unpreshuffle_int4(torch.zeros(16, 16, dtype=torch.int8), True), ("uint8",)),
        (lambda: ops.shuffle_scale_w4a16(torch.zeros(2, 16, 3)), ("3 groups is odd",)),
        (lambda: ops.shuffle_scale_w4a16(torch.zeros(16, 4)), ("3-D",)),
        (lambda: ops.unshuffle_scale_w4a16(torch.zeros(2, 3, 16)), ("odd",)),
    ],
)
def test_bad_arguments_raise_target_error(call, fragments):
    assert_target_error(call, *fragments)


def test_missing_extension_is_a_clear_error(monkeypatch):
    import moeprep

    ops._lib()  # loaded for real first, then hidden
    monkeypatch.setattr(ops, "_ops", None)
    monkeypatch.delattr(moeprep, "_C")
    monkeypatch.setitem(sys.modules, "moeprep._C", None)  # makes `from .. import _C` fail
    with pytest.raises(MoeprepError, match=r"not available.*pip install --no-build-isolation -e \."):
        ops.shuffle_weight(torch.zeros(16, 32, dtype=U8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA ops")
def test_non_cpu_devices_are_refused():
    with pytest.raises(MoeprepError, match="meta"):
        ops.shuffle_weight(torch.zeros(16, 32, dtype=U8, device="meta"))


def test_has_cuda_op_needs_the_cuda_build():
    # the decode MoE GEMMs are registered by moeprep._C_cuda only; a name nobody registers is never there
    assert not ops.has_cuda_op("no_such_op")
    if ops.has_cuda_op("moe_decode_w13"):
        assert torch.version.hip is None and hasattr(torch.ops.moeprep, "moe_decode_w2")
    else:
        assert torch.version.hip is not None or not torch.cuda.is_available()
