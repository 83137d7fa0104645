"""The CUDA ops (moeprep._C_cuda) give the same bytes as the CPU ops, on several shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from packers.nibbles import pack_source

from moeprep import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_of(dtype: torch.dtype, shape: tuple, seed: int = 0) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape[:-1], shape[-1] * size), dtype=torch.uint8, generator=g).view(dtype)


def assert_same_on_both(fn, *args, **kwargs) -> None:
    """fn on CUDA copies of the tensor args == fn on the CPU tensors, bit for bit."""
    cpu = fn(*args, **kwargs)
    gpu = fn(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    assert gpu.device.type == "cuda"
    gpu = gpu.cpu()
    assert gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
    size = _INT_OF_SIZE[cpu.element_size()]
    assert torch.equal(gpu.view(size), cpu.view(size))


@pytest.mark.parametrize("use_int4", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(16, 32), (3, 48, 96), (8, 256, 1024)])
def test_shuffle_weight(shape, dtype, use_int4):
    x = random_of(dtype, shape)
    assert_same_on_both(ops.shuffle_weight, x, use_int4=use_int4)
    assert_same_on_both(ops.unshuffle_weight, x, use_int4=use_int4)


def test_shuffle_weight_misaligned_storage():
    base = random_of(torch.uint8, (16 * 32 + 3,))
    x = base[3:].view(16, 32)  # data pointer 3 bytes past an allocation
    assert_same_on_both(ops.shuffle_weight, x)


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("shape", [(1, 32, 64), (4, 192, 1536)])
def test_guinterleave(shape, gate_up):
    x = random_of(torch.uint8, shape)
    assert_same_on_both(ops.shuffle_weight, x, is_guinterleave=True, gate_up=gate_up)
    assert_same_on_both(ops.unshuffle_weight, x, is_guinterleave=True, gate_up=gate_up)


@pytest.mark.parametrize("shape", [(1, 1), (300, 13), (4096, 90)])
def test_e8m0_shuffle(shape):
    s = random_of(torch.uint8, shape)
    assert_same_on_both(ops.shuffle_scale, s)
    y = ops.shuffle_scale(s)
    assert_same_on_both(ops.unshuffle_scale, y, shape)


@pytest.mark.parametrize("gate_up", [False, True])
@pytest.mark.parametrize("shape", [(2, 64, 13), (8, 384, 90)])
def test_interleaved_scale(shape, gate_up):
    e, n, ks = shape
    s = random_of(torch.uint8, (e * n, ks))
    assert_same_on_both(ops.shuffle_scale, s, e, True, gate_up)
    y = ops.shuffle_scale(s, e, True, gate_up)
    assert_same_on_both(ops.unshuffle_scale, y, (e * n, ks), e, True, gate_up)


def test_scale_padding_on_gpu():
    y = ops.shuffle_scale(torch.zeros((40, 9), dtype=torch.uint8, device="cuda")).cpu()
    assert int((y == 0x7F).sum()) == y.numel() - 40 * 9


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("shape", [(16, 16), (3, 48, 80), (8, 512, 1024)])
def test_int4_ops(shape, signed):
    codes = random_of(torch.uint8, shape)
    assert_same_on_both(ops.preshuffle_int4, codes, signed)
    assert_same_on_both(ops.unpreshuffle_int4, codes, signed)
    assert_same_on_both(ops.int4_to_int8, codes, signed)
    v = ops.int4_to_int8(codes, signed)
    assert_same_on_both(ops.int8_to_int4, v, signed)
    assert_same_on_both(ops.pack_int4_per8, v)
    assert_same_on_both(ops.unpack_int4_per8, codes, signed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.float32, torch.float64], ids=str)
def test_scale_w4a16(dtype):
    s = random_of(dtype, (3, 40, 10))
    assert_same_on_both(ops.shuffle_scale_w4a16, s)
    assert_same_on_both(ops.unshuffle_scale_w4a16, ops.shuffle_scale_w4a16(s))


def _pack(codes: np.ndarray, packing: str) -> torch.Tensor:
    return torch.from_numpy(pack_source(codes, packing))


@pytest.mark.parametrize("gathers", [False, True])
@pytest.mark.parametrize("packing", ["canonical", "ct_int32", "gptq_int32", "awq_int32"])
@pytest.mark.parametrize("layout, gate_up", [("canonical", False), ("shuffle", False), ("guinterleave", True),
                                             ("w4a16_signed", False), ("w4a16_unsigned", False)])
def test_repack_into(layout, gate_up, packing, gathers):
    n, k = 64, 512
    src = _pack(np.random.default_rng(1).integers(0, 16, size=(n, k), dtype=np.uint8), packing)
    g = torch.Generator().manual_seed(2)
    row_index = torch.randperm(n, generator=g) if gathers else None
    col_index = torch.randperm(k, generator=g) if gathers else None
    dst = random_of(torch.uint8, (2, 2 * n, k // 2))
    dst_gpu = dst.cuda()
    for offset in (0, n):
        ops.repack_into(dst, src, src_packing=packing, layout=layout, expert=1, row_offset=offset, gate_up=gate_up,
                        row_index=row_index, col_index=col_index)
        ops.repack_into(dst_gpu, src.cuda(), src_packing=packing, layout=layout, expert=1, row_offset=offset,
                        gate_up=gate_up, row_index=None if row_index is None else row_index.cuda(),
                        col_index=None if col_index is None else col_index.cuda())
    assert torch.equal(dst_gpu.cpu(), dst)
