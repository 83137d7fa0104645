"""The fused MoE kernels against the pure-torch reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on small shapes;
with one, the same tests run compiled and the ``gpu``-marked ones cover the benchmarked models'
real shapes. Every run draws fresh random inputs and poisons every buffer the kernels allocate.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch

HAS_GPU = torch.cuda.is_available()  # without one, conftest.py has the kernels run in Triton's interpreter
pytest.importorskip("triton")

from moeprep.errors import MoeprepError, UnsupportedError  # noqa: E402
from moeprep.kernels import available, fused_experts, fused_moe, supports  # noqa: E402
from moeprep.kernels import configs  # noqa: E402
from moeprep.kernels.layer import prepare  # noqa: E402
from align_reference import align_reference  # noqa: E402
from kernel_layers import layer_to, linears_to, random_layer  # noqa: E402
from moeprep.kernels.routing import route_tokens as route_kernel  # noqa: E402
from moeprep.serve.moe_block import MoEBlock  # noqa: E402
from moeprep.moe import Activation, Routing, route  # noqa: E402
from moeprep.serve.torch_moe import experts_reference  # noqa: E402
from moeprep.targets import get_target  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = 1e-2  # relative error of a bf16/fp16 run against the fp32 reference
SILU = Activation("silu")
SWIGLU = Activation("swiglu_oai", alpha=1.702, limit=7.0)
QWEN3 = Routing("softmax_topk", 8, True, True)
MIXTRAL = Routing("softmax_topk", 2, True)
GPT_OSS = Routing("topk_softmax", 4, False)


@contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like made inside comes back full of NaN (floats) or 2**30 (ints)."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else 2**30 if t.element_size() >= 4 else 0x5A)

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: an element was left unwritten or read unwritten data"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_same_routing(r, logits, routing):
    """The kernel's top-k is torch's up to the order of tied logits, which torch.topk leaves to
    its implementation (on CPU it picks neither the lowest nor the first indices); the kernel
    takes ties lowest index first. The weights only depend on the values, so they match slot by slot."""
    weights, ids = route(logits, routing)
    got = r.topk_ids.long()
    vals = logits.gather(1, got)
    assert torch.equal(vals, logits.gather(1, ids)), "different top-k values"
    tied_next = vals[:, :-1] == vals[:, 1:]
    assert bool((got[:, :-1] < got[:, 1:])[tied_next].all()), "ties not in increasing expert order"
    kth = vals[:, -1:]
    below = torch.where(logits == kth, torch.arange(logits.shape[1], device=logits.device), logits.shape[1])
    lowest_tied = below.sort(dim=1).values[:, : routing.top_k]
    chosen_tied = torch.where(vals == kth, got, logits.shape[1]).sort(dim=1).values
    first = torch.arange(routing.top_k, device=got.device) < (vals == kth).sum(1, keepdim=True)
    assert torch.equal(chosen_tied[first], lowest_tied[first]), "a boundary tie not broken towards the lower index"
    torch.testing.assert_close(r.topk_weights, weights.float(), rtol=weight_rtol(routing), atol=1e-6)


def run_and_check(layer, source, routing, act, T, dtype, config=None, tol=TOL):
    experts = layer_to(layer, DEVICE)
    H, E = layer.hidden_size, layer.num_experts
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    logits = (torch.randn(T, E, device=DEVICE) * 2).to(dtype)
    with poisoned_allocations():
        out = fused_moe(x, logits, routing, experts, act, config=config)
    assert out.shape == (T, H) and out.dtype == dtype
    r = route_kernel(logits, routing, 16)  # the reference takes the same experts on ties
    ref = experts_reference(x.float(), r.topk_weights, r.topk_ids.long(), linears_to(source, DEVICE), act)
    err = rel_err(out, ref)
    assert err <= tol, err
    return out


# ---- routing --------------------------------------------------------------------------------
ROUTINGS = [QWEN3, MIXTRAL, GPT_OSS, Routing("softmax_topk", 3, False)]


def weight_rtol(routing) -> float:
    """Weights handed over in bf16 may round the other way after a 1-ulp difference in exp."""
    return 2.0**-7 if routing.scoring == "topk_softmax" or routing.weights_in_logits_dtype else 1e-5


@pytest.mark.parametrize("routing", ROUTINGS, ids=lambda r: f"{r.scoring}-k{r.top_k}-renorm{int(r.renormalize)}")
@pytest.mark.parametrize("T,fused_max", [(1, 64), (13, 64), (64, 64), (70, 64), (9, 4)])
def test_routing_matches_torch(routing, T, fused_max):
    E, block_m = 24, 16
    # small integer logits: many ties, which torch.topk breaks towards the lower index
    logits = torch.randint(-4, 5, (T, E), device=DEVICE).to(torch.bfloat16)
    with poisoned_allocations():
        r = route_kernel(logits, routing, block_m, fused_max_tokens=fused_max)
    assert_same_routing(r, logits, routing)
    sorted_ids, expert_ids, padded = align_reference(r.topk_ids, E, block_m)
    assert int(r.num_padded) == padded
    assert torch.equal(r.sorted_ids[:padded].cpu(), sorted_ids)
    assert torch.equal(r.expert_ids[: padded // block_m].cpu(), expert_ids)


def test_routing_fp32_logits_with_distinct_values():
    T, E = 37, 64
    logits = torch.randn(T, E, device=DEVICE)
    for routing in ROUTINGS:
        assert_same_routing(route_kernel(logits, routing, 32), logits, routing)


NOAUX = [Routing("noaux_tc", 2, True, scaling=2.827), Routing("noaux_tc", 4, True, n_group=8, topk_group=4, scaling=2.5),
         Routing("noaux_tc", 3, False, n_group=4, topk_group=1)]


@pytest.mark.parametrize("routing", NOAUX, ids=lambda r: f"k{r.top_k}-groups{r.n_group}of{r.topk_group}-renorm{int(r.renormalize)}")
@pytest.mark.parametrize("T,fused_max", [(5, 64), (70, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noaux_tc_routing_in_the_kernel_matches_torch(routing, T, fused_max, dtype):
    """DeepSeek/GLM routing in the routing kernel: sigmoid scores, the correction bias in the choice
    only, the group limit, the unbiased scores as weights (renormalised), the scaling factor."""
    E, block_m = 64, 16
    g = torch.Generator().manual_seed(T)
    logits = torch.randn(T, E, generator=g).to(DEVICE, dtype)
    bias = (torch.randn(E, generator=g) * 0.3).to(DEVICE)
    r = route_kernel(logits, routing, block_m, fused_max_tokens=fused_max, correction_bias=bias)
    weights, ids = route(logits, routing, bias)
    order, want = r.topk_ids.long().sort(dim=1), ids.sort(dim=1)
    assert torch.equal(order.values, want.values), "different experts"
    torch.testing.assert_close(r.topk_weights.gather(1, order.indices), weights.float().gather(1, want.indices),
                               rtol=1e-5, atol=1e-6)
    sorted_ids, expert_ids, padded = align_reference(r.topk_ids, E, block_m)
    assert int(r.num_padded) == padded and torch.equal(r.sorted_ids[:padded].cpu(), sorted_ids)


def test_noaux_tc_groups_over_an_expert_count_that_is_not_a_power_of_two_route_in_torch():
    from moeprep import kernels

    grouped = Routing("noaux_tc", 2, True, n_group=4, topk_group=2)
    assert kernels.routes(grouped, 64) and not kernels.routes(grouped, 160)
    assert kernels.routes(Routing("noaux_tc", 8, True), 160)  # GLM-4.5: one group
    with pytest.raises(MoeprepError, match="does not compute noaux_tc routing over 160 experts"):
        route_kernel(torch.zeros(3, 160, device=DEVICE), grouped, 16)


# ---- fused MoE ------------------------------------------------------------------------------
CASES = [  # target, E, H, I, routing, activation, group, bias, desc_act, T, dtype
    ("w4a16_preshuffle", 8, 128, 64, QWEN3, SILU, 32, False, False, 1, torch.bfloat16),
    ("w4a16_preshuffle", 8, 128, 64, QWEN3, SILU, 32, False, True, 9, torch.bfloat16),
    ("w4a16_preshuffle", 4, 256, 128, MIXTRAL, SILU, 32, False, False, 300, torch.bfloat16),
    ("w4a16_preshuffle_zp", 8, 128, 128, QWEN3, SILU, 64, False, False, 5, torch.float16),
    ("w4a16_preshuffle_zp", 6, 256, 256, MIXTRAL, SILU, 128, True, True, 33, torch.bfloat16),
    ("mxfp4_preshuffle", 8, 192, 64, GPT_OSS, SWIGLU, 32, True, False, 3, torch.bfloat16),
    ("mxfp4_preshuffle", 4, 192, 192, GPT_OSS, SWIGLU, 32, True, False, 70, torch.bfloat16),
    ("mxfp4_moe", 8, 128, 128, GPT_OSS, SWIGLU, 32, True, False, 2, torch.bfloat16),
    ("mxfp4_moe", 8, 256, 128, QWEN3, SILU, 32, False, False, 17, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-T{c[9]}-{str(c[10])[6:]}{'-desc_act' if c[8] else ''}")
def test_fused_moe_matches_reference(case):
    target, E, H, I, routing, act, group, bias, desc_act, T, dtype = case
    layer, source = random_layer(target, E, H, I, group_size=group, bias=bias, desc_act=desc_act)
    assert supports(layer)
    run_and_check(layer, source, routing, act, T, dtype)


@pytest.mark.parametrize("target", ["w4a16_preshuffle_zp", "mxfp4_moe"])
@pytest.mark.parametrize("T", [3, 70])
def test_fused_experts_takes_an_engines_routing(target, T):
    """Top-k weights and ids an engine's router chose (vLLM's), any expert order within a token:
    the block alignment and both GEMMs as after moeprep's own routing."""
    E, k = 8, 3
    layer, source = random_layer(target, E, 128, 128, bias=target == "mxfp4_moe")
    act = SWIGLU if target == "mxfp4_moe" else SILU
    g = torch.Generator().manual_seed(T)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    weights = torch.rand(T, k, generator=g).to(DEVICE)
    x = torch.randn(T, 128, generator=g).to(DEVICE, torch.bfloat16)
    with poisoned_allocations():
        out = fused_experts(x, weights, ids, layer_to(layer, DEVICE), act)
    ref = experts_reference(x.float(), weights, ids.long(), linears_to(source, DEVICE), act)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("target", ["w4a16_preshuffle_zp", "mxfp4_moe"])
def test_fp32_is_exact(target):
    """In fp32 the only differences left are the order of additions."""
    layer, source = random_layer(target, 4, 128, 128, bias=target == "mxfp4_moe", desc_act=target.startswith("w4a16"))
    run_and_check(layer, source, GPT_OSS, SWIGLU, 6, torch.float32, tol=1e-5 if not HAS_GPU else 2e-3)


TILE_CONFIGS = [
    configs.MoEConfig(16, configs.GemmConfig(32, 64, 4, 2, split_k=4), configs.GemmConfig(32, 32, 4, 2)),
    configs.MoEConfig(1, configs.GemmConfig(32, 64, 4, 3, split_k=2), configs.GemmConfig(64, 64, 4, 3)),
    configs.MoEConfig(16, configs.GemmConfig(32, 64, 4, 2), configs.GemmConfig(32, 32, 4, 2, split_k=4)),
    configs.MoEConfig(64, configs.GemmConfig(128, 128, 8, 3), configs.GemmConfig(128, 64, 8, 3)),
    configs.MoEConfig(1, configs.GemmConfig(32, 128, 4, 3), configs.GemmConfig(64, 64, 4, 3, split_k=2)),
    configs.MoEConfig(16, configs.GemmConfig(64, 64, 4, 3, swap_ab=True),
                      configs.GemmConfig(64, 64, 4, 3, split_k=2, swap_ab=True)),
    configs.MoEConfig(32, configs.GemmConfig(128, 64, 8, 3, swap_ab=True), configs.GemmConfig(64, 128, 4, 3, swap_ab=True)),
]


@pytest.mark.parametrize("cfg", TILE_CONFIGS, ids=lambda c: f"bm{c.block_m}-bn{c.w13.block_n}-bk{c.w13.block_k}"
                         f"-split{c.w13.split_k}.{c.w2.split_k}{'-swap' if c.w13.swap_ab else ''}")
def test_split_k_one_row_blocks_and_large_tiles(cfg):
    # one-row blocks launch a program per routed pair: fewer tokens keep the interpreter quick
    T = 6 if cfg.block_m == 1 and not HAS_GPU else 20
    layer, source = random_layer("w4a16_preshuffle", 4, 256, 256)
    run_and_check(layer, source, MIXTRAL, SILU, T, torch.bfloat16, config=cfg)


@pytest.mark.parametrize("target", ["w4a16_preshuffle_zp", "mxfp4_preshuffle"])
def test_gate_up_split_along_k_is_summed_in_split_order(target):
    """Every split of a gate/up tile stores its partial product, the last to arrive sums them and
    finishes the tile: the reference's output (fp32, to the order of additions) whatever the split,
    and the arrival counts back at zero for the next call."""
    from moeprep.kernels import triton_gemms

    layer, source = random_layer(target, 4, 256, 128, bias=True, group_size=32)
    experts = layer_to(layer, DEVICE)
    x = torch.randn(6, 256, device=DEVICE)
    logits = torch.randn(6, 4, device=DEVICE)
    r = route_kernel(logits, GPT_OSS, 16)
    ref = experts_reference(x, r.topk_weights, r.topk_ids.long(), linears_to(source, DEVICE), SWIGLU)
    for split in (1, 2, 4):
        g13 = configs.GemmConfig(32, 32, 4, 2, split_k=split, swap_ab=split == 4)
        cfg = configs.MoEConfig(16, g13, configs.GemmConfig(64, 64, 4, 2, split_k=1))
        assert configs.fit(cfg, 6, 4, 4, 256, 128, torch.device(DEVICE), (32, 32)).w13.split_k == split
        with poisoned_allocations():
            out = fused_moe(x, logits, GPT_OSS, experts, SWIGLU, config=cfg)
        assert rel_err(out, ref) <= (2e-3 if HAS_GPU else 1e-5), split
    assert all(int(counts.count_nonzero()) == 0 for counts in triton_gemms._ARRIVALS.values())


def test_split_k_is_capped_by_the_additions_into_the_output():
    """Each split adds every token's top-k partial sums into the bf16 output once more."""
    g = configs.GemmConfig(64, 64, 4, 3)
    for top_k, wanted, allowed in ((8, 8, 2), (4, 8, 4), (2, 8, 8), (16, 4, 1)):
        cfg = configs.MoEConfig(16, g, dataclasses.replace(g, split_k=wanted))
        fitted = configs.fit(cfg, 1, top_k, 128, 512, 2048, torch.device("cpu"), (32, 32))
        assert fitted.w2.split_k == allowed, (top_k, fitted.w2.split_k)
        assert fitted.w2.split_k * top_k <= configs.MAX_ADDS or fitted.w2.split_k == 1


# ---- the CUDA-only packed decodes, run through a model of the PTX they use ---------------------
def _bf16_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16)) & 0xFFFF


def _bf16_value(bits: int) -> float:
    return torch.tensor([bits & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()


def _run_ptx(asm: str, inputs: list[int]) -> list[int]:
    """The registers $0-$7 after the asm block, for the few PTX instructions the decodes use
    (semantics from the PTX ISA; bf16x2 FMA rounds once, to nearest even)."""
    regs = {f"${i + 8}": v for i, v in enumerate(inputs)}

    def val(o):
        return regs[o] if o in regs else int(o, 0) & 0xFFFFFFFF

    for line in asm.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *args = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in args]
        if op == "mov.b32":
            r = a[0]
        elif op == "prmt.b32":  # bytes of {a[1], a[0]} numbered 0-7, one selector nibble per result byte
            both = a[0] | a[1] << 32
            r = sum(((both >> 8 * ((a[2] >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "shr.u32":
            r = a[0] >> a[1]
        elif op == "shl.b32":
            r = a[0] << a[1]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "lop3.b32":
            r = sum(((a[3] >> ((a[0] >> i & 1) << 2 | (a[1] >> i & 1) << 1 | (a[2] >> i & 1))) & 1) << i for i in range(32))
        elif op == "fma.rn.bf16x2":
            r = sum(_bf16_bits(_bf16_value(a[0] >> h) * _bf16_value(a[1] >> h) + _bf16_value(a[2] >> h)) << h
                    for h in (0, 16))
        else:
            raise AssertionError(f"no model of {op}")
        regs[dst] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(8)]


E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def test_packed_int4_decode_is_the_exact_bf16_of_q_minus_z_times_s():
    from moeprep.kernels import _triton

    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        words = torch.randint(0, 2**32, (2,), generator=gen).tolist()
        z = int(torch.randint(0, 16, (), generator=gen))
        s_bits = _bf16_bits(float(torch.randn((), generator=gen)) * 2.0**-6)
        s = _bf16_value(s_bits)
        out = _run_ptx(_triton._NIBBLES_BF16.value, words + [s_bits * 0x10001, _bf16_bits(128 + z) * 0x10001])
        for j in range(8):
            for h in range(2):
                q = words[h] >> 8 * (j % 4) + 4 * (j // 4) & 0xF  # LAYOUTS.md: value j of a packed word
                assert out[j] >> 16 * h & 0xFFFF == _bf16_bits((q - z) * s), (j, h, q, z, s)


def test_packed_e2m1_decode_is_value_times_scale():
    from moeprep.kernels import _triton

    gen = torch.Generator().manual_seed(2)
    for _ in range(200):
        words = torch.randint(0, 2**32, (2,), generator=gen).tolist()
        e8 = int(torch.randint(100, 150, (), generator=gen))
        out = _run_ptx(_triton._E2M1_BF16.value, words + [(e8 << 7) * 0x10001])
        for j in range(8):
            for h in range(2):
                code = words[h] >> 4 * j & 0xF
                want = (-1 if code & 8 else 1) * E2M1[code & 7] * 2.0 ** (e8 - 127)
                assert _bf16_value(out[j] >> 16 * h) == want, (j, h, code, e8)


def test_moe_block_triton_backend_matches_reference_backend():
    layer, _ = random_layer("w4a16_preshuffle", 8, 128, 64)
    router = torch.randn(8, 128) * 0.1
    x = torch.randn(11, 128).to(torch.bfloat16)
    fast = MoEBlock(layer_to(layer, DEVICE), router.to(DEVICE), None, QWEN3, SILU, torch.bfloat16, backend="triton")
    slow = MoEBlock(layer, router, None, QWEN3, SILU, torch.bfloat16, backend="reference")  # CPU: the ops it needs
    assert rel_err(fast(x.to(DEVICE)).cpu(), slow(x)) <= TOL


@pytest.mark.parametrize("E", [8, 12])
def test_moe_block_triton_backend_routes_noaux_tc(E):
    """noaux_tc (DeepSeek, GLM) with groups: the routing kernel over 8 experts; over 12 (groups
    that do not tile a power of two) torch routes and the fused GEMMs compute the experts."""
    layer, _ = random_layer("w4a16_preshuffle_zp", E, 128, 64)
    routing = Routing("noaux_tc", 2, True, n_group=4, topk_group=2, scaling=2.5)
    router, bias = torch.randn(E, 128) * 0.1, torch.randn(E) * 0.1
    x = torch.randn(11, 128).to(torch.bfloat16)
    fast = MoEBlock(layer_to(layer, DEVICE), router.to(DEVICE), None, routing, SILU, torch.bfloat16, backend="triton",
                    correction_bias=bias.to(DEVICE))
    slow = MoEBlock(layer, router, None, routing, SILU, torch.bfloat16, backend="reference", correction_bias=bias)
    assert rel_err(fast(x.to(DEVICE)).cpu(), slow(x)) <= TOL


# ---- the test data and the API ---------------------------------------------------------------
@pytest.mark.parametrize("target", ["w4a16_preshuffle", "w4a16_preshuffle_zp", "mxfp4_preshuffle", "mxfp4_moe"])
def test_random_layer_is_what_the_target_reads_back(target):
    """The stored tensors the kernels are tested on decode, through the target's own inverse, to
    the canonical experts the reference uses."""
    int4 = target.startswith("w4a16")
    layer, source = random_layer(target, 3, 128, 128, group_size=32, bias=True, desc_act=int4)
    for got, want in zip(layer.canonical(), source):
        for role in ("gate", "up", "down"):
            g, w = got[role], want[role]
            assert torch.equal(g.codes, w.codes) and torch.equal(g.scales, w.scales), role
            assert (g.zeros is None) == (w.zeros is None) and (g.zeros is None or torch.equal(g.zeros, w.zeros))
            assert torch.equal(g.bias, w.bias)
            assert (g.g_idx is None) == (w.g_idx is None) and (g.g_idx is None or torch.equal(g.g_idx, w.g_idx))


def test_unsupported_layers_and_inputs_are_refused():
    layer, _ = random_layer("w4a16_preshuffle", 2, 64, 64)
    canonical = dataclasses.replace(layer, target=get_target("canonical"))
    assert supports(layer) and not supports(canonical)
    x = torch.randn(3, 64, device=DEVICE)
    with pytest.raises(UnsupportedError, match="canonical"):
        fused_moe(x, torch.randn(3, 2, device=DEVICE), MIXTRAL, layer_to(canonical, DEVICE), SILU)
    with pytest.raises(MoeprepError, match=r"hidden states \[T, 64\]"):
        fused_moe(x[:, :32], torch.randn(3, 2, device=DEVICE), MIXTRAL, layer_to(layer, DEVICE), SILU)
    with pytest.raises(MoeprepError, match="top_k=3"):
        fused_moe(x, torch.randn(3, 2, device=DEVICE), Routing("softmax_topk", 3, False), layer_to(layer, DEVICE), SILU)
    assert fused_moe(x[:0], torch.randn(0, 2, device=DEVICE), MIXTRAL, layer_to(layer, DEVICE), SILU).shape == (0, 64)


def test_available_needs_a_gpu():
    assert available() == HAS_GPU


# ---- real shapes (GPU) ---------------------------------------------------------------------
ALL_T = (1, 4, 16, 64, 512, 2048, 8192)  # scripts/bench_moe.py's batch sizes: every tuned configuration
MODELS = {  # name: (target, E, H, I, routing, activation, bias, Ts)
    "qwen3-30b-a3b": ("w4a16_preshuffle", 128, 2048, 768, QWEN3, SILU, False, ALL_T),
    "qwen3-30b-a3b-zp": ("w4a16_preshuffle_zp", 128, 2048, 768, QWEN3, SILU, False, ALL_T),
    "qwen3-30b-a3b-mxfp4_moe": ("mxfp4_moe", 128, 2048, 768, QWEN3, SILU, False, (1, 2048)),
    "gpt-oss-120b": ("mxfp4_preshuffle", 128, 2880, 2880, GPT_OSS, SWIGLU, True, ALL_T),
    "mixtral-8x7b": ("w4a16_preshuffle", 8, 4096, 14336, MIXTRAL, SILU, False, ALL_T),
    # ARCHITECTURES.md's families (DeepSeek-V3 with 32 of its 256 experts: the expert count only
    # changes the routing, whose group limit of 8 groups then has 4 experts each)
    "qwen3.5-35b-a3b": ("w4a16_preshuffle", 256, 2048, 512, Routing("softmax_topk", 8, True), SILU, False, (1, 64, 2048)),
    "deepseek-v3": ("w4a16_preshuffle", 32, 7168, 2048, Routing("noaux_tc", 8, True, n_group=8, topk_group=4, scaling=2.5),
                    SILU, False, (1, 64, 2048)),
    "glm-4.5": ("w4a16_preshuffle_zp", 160, 5120, 1536, Routing("noaux_tc", 8, True, scaling=2.5), SILU, False, (1, 64, 2048)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("model", list(MODELS))
def test_real_shapes(model):
    target, E, H, I, routing, act, bias, Ts = MODELS[model]
    layer, source = random_layer(target, E, H, I, bias=bias, group_size=128 if target.endswith("_zp") else 32)
    for T in Ts:
        run_and_check(layer, source, routing, act, T, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("T", [1, 2, 16, 64, 65, 8192])
def test_routing_real_shapes(T):
    logits = torch.randn(T, 128, device=DEVICE).to(torch.bfloat16)
    for routing in (QWEN3, GPT_OSS):
        with poisoned_allocations():
            r = route_kernel(logits, routing, 64)
        assert_same_routing(r, logits, routing)
        sorted_ids, expert_ids, padded = align_reference(r.topk_ids, 128, 64)
        assert torch.equal(r.sorted_ids[:padded].cpu(), sorted_ids)
        assert torch.equal(r.expert_ids[: padded // 64].cpu(), expert_ids)


# ---- the CUDA decode GEMMs (kernels/mma_decode.py) ------------------------------------------
def mma_config(w13: tuple, w2: tuple) -> configs.MoEConfig:
    g = configs.GemmConfig(64, 64, 4, 3)
    return configs.MoEConfig(16, g, g, "cuda_mma_decode", configs.MmaDecode(configs.MmaGemm(*w13), configs.MmaGemm(*w2)))


def test_mma_decode_says_why_it_cannot_run():
    from moeprep.kernels import mma_decode

    stored = prepare(random_layer("w4a16_preshuffle", 4, 128, 64)[0])
    x = torch.zeros(2, 128, dtype=torch.bfloat16)
    if not HAS_GPU:
        assert "needs a CUDA GPU of compute capability >= 8.0" in mma_decode.problems(stored, x, SILU)
    assert "needs bf16 activations in 16-byte aligned rows" in mma_decode.problems(stored, x.half(), SILU)
    permuted = prepare(random_layer("w4a16_preshuffle_zp", 4, 128, 64, desc_act=True)[0])
    assert "needs no input permutation" in mma_decode.problems(permuted, x, SILU)
    biased = prepare(random_layer("mxfp4_preshuffle", 4, 128, 64, bias=True)[0])
    fp32_bias = dataclasses.replace(biased, w2=dataclasses.replace(biased.w2, bias=biased.w2.bias.float()))
    assert "needs bf16 biases or none" in mma_decode.problems(fp32_bias, x, SWIGLU)
    odd = prepare(random_layer("w4a16_preshuffle", 4, 96, 64, group_size=16)[0])
    assert any("divisible by 64" in p for p in mma_decode.problems(odd, x, SILU))
    if _mma_built():  # MXFP4, both layouts, with biases and gpt-oss's activation
        for target in ("mxfp4_preshuffle", "mxfp4_moe"):
            mx = prepare(layer_to(random_layer(target, 4, 128, 128, bias=True)[0], DEVICE))
            assert mma_decode.problems(mx, x.to(DEVICE), SWIGLU) == []


def test_mma_decode_config_falls_back_where_it_does_not_apply():
    # fp16 activations everywhere, and no CUDA kernels on the CPU: the Triton GEMMs of the same config run
    layer, source = random_layer("w4a16_preshuffle", 8, 128, 64, group_size=32)
    cfg = mma_config((8, 8, 3), (4, 4, 2, 0))
    run_and_check(layer, source, QWEN3, SILU, 5, torch.float16, config=cfg)
    if not HAS_GPU:
        run_and_check(layer, source, QWEN3, SILU, 3, torch.bfloat16, config=cfg)


def _mma_built() -> bool:
    from moeprep.kernels import mma_decode

    return HAS_GPU and mma_decode.built()


MMA_VARIANTS = [((8, 8, 2), (8, 8, 2, 0)), ((4, 4, 3), (4, 4, 3, 1)), ((8, 2, 4), (8, 1, 2, 2)),
                ((4, 1, 2), (4, 2, 4, 0)), ((8, 4, 3), (8, 4, 3, 8))]


@pytest.mark.gpu
@pytest.mark.skipif(not _mma_built(), reason="needs a CUDA device and moeprep's CUDA decode kernels")
@pytest.mark.parametrize("target,group,act", [("w4a16_preshuffle", 32, SILU), ("w4a16_preshuffle", 128, SILU),
                                              ("w4a16_preshuffle_zp", 32, SILU), ("w4a16_preshuffle_zp", 64, SWIGLU),
                                              ("w4a16_preshuffle_zp", 128, SILU), ("mxfp4_preshuffle", 32, SWIGLU),
                                              ("mxfp4_preshuffle", 32, SILU), ("mxfp4_moe", 32, SWIGLU)])
def test_mma_decode_variants_small(target, group, act):
    # blocks of 8 routed rows: T = 37 with top-3 of 4 experts puts up to 37 rows on an expert; the
    # gpt-oss activation comes with biases (mxfp4_moe needs K in multiples of 128)
    layer, source = random_layer(target, 4, 256, max(2 * group, 128), group_size=group, bias=act is SWIGLU)
    for w13, w2 in MMA_VARIANTS:
        for T in (1, 3, 37):
            run_and_check(layer, source, Routing("softmax_topk", 3, False), act, T, torch.bfloat16,
                          config=mma_config(w13, w2))


@pytest.mark.gpu
@pytest.mark.skipif(not _mma_built(), reason="needs a CUDA device and moeprep's CUDA decode kernels")
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen3-30b-a3b-zp", "qwen3-30b-a3b-mxfp4_moe", "gpt-oss-120b",
                                   "mixtral-8x7b"])
def test_mma_decode_real_shapes(model):
    target, E, H, I, routing, act, bias, _ = MODELS[model]
    layer, source = random_layer(target, E, H, I, bias=bias, group_size=128 if target.endswith("_zp") else 32)
    for w13, w2 in MMA_VARIANTS:
        for T in (1, 4, 16, 64):
            run_and_check(layer, source, routing, act, T, torch.bfloat16, config=mma_config(w13, w2))


def _ops_check_operands(hidden: int, block_m: int):
    """What the ops-check tests start from: a 4-expert int4 layer (intermediate size 64) on the
    device, 2 tokens routed in blocks of ``block_m``, their activations and an output."""
    stored = prepare(layer_to(random_layer("w4a16_preshuffle", 4, hidden, 64)[0], DEVICE))
    r = route_kernel(torch.randn(2, 4, device=DEVICE), MIXTRAL, block_m)
    x = torch.randn(2, hidden, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(2, hidden, device=DEVICE, dtype=torch.bfloat16)
    return stored, r, x, out


@pytest.mark.gpu
@pytest.mark.skipif(not _mma_built(), reason="needs a CUDA device and moeprep's CUDA decode kernels")
def test_mma_decode_ops_check_their_arguments():
    stored, r, x, out = _ops_check_operands(128, 8)
    h = torch.empty(4, 64, device=DEVICE, dtype=torch.bfloat16)
    w = stored.w13
    with pytest.raises(RuntimeError, match="warps 4 or 8"):
        torch.ops.moeprep.moe_decode_w13(x, w.words, w.scale, w.zero, None, False, r.sorted_ids, r.expert_ids,
                                         r.num_padded, 2, False, 1.0, 1.0, 6, 2, 3, h, out)
    with pytest.raises(RuntimeError, match="x must be bf16"):
        torch.ops.moeprep.moe_decode_w13(x.half(), w.words, w.scale, w.zero, None, False, r.sorted_ids, r.expert_ids,
                                         r.num_padded, 2, False, 1.0, 1.0, 4, 4, 3, h, out)
    with pytest.raises(RuntimeError, match="keep gate and up apart"):
        torch.ops.moeprep.moe_decode_w13(x, w.words, w.scale, w.zero, None, True, r.sorted_ids, r.expert_ids,
                                         r.num_padded, 2, False, 1.0, 1.0, 4, 4, 3, h, out)
    short_bias = torch.zeros(3, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.moeprep.moe_decode_w13(x, w.words, w.scale, w.zero, short_bias, False, r.sorted_ids, r.expert_ids,
                                         r.num_padded, 2, False, 1.0, 1.0, 4, 4, 3, h, out)
    w2 = stored.w2
    with pytest.raises(RuntimeError, match="4-byte aligned"):
        torch.ops.moeprep.moe_decode_w2(h, w2.words, w2.scale, w2.zero, None, r.sorted_ids, r.expert_ids, r.num_padded,
                                        r.topk_weights, 4, 4, 3, 1,
                                        torch.empty(257, device=DEVICE, dtype=torch.bfloat16)[1:].view(2, 128))


# ---- the CUDA prefill GEMMs (kernels/wgmma_prefill.py) --------------------------------------
def wgmma_config() -> configs.MoEConfig:
    g = configs.GemmConfig(64, 64, 4, 3)
    return configs.MoEConfig(64, g, g, "cuda_wgmma_prefill")


def _wgmma_available() -> bool:
    from moeprep.kernels import wgmma_prefill

    return HAS_GPU and wgmma_prefill.available(torch.device(DEVICE))


def test_wgmma_prefill_says_why_it_cannot_run():
    from moeprep.kernels import wgmma_prefill

    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    mx = prepare(random_layer("mxfp4_preshuffle", 4, 256, 128)[0])
    assert "needs int4 codes" in wgmma_prefill.problems(mx, x, SILU)
    narrow = prepare(random_layer("w4a16_preshuffle", 4, 256, 64)[0])
    assert any("divisible by 128" in p for p in wgmma_prefill.problems(narrow, x, SILU))
    permuted = prepare(random_layer("w4a16_preshuffle_zp", 4, 256, 128, desc_act=True)[0])
    assert "needs no input permutation" in wgmma_prefill.problems(permuted, x, SILU)
    if not HAS_GPU:
        stored = prepare(random_layer("w4a16_preshuffle", 4, 256, 128)[0])
        assert wgmma_prefill.problems(stored, x, SILU) == ["needs a CUDA GPU of compute capability >= 8.0"]
        # the Triton GEMMs of the same config run instead
        layer, source = random_layer("w4a16_preshuffle", 4, 256, 128)
        run_and_check(layer, source, MIXTRAL, SILU, 3, torch.bfloat16, config=wgmma_config())


@pytest.mark.gpu
@pytest.mark.skipif(not _wgmma_available(), reason="needs an sm_90 GPU and moeprep's CUDA prefill kernels")
@pytest.mark.parametrize("target,group,act", [("w4a16_preshuffle", 32, SILU), ("w4a16_preshuffle", 128, SILU),
                                              ("w4a16_preshuffle_zp", 32, SILU), ("w4a16_preshuffle_zp", 64, SWIGLU),
                                              ("w4a16_preshuffle_zp", 128, SILU)])
def test_wgmma_prefill_variants_small(target, group, act):
    # blocks of 256 routed rows: T = 600 with top-3 of 4 experts puts up to 600 rows on an expert; the
    # gpt-oss activation comes with biases
    layer, source = random_layer(target, 4, 512, 256, group_size=group, bias=act is SWIGLU)
    for T in (1, 37, 600):
        run_and_check(layer, source, Routing("softmax_topk", 3, False), act, T, torch.bfloat16, config=wgmma_config())


@pytest.mark.gpu
@pytest.mark.skipif(not _wgmma_available(), reason="needs an sm_90 GPU and moeprep's CUDA prefill kernels")
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "qwen3-30b-a3b-zp", "mixtral-8x7b"])
def test_wgmma_prefill_real_shapes(model):
    target, E, H, I, routing, act, bias, _ = MODELS[model]
    layer, source = random_layer(target, E, H, I, bias=bias, group_size=128 if target.endswith("_zp") else 32)
    for T in (64, 512, 2048):
        run_and_check(layer, source, routing, act, T, torch.bfloat16, config=wgmma_config())


@pytest.mark.gpu
@pytest.mark.skipif(not _wgmma_available(), reason="needs an sm_90 GPU and moeprep's CUDA prefill kernels")
def test_wgmma_prefill_ops_check_their_arguments():
    stored, r, x, out = _ops_check_operands(256, 256)
    w = stored.w13
    r8 = route_kernel(torch.randn(2, 4, device=DEVICE), MIXTRAL, 8)
    h = torch.empty(r8.sorted_ids.numel(), 64, device=DEVICE, dtype=torch.bfloat16)  # h and xs in sorted order
    xs = torch.empty(r8.sorted_ids.numel(), 256, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="blocks of 256"):
        torch.ops.moeprep.moe_prefill_w13(x, w.words, w.scale, w.zero, None, r8.sorted_ids, r8.expert_ids,
                                          r8.num_padded, 2, False, 1.0, 1.0, xs, h, out)
    with pytest.raises(RuntimeError, match=r"h must be \[len\(sorted_ids\), I\]"):
        torch.ops.moeprep.moe_prefill_w13(x, w.words, w.scale, w.zero, None, r.sorted_ids, r.expert_ids,
                                          r.num_padded, 2, False, 1.0, 1.0, xs, h[:4], out)
    h = torch.empty(r.sorted_ids.numel(), 64, device=DEVICE, dtype=torch.bfloat16)
    shifted = torch.empty(r.sorted_ids.numel() * 256 + 1, device=DEVICE, dtype=torch.bfloat16)[1:].view(-1, 256)
    with pytest.raises(RuntimeError, match="16-byte aligned"):  # the tensor map's rows
        torch.ops.moeprep.moe_prefill_w13(x, w.words, w.scale, w.zero, None, r.sorted_ids, r.expert_ids,
                                          r.num_padded, 2, False, 1.0, 1.0, shifted, h, out)
    w2 = stored.w2  # K = 64
    with pytest.raises(RuntimeError, match="N and K multiples of 128"):
        torch.ops.moeprep.moe_prefill_w2(h, w2.words, w2.scale, w2.zero, None, r.sorted_ids, r.expert_ids,
                                         r.num_padded, r.topk_weights, out)
