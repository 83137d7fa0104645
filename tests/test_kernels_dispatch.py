"""How a fused MoE call chooses its configuration and backend: tuned tables looked up by device
name and problem shape, per-vendor heuristics elsewhere, and the fall back to the Triton backend
where the one a configuration names cannot run the call. The tables' contents are data, not
checked here; only that every shipped table is well formed."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("triton")

from kernel_layers import random_layer  # noqa: E402
from moeprep.kernels import configs, fused  # noqa: E402
from moeprep.kernels.backend import BACKENDS  # noqa: E402
from moeprep.kernels.layer import prepare  # noqa: E402
from moeprep.moe import Activation  # noqa: E402

CPU = torch.device("cpu")
SILU = Activation("silu")
G = configs.GemmConfig(64, 64, 4, 3)
PROBLEM = configs.Problem("int4", 8, 256, 128, 2, 32)  # the shapes of the layers below


def table(*entries) -> configs.TunedTable:
    return configs.TunedTable("Test GPU", {PROBLEM: list(entries)})


def pick(tokens: int, t: configs.TunedTable | None, experts=8, group=32) -> configs.MoEConfig:
    return configs.pick(tokens, 2, experts, 256, 128, "int4", CPU, (group, group), table=t)


def test_entries_apply_from_their_smallest_batch_size():
    small = configs.MoEConfig(16, dataclasses.replace(G, block_n=32), G)
    large = configs.MoEConfig(64, G, G)
    t = table((1, small), (512, large))
    assert pick(1, t).block_m == 16 and pick(511, t).block_m == 16
    assert pick(512, t).block_m == 64 and pick(8192, t).block_m == 64


def test_a_shape_without_entries_gets_the_vendor_heuristic():
    t = table((1, configs.MoEConfig(16, G, G, "cuda_wgmma_prefill")))
    other_experts = pick(4, t, experts=16)
    assert other_experts.backend == "triton"
    assert other_experts == configs.fit(configs.heuristic("nvidia", 4, 2, 16), 4, 2, 16, 256, 128, CPU, (32, 32))
    assert pick(4, t, group=64).backend == "triton"  # the group size is part of the key
    assert pick(4, None) == configs.fit(configs.heuristic("nvidia", 4, 2, 8), 4, 2, 8, 256, 128, CPU, (32, 32))


def test_heuristics_grow_the_block_with_the_rows_per_expert_and_never_swap():
    for vendor in configs.HEURISTICS:
        blocks = [configs.heuristic(vendor, t, 2, 8).block_m for t in (1, 64, 256, 8192)]
        assert blocks == sorted(blocks) and blocks[0] < blocks[-1]
        for t in (1, 64, 256, 8192):
            cfg = configs.heuristic(vendor, t, 2, 8)
            assert cfg.backend == "triton" and not cfg.w13.swap_ab and not cfg.w2.swap_ab


def test_the_cpu_has_no_tuned_table():
    assert configs.device_table(CPU) is None


def test_a_table_is_found_by_the_gpus_name_only(tmp_path, monkeypatch):
    doc = configs.table_to_json(table((1, configs.MoEConfig(32, G, G))))
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    configs.tuned_table.cache_clear()
    try:
        configs.table_path("Test GPU").write_text(json.dumps(doc))
        assert configs.tuned_table("Test GPU").lookup(PROBLEM, 3).block_m == 32
        assert configs.tuned_table("Test GPU 2") is None
        configs.table_path("Other GPU").write_text(json.dumps(doc))  # a file whose device is another's
        assert configs.tuned_table("Other GPU") is None
    finally:
        configs.tuned_table.cache_clear()


def test_json_round_trip_keeps_every_field():
    mma = configs.MmaDecode(configs.MmaGemm(4, 2, 3, 1), configs.MmaGemm(8, 8, 2, 0))
    t = table((1, configs.MoEConfig(16, dataclasses.replace(G, split_k=2, swap_ab=True), G, "cuda_mma_decode", mma)),
              (512, configs.MoEConfig(128, G, G, "cuda_wgmma_prefill")))
    t.models[PROBLEM] = "test-model"
    back = configs.table_from_json(json.loads(json.dumps(configs.table_to_json(t))))
    assert back.entries == t.entries and back.models == t.models and back.device == t.device


def test_mma_parameters_go_with_their_backend_only():
    with pytest.raises(ValueError):
        configs.MoEConfig(16, G, G, "cuda_mma_decode")
    with pytest.raises(ValueError):
        configs.MoEConfig(16, G, G, "triton", configs.MmaDecode())


def test_every_shipped_table_is_well_formed():
    paths = sorted(configs.TUNED_DIR.glob("*.json"))
    assert paths
    for path in paths:
        t = configs.table_from_json(json.loads(path.read_text()))
        assert configs.table_path(t.device) == path
        for problem, entries in t.entries.items():
            assert [m for m, _ in entries] == sorted({m for m, _ in entries}) and entries[0][0] == 1, (path, problem)
            for _, cfg in entries:
                assert cfg.backend in BACKENDS, (path, cfg)


def test_call_config_falls_back_to_triton_with_its_own_block():
    layer = prepare(random_layer("w4a16_preshuffle", 8, 256, 128)[0])
    x = torch.zeros(3, 256, dtype=torch.bfloat16)  # on the CPU: no CUDA backend can run
    for backend, mma in (("cuda_mma_decode", configs.MmaDecode()), ("cuda_wgmma_prefill", None)):
        cfg = fused.call_config(layer, x, 2, SILU, configs.MoEConfig(32, G, G, backend, mma))
        assert cfg.backend == "triton" and cfg.mma is None and cfg.block_m == 32 == cfg.route_block_m
        assert BACKENDS[backend].problems(layer, x, SILU)


def test_call_config_takes_the_block_of_the_backend_that_runs():
    layer = prepare(random_layer("w4a16_preshuffle", 8, 256, 128)[0])
    x = torch.zeros(3, 256, dtype=torch.bfloat16)

    class Always(type(BACKENDS["cuda_mma_decode"])):
        def problems(self, layer, hidden, activation):
            return []

    real = BACKENDS["cuda_mma_decode"]
    BACKENDS["cuda_mma_decode"] = Always()
    try:
        cfg = fused.call_config(layer, x, 2, SILU, configs.MoEConfig(32, G, G, "cuda_mma_decode", configs.MmaDecode()))
    finally:
        BACKENDS["cuda_mma_decode"] = real
    assert cfg.backend == "cuda_mma_decode" and cfg.block_m == real.block_m(cfg) != 32


def test_the_launchers_take_their_constants_from_the_compiled_module():
    from moeprep import ops
    from moeprep.kernels import mma_decode, wgmma_prefill

    shared = ops.kernel_constants()
    assert set(shared) == {"decode_window", "decode_blocks", "decode_block_m", "decode_warps_per_sm", "prefill_block_m",
                           "prefill_tile_n"}
    assert (mma_decode.WINDOW, mma_decode.BLOCKS, mma_decode.BLOCK_M, mma_decode.WARPS_PER_SM) == (
        shared["decode_window"], shared["decode_blocks"], shared["decode_block_m"], shared["decode_warps_per_sm"])
    assert (wgmma_prefill.BLOCK_M, wgmma_prefill.TILE_N) == (shared["prefill_block_m"], shared["prefill_tile_n"])
    assert BACKENDS["cuda_mma_decode"].block_m(None) == shared["decode_block_m"]
    assert BACKENDS["cuda_wgmma_prefill"].block_m(None) == shared["prefill_block_m"]


def test_the_tuner_writes_its_winners_into_the_gpus_table(tmp_path, monkeypatch):
    """scripts/bench_moe.py --tune --write: winners merged by batch size, the CUDA decode GEMMs named
    where their pair was faster, an entry naming the CUDA prefill GEMMs kept on that backend."""
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_moe_under_test", REPO / "scripts" / "bench_moe.py")
    bm = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bm)  # its dataclasses look their module up
    spec.loader.exec_module(bm)
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    configs.tuned_table.cache_clear()
    m = bm.MODELS["mixtral-8x7b"]
    problem = configs.Problem("int4", m.experts, m.hidden, m.inter, m.routing.top_k, m.group)
    old = configs.TunedTable("Test GPU", {problem: [(1, configs.MoEConfig(16, G, G)),
                                                    (2048, configs.MoEConfig(128, G, G, "cuda_wgmma_prefill"))]})
    configs.table_path("Test GPU").write_text(json.dumps(configs.table_to_json(old)))
    configs.tuned_table.cache_clear()
    g = dataclasses.asdict(dataclasses.replace(G, block_n=32))
    mma = {"warps": 4, "k_warps": 4, "stages": 3, "split": 1}
    rows = [
        dict(model="mixtral-8x7b", T=1, block_m=16, w13=g, w2=g, pair_us=50.0,
             mma=dict(w13=mma, w13_us=20.0, w2=mma, w2_us=10.0)),  # the CUDA pair is faster
        dict(model="mixtral-8x7b", T=16, block_m=16, w13=g, w2=g, pair_us=50.0,
             mma=dict(w13=mma, w13_us=40.0, w2=mma, w2_us=20.0)),  # it is not
        dict(model="mixtral-8x7b", T=2048, block_m=128, w13=g, w2=g, pair_us=900.0),
        dict(model="mixtral-8x7b", T=8192, error="no candidate compiled"),
    ]
    try:
        bm.write_tuned(rows, write=True)
        configs.tuned_table.cache_clear()
        table = configs.tuned_table("Test GPU")
        got = {t: c for t, c in table.entries[problem]}
        assert sorted(got) == [1, 16, 2048]
        assert got[1].backend == "cuda_mma_decode" and got[1].mma.w13.warps == 4 and got[1].w13.block_n == 32
        assert got[16].backend == "triton" and got[16].mma is None
        assert got[2048].backend == "cuda_wgmma_prefill" and got[2048].w13.block_n == 32
        assert table.models[problem] == "mixtral-8x7b"
    finally:
        configs.tuned_table.cache_clear()


def test_amd_gpus_split_k_in_powers_of_two(monkeypatch):
    """Triton's AMD backend miscompiles some 3-way splits (scripts/check_amd.py); NVIDIA keeps them."""
    cfg = configs.MoEConfig(16, G, dataclasses.replace(G, split_k=4))
    shape = (1, 4, 8, 256, 2880, CPU, (32, 32))  # 45 K tiles of 64 in the down projection
    assert configs.fit(cfg, *shape).w2.split_k == 3
    monkeypatch.setattr(configs, "vendor", lambda device: "amd")
    assert configs.fit(cfg, *shape).w2.split_k == 1
    assert configs.fit(cfg, 1, 4, 8, 256, 2048, CPU, (32, 32)).w2.split_k == 4  # 32 tiles
