"""Expert and tensor parallelism, tested directly (the CPU build of vLLM runs one rank). Expert
parallelism: each rank holds whole experts of the stored tensors, bytes untouched, and computes
its share of the router's choices. Tensor parallelism: each rank's share is cut from the stored
bytes along tiles and groups, and must decode to exactly the source's rows of gate and up and
columns of down; the ranks' partial outputs add up to the whole layer's. What cannot be split is
refused with the sizes that work."""
from __future__ import annotations

import os

import pytest
import torch

from kernel_layers import layer_to, linears_to, random_layer
from moeprep.errors import UnsupportedError
from moeprep.moe import Activation, ExpertWeights
from moeprep.partition import Partition, check_partition, local_choices, local_plan, slice_stored, tp_sizes
from moeprep.serve.moe_block import ChosenExperts
from moeprep.serve.torch_moe import experts_reference

SILU = Activation("silu")


def _routing(T: int, E: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return torch.rand(T, k, generator=g), ids


def _rank(layer: ExpertWeights, partition: Partition) -> tuple[ExpertWeights, torch.Tensor]:
    """The rank's experts, and vLLM's expert map (global id -> the rank's, -1 for another rank's)."""
    where = "model.layers.0.mlp.experts"
    check_partition(partition, layer.target.name, layer.plan, layer.tensors, layer.row_perm is not None, where)
    tensors = {role: slice_stored(t, role, layer.target.name, layer.plan, partition, where) for role, t in layer.tensors.items()}
    mine = partition.experts(layer.num_experts)
    row_perm = None if layer.row_perm is None else layer.row_perm[mine.start:mine.stop]
    expert_map = torch.full((layer.num_experts,), -1, dtype=torch.int64)
    expert_map[mine.start:mine.stop] = torch.arange(len(mine))
    return ExpertWeights(layer.prefix, local_plan(layer.plan, partition), layer.target, tensors, row_perm), expert_map


@pytest.mark.parametrize("target", ["w4a16_preshuffle", "w4a16_preshuffle_zp", "mxfp4_moe", "canonical"])
@pytest.mark.parametrize("ep_size", [2, 3])
def test_expert_parallel_ranks_add_up_to_the_layer(target, ep_size):
    E, k, T = 8, 3, 7
    layer, source = random_layer(target, E, 128, 128, desc_act=target == "w4a16_preshuffle_zp", seed=1)
    weights, ids = _routing(T, E, k)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(2))
    want = experts_reference(x, weights, ids, source, SILU)
    total = torch.zeros_like(want)
    for rank in range(ep_size):
        part, expert_map = _rank(layer, Partition(ep_size=ep_size, ep_rank=rank, use_ep=True))
        for t, full in zip(part.tensors.values(), layer.tensors.values()):
            assert t.data_ptr() >= full.data_ptr() and t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
        w, i = local_choices(weights, expert_map[ids], part.num_experts)
        total += ChosenExperts(part, SILU)(x, w, i)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_vllm_placement_puts_the_remainder_on_the_first_ranks():
    assert [Partition(ep_size=3, ep_rank=r, use_ep=True).experts(8) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 8)]
    assert Partition().experts(8) == range(8)


def test_foreign_choices_become_distinct_unchosen_experts_at_weight_zero():
    weights = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    ids = torch.tensor([[2, -1, -1], [-1, 0, -1]])
    w, i = local_choices(weights, ids, 4)
    assert torch.equal(w, torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.3, 0.0]]))
    for row, original in zip(i.tolist(), ids.tolist()):
        assert len(set(row)) == 3 and all(0 <= e < 4 for e in row)
        assert all(a == b for a, b in zip(row, original) if b >= 0)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"), reason="needs the kernels")
def test_the_fused_kernels_take_a_ranks_share():
    """The kernels need distinct ids per token: a rank's share after local_choices runs through them."""
    pytest.importorskip("triton")
    from moeprep.kernels import fused_experts

    device = "cuda" if torch.cuda.is_available() else "cpu"
    E, k, T = 8, 3, 9
    layer, source = random_layer("w4a16_preshuffle_zp", E, 128, 128, seed=3)
    weights, ids = _routing(T, E, k, seed=4)
    x = torch.randn(T, 128, generator=torch.Generator().manual_seed(5))
    want = experts_reference(x, weights, ids, source, SILU)
    total = torch.zeros_like(want)
    for rank in range(2):
        part, expert_map = _rank(layer, Partition(ep_size=2, ep_rank=rank, use_ep=True))
        w, i = local_choices(weights, expert_map[ids], part.num_experts)
        total += fused_experts(x.to(device), w.to(device), i.to(device), layer_to(part, device), SILU).float().cpu()
    # the interpreter computes in fp32; a GPU's tensor cores take bf16 operands, as in tests/test_serve_gpu.py
    assert float((total - want).norm() / want.norm()) <= (1e-2 if device == "cuda" else 1e-5)


def test_a_layout_over_all_experts_is_refused_by_name():
    layer, _ = random_layer("mxfp4_preshuffle", 8, 128, 128, seed=0)
    with pytest.raises(UnsupportedError, match="one layout over all 8 experts"):
        _rank(layer, Partition(ep_size=2, ep_rank=1, use_ep=True))
    whole, _ = _rank(layer, Partition())
    assert all(whole.tensors[r] is layer.tensors[r] for r in layer.tensors)


TP_TARGETS = ["canonical", "w4a16_preshuffle", "w4a16_preshuffle_zp"]


@pytest.mark.parametrize("target", TP_TARGETS)
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shares_are_the_sources_rows_and_columns(target, tp):
    """Each rank's share of the stored bytes decodes (by the target's own exact decoder) to the
    source's gate and up rows and down columns of that rank, and the partial outputs add up."""
    E, H, I, k, T = 4, 128, 256, 2, 6
    layer, source = random_layer(target, E, H, I, seed=7)
    weights, ids = _routing(T, E, k, seed=8)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(9))
    want = experts_reference(x, weights, ids, source, SILU)
    total = torch.zeros_like(want)
    share = I // tp
    for rank in range(tp):
        part, _ = _rank(layer, Partition(tp_size=tp, tp_rank=rank))
        rows, cols = slice(rank * share, (rank + 1) * share), slice(rank * share // 32, (rank + 1) * share // 32)
        for expert, (got, src) in enumerate(zip(part.canonical(), source)):
            for role in ("gate", "up"):
                assert torch.equal(got[role].codes, src[role].codes[rows]), (rank, expert, role)
                assert torch.equal(got[role].scales, src[role].scales[rows])
            assert torch.equal(got["down"].codes, src["down"].codes[:, rank * share // 2:(rank + 1) * share // 2])
            assert torch.equal(got["down"].scales, src["down"].scales[:, cols])
        total += ChosenExperts(part, SILU)(x, weights, ids)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_sizes_follow_tiles_and_groups():
    layer, _ = random_layer("w4a16_preshuffle_zp", 2, 128, 256, group_size=64, seed=0)
    assert tp_sizes("w4a16_preshuffle_zp", layer.plan, layer.tensors, False) == [1, 2]  # I/t a multiple of 2 groups of 64
    layer, _ = random_layer("canonical", 2, 128, 256, group_size=32, seed=0)
    assert tp_sizes("canonical", layer.plan, layer.tensors, False) == [1, 2, 4, 8]


def test_tensor_parallel_experts_are_refused_with_the_sizes_that_work():
    layer, _ = random_layer("w4a16_preshuffle", 8, 128, 128, seed=0)
    with pytest.raises(UnsupportedError, match="tensor-parallel size 8 cannot split I = 128 .* sizes that work: 1, 2 ") as e:
        _rank(layer, Partition(tp_size=8, tp_rank=0))
    assert "model.layers.0.mlp.experts" in str(e.value)
    layer, _ = random_layer("mxfp4_moe", 8, 128, 128, seed=0)
    with pytest.raises(UnsupportedError, match="sizes that work: 1 "):
        _rank(layer, Partition(tp_size=2, tp_rank=0))
