"""On a GPU, ``load_moe_layer`` runs the fused kernels by default and matches the reference."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from test_formats_architectures import family  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "fmt, arch, target, options",
    [
        ("ct_int4", "qwen3_moe", "w4a16_preshuffle", {"sym": True}),
        ("awq", "mixtral", "w4a16_preshuffle_zp", {}),
        ("gptq", "qwen3_moe", "w4a16_preshuffle_zp", {"desc_act": True, "sym": False}),
        ("gptoss_mxfp4", "gpt_oss", "mxfp4_moe", {}),
        ("quark_mxfp4", "qwen3_moe", "mxfp4_preshuffle", {}),
    ],
)
def test_load_moe_layer_on_gpu_defaults_to_the_kernels(tmp_path, fmt, arch, target, options):
    import moeprep
    from packers import build_checkpoint

    src = build_checkpoint(tmp_path / "src", fmt, arch, **options)
    out = tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", target).returncode == 0
    fast = moeprep.load_moe_layer(str(out), 1, device="cuda", dtype=torch.bfloat16)
    assert fast.backend == "triton" and fast.w13_weight.is_cuda and fast.w13_weight.shuffle_kind == target
    slow = moeprep.load_moe_layer(str(out), 1, device="cpu", dtype=torch.float32, backend="reference")
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(0))
    want = slow(x)
    got = fast(x.to("cuda", torch.bfloat16)).float().cpu()
    assert float((got - want).norm() / want.norm()) <= 1e-2


@pytest.mark.parametrize(
    "fmt, arch, target, options",
    [("ct_int4", "qwen3_moe", "w4a16_preshuffle", {"sym": True}), ("gptq", "mixtral", "w4a16_preshuffle_zp", {"desc_act": True}),
     ("gptoss_mxfp4", "gpt_oss", "mxfp4_moe", {}), ("quark_mxfp4", "qwen3_moe", "mxfp4_preshuffle", {})],
)
def test_the_vllm_plugins_expert_computation_on_gpu_matches_the_cpu_path(tmp_path, fmt, arch, target, options):
    """What the vLLM plugin's MoE method computes on vLLM's routing (ChosenExperts): on the GPU the
    fused kernels on the stored bytes, against the CPU path (the exact reference) on the same
    inputs and the same top-k choices."""
    import moeprep
    from moeprep.moe import Activation
    from moeprep.serve.moe_block import ChosenExperts
    from packers import build_checkpoint

    src = build_checkpoint(tmp_path / "src", fmt, arch, **options)
    out = tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", target).returncode == 0
    act = Activation("swiglu_oai") if arch == "gpt_oss" else Activation("silu")
    cpu = moeprep.load(str(out)).experts(1)
    gpu = moeprep.load(str(out), device="cuda").experts(1)
    T, E, k = 37, cpu.num_experts, 2
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    x = torch.randn(T, cpu.hidden_size, generator=g)
    want = ChosenExperts(cpu, act)(x, weights, ids)
    got = ChosenExperts(gpu, act)(x.to("cuda", torch.bfloat16), weights.cuda(), ids.cuda()).float().cpu()
    assert float((got - want).norm() / want.norm()) <= 1e-2


@pytest.mark.parametrize("name, target", [("gptq_g32_descact0_qwen35moe_text", "w4a16_preshuffle_zp"),
                                          ("ct_w4a16_g32_sym_kimik2_deepseekv3", "w4a16_preshuffle"),
                                          ("packed_ct_int4_asym_glm45", "w4a16_preshuffle_zp"),
                                          ("packed_quark_mxfp4_deepseekr1", "mxfp4_moe")])
def test_the_new_families_run_the_kernels_on_gpu(family, tmp_path, name, target):
    """Qwen3.5-MoE (softmax top-k, gated shared expert), DeepSeek-V3 in Kimi-K2's layout, GLM-4.5
    and DeepSeek-R1 MXFP4 (noaux_tc: torch routes, the kernels compute the experts; shared experts;
    dense first layers): every layer's MLP on the GPU in bf16 against the CPU reference in fp32."""
    import json

    import moeprep

    src, out = family(name), tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", target, "-q").returncode == 0
    cfg = json.loads((src / "config.json").read_text())
    x = torch.randn(23, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    for layer in range(cfg["num_hidden_layers"]):
        fast = moeprep.load_moe_layer(str(out), layer, device="cuda", dtype=torch.bfloat16)
        slow = moeprep.load_moe_layer(str(out), layer, device="cpu", dtype=torch.float32, backend="reference")
        want = slow(x)
        got = fast(x.to("cuda", torch.bfloat16)).float().cpu()
        assert float((got - want).norm() / want.norm()) <= 1e-2, (layer, getattr(fast, "backend", "dense"))
