"""The MoE families beyond Qwen3-MoE, Mixtral and gpt-oss (tests/data/ARCHITECTURES.md), on the
checkpoints their quantizers wrote: read exactly, converted and verified, inspected, and every
decoder layer's MLP served as a reference written here from ARCHITECTURES.md's math computes it; a
family moeprep does not know is still dequantized, and refused by convert in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli
from test_commands_convert import accepting_targets
from test_formats_fixtures import assert_bit_equal

FAMILIES = {  # fixture: (architecture, MoE layers, routed experts)
    "gptq_g32_descact0_qwen35moe_text": ("qwen3_5_moe", [0, 1], 8),
    "ct_w4a16_g32_sym_kimik2_deepseekv3": ("deepseek_v3", [1], 8),
    "packed_ct_int4_asym_glm45": ("glm4_moe", [1], 8),
    "packed_quark_mxfp4_deepseekr1": ("deepseek_v3", [1, 2], 8),
    "packed_ct_int4_qwen35moe_text": ("qwen3_5_moe", [0, 1], 8),
    "packed_ct_int4_qwen35moe_multimodal": ("qwen3_5_moe", [0, 1], 8),
    "packed_gptq_asym_descact_qwen35moe_multimodal": ("qwen3_5_moe", [0, 1], 8),
}
# The layouts without a real fixture, written by tests/packers from ARCHITECTURES.md: GLM-4.5 in
# llm-compressor's asymmetric int4 (attention biases, quantized dense layer and shared experts),
# DeepSeek-R1 in AMD Quark's MXFP4 (MLA, dense layer and shared experts quantized too) with
# group-limited routing; Qwen3.5-MoE in llm-compressor's int4 (text and the published multimodal
# layout) and in GPTQModel's asymmetric act-order GPTQ (multimodal).
PACKED = {
    "packed_ct_int4_asym_glm45": ("ct_int4", "glm4_moe", {"sym": False}),
    "packed_quark_mxfp4_deepseekr1": ("quark_mxfp4", "deepseek_v3", {"num_layers": 3, "n_group": 4, "topk_group": 2}),
    "packed_ct_int4_qwen35moe_text": ("ct_int4", "qwen3_5_moe", {"shared_intermediate": 128}),  # the real models' widths
    "packed_ct_int4_qwen35moe_multimodal": ("ct_int4", "qwen3_5_moe", {"multimodal": True}),
    "packed_gptq_asym_descact_qwen35moe_multimodal": ("gptq", "qwen3_5_moe",
                                                      {"multimodal": True, "sym": False, "desc_act": True}),
}


@pytest.fixture(scope="module")
def family(arch_fixtures_dir, fixtures_dir, tmp_path_factory):
    """``family(name)``: the real fixture of that name, or the packed checkpoint (built once, with
    the fixtures' tokenizer, as real checkpoints ship one)."""
    from packers import build_checkpoint

    root, built = tmp_path_factory.mktemp("families"), {}

    def get(name: str):
        if name not in PACKED:
            return arch_fixtures_dir / name
        if name not in built:
            fmt, arch, options = PACKED[name]
            built[name] = build_checkpoint(root / name, fmt, arch, tokenizer_dir=fixtures_dir / "base_qwen3moe_bf16",
                                           **options)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_dequant_matches_the_quantizers_reference(family, tmp_path, name):
    src = family(name)
    out = tmp_path / "deq.safetensors"
    assert run_cli("dequant", str(src), str(out), "-q").returncode == 0
    assert_bit_equal(load_file(out), load_file(src / "ref_dequant.safetensors"))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_inspect_reports_the_family(family, name):
    src = family(name)
    info = json.loads(run_cli("inspect", str(src), "--json").stdout)
    arch, layers, experts = FAMILIES[name]
    assert info["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
    assert (info["architecture"], info["moe_layer_indices"], info["num_experts"]) == (arch, layers, experts)
    assert info["moe_layers"] == len(layers) and info["top_k"] == 2
    assert info["shared_expert_layers"] == layers  # every MoE layer of both families has them
    assert info["routing"] == {"qwen3_5_moe": "softmax_topk_renorm", "deepseek_v3": "noaux_tc", "glm4_moe": "noaux_tc"}[arch]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_convert_verify_and_dequant_the_conversion(family, tmp_path, name):
    src = family(name)
    ref = load_file(src / "ref_dequant.safetensors")
    targets = accepting_targets(src)
    assert "canonical" in targets and len(targets) >= 2  # the int4 preshuffles too
    for target in targets:
        out = tmp_path / target
        assert run_cli("convert", str(src), str(out), "--target", target, "-q").returncode == 0
        assert run_cli("verify", str(src), str(out)).returncode == 0, target
        assert run_cli("dequant", str(out), str(tmp_path / f"{target}.safetensors"), "-q").returncode == 0
        assert_bit_equal(load_file(tmp_path / f"{target}.safetensors"), ref)
        if FAMILIES[name][0] != "qwen3_5_moe":  # the router's correction bias is carried byte for byte (verify checks it)
            index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
            assert "model.layers.1.mlp.gate.e_score_correction_bias" in index


def _weights(src):
    """Every weight of a fixture as fp32 [out, in]: the quantizer's own dequantization of what it
    quantized, the stored tensors of the rest; the multimodal layout's language model under the
    text layout's names (ARCHITECTURES.md)."""
    from safetensors import safe_open

    plain = {}
    for f in src.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as h:
            plain.update({k: h.get_tensor(k).float() for k in h.keys()})
    weights = {**plain, **load_file(src / "ref_dequant.safetensors")}
    return {k.replace("model.language_model.", "model.", 1): v for k, v in weights.items()}


def _text_config(src):
    """The language model's config: the top level, or text_config in the multimodal layout."""
    cfg = json.loads((src / "config.json").read_text())
    return cfg.get("text_config", cfg)


def _mlp(w, module, x):
    """ARCHITECTURES.md: every expert, shared expert and dense MLP is down(silu(gate x) * up x)."""
    def lin(name, v):
        return v @ w[f"{module}.{name}.weight"].T

    return lin("down_proj", torch.nn.functional.silu(lin("gate_proj", x)) * lin("up_proj", x))


def _reference_layer(w, cfg, layer, x):
    """The MLP of one decoder layer, from ARCHITECTURES.md's math alone, in fp32."""
    p = f"model.layers.{layer}.mlp"
    if f"{p}.gate.weight" not in w:  # a dense layer
        return _mlp(w, p, x)
    logits = x @ w[f"{p}.gate.weight"].T
    k = cfg["num_experts_per_tok"]
    if cfg["model_type"].startswith("qwen3_5"):
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # always
        shared = torch.sigmoid(x @ w[f"{p}.shared_expert_gate.weight"].T) * _mlp(w, f"{p}.shared_expert", x)
    else:  # noaux_tc
        scores = torch.sigmoid(logits)
        choice = scores + w[f"{p}.gate.e_score_correction_bias"]
        groups = choice.view(x.shape[0], cfg["n_group"], -1)  # contiguous groups of E / n_group experts
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group_score, dtype=torch.bool)
        kept.scatter_(1, group_score.topk(cfg["topk_group"], dim=-1).indices, True)
        choice = groups.masked_fill(~kept[..., None], float("-inf")).view_as(choice)
        ids = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg["norm_topk_prob"]:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * cfg["routed_scaling_factor"]
        shared = _mlp(w, f"{p}.shared_experts", x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            out[t] += weights[t, j] * _mlp(w, f"{p}.experts.{int(ids[t, j])}", x[t : t + 1])[0]
    return out + shared


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_layer_matches_a_dense_reference(family, tmp_path, name):
    import moeprep

    src = family(name)
    w, cfg = _weights(src), _text_config(src)
    x = torch.randn(9, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    for target in accepting_targets(src):
        out = tmp_path / target
        assert run_cli("convert", str(src), str(out), "--target", target, "-q").returncode == 0
        loaded = moeprep.load(str(out))
        for layer in range(cfg["num_hidden_layers"]):
            got = moeprep.load_moe_layer(loaded, layer)(x)
            want = _reference_layer(w, cfg, layer, x)
            err = float((got - want).norm() / want.norm())
            assert err <= 1e-5, (target, layer, err)


def test_noaux_tc_group_limit():
    """With several groups, only the topk_group groups whose two best biased scores sum highest
    may be chosen; the weights are the unbiased scores, renormalised, scaled."""
    from moeprep.moe import Routing, route

    routing = Routing("noaux_tc", 2, True, n_group=4, topk_group=2, scaling=2.5)
    logits = torch.tensor([[0.0, 0.1, 5.0, 0.2, 1.0, 1.1, -3.0, 0.3]])  # groups of 2: g1 best, then g2
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0, 0.0])  # lifts expert 6 (group 3) into the top groups
    weights, ids = route(logits, routing, bias)
    assert sorted(ids[0].tolist()) == [2, 6]
    s = torch.sigmoid(logits[0])
    want = torch.stack([s[i] for i in ids[0].tolist()])
    torch.testing.assert_close(weights[0], want / want.sum() * 2.5)


def test_an_unknown_family_is_dequantized_and_refused_by_convert(fixtures_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "awq_gemm_g32_qwen3moe", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "brand_new_moe"
    (src / "config.json").write_text(json.dumps(cfg))
    assert run_cli("dequant", str(src), str(tmp_path / "w.safetensors"), "-q").returncode == 0
    assert_bit_equal(load_file(tmp_path / "w.safetensors"),
                     load_file(fixtures_dir / "awq_gemm_g32_qwen3moe" / "ref_dequant.safetensors"))
    assert_clean_error(run_cli("convert", str(src), str(tmp_path / "out")), "brand_new_moe", "moeprep/arch.py")


def test_the_multimodal_qwen35_layout(arch_fixtures_dir, tmp_path):
    """The published Qwen3.5 checkpoints are the multimodal class (ARCHITECTURES.md): the numbers
    under text_config, the text layers under model.language_model. Made from the text fixture by
    that description alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    text = arch_fixtures_dir / "gptq_g32_descact0_qwen35moe_text"
    src = tmp_path / "multimodal"
    shutil.copytree(text, src)

    def moved(name: str) -> str:
        return name.replace("model.layers.", "model.language_model.layers.", 1)

    for f in ("model.safetensors", "ref_dequant.safetensors"):
        with safe_open(str(text / f), "pt") as h:
            meta = h.metadata()
        save_file({moved(k): v for k, v in load_file(text / f).items()}, src / f, metadata=meta)
    cfg = json.loads((text / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    outer = {"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
             "text_config": cfg, "quantization_config": qc}
    (src / "config.json").write_text(json.dumps(outer))
    info = json.loads(run_cli("inspect", str(src), "--json").stdout)
    assert (info["architecture"], info["moe_layer_indices"], info["num_experts"], info["top_k"]) == ("qwen3_5_moe", [0, 1], 8, 2)
    assert run_cli("dequant", str(src), str(tmp_path / "w.safetensors"), "-q").returncode == 0
    assert_bit_equal(load_file(tmp_path / "w.safetensors"), load_file(src / "ref_dequant.safetensors"))
    out = tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "-q").returncode == 0
    assert run_cli("verify", str(src), str(out)).returncode == 0
    assert any(n.startswith("model.language_model.layers.1.mlp.experts.w13")
               for n in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])


def test_experts_fused_in_3d_are_refused_by_name(fixtures_dir, tmp_path):
    """llm-compressor's repack_moe writes each layer's experts as one 3-D tensor per projection
    (ARCHITECTURES.md): every command refuses it in one line naming a fused tensor, none misreads it."""
    src = tmp_path / "repacked"
    shutil.copytree(fixtures_dir / "ct_w4a16_g32_sym_qwen3moe", src)
    tensors = load_file(src / "model.safetensors")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        for part in ("weight_packed", "weight_scale"):
            experts = range(8)
            tensors[f"{p}.gate_up_proj.{part}"] = torch.stack(
                [torch.cat([tensors.pop(f"{p}.{e}.gate_proj.{part}"), tensors.pop(f"{p}.{e}.up_proj.{part}")]) for e in experts])
            tensors[f"{p}.down_proj.{part}"] = torch.stack([tensors.pop(f"{p}.{e}.down_proj.{part}") for e in experts])
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                tensors.pop(f"{p}.{e}.{proj}.weight_shape")
    from safetensors.torch import save_file

    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    for args in (["inspect", str(src)], ["dequant", str(src), str(tmp_path / "w.safetensors")],
                 ["convert", str(src), str(tmp_path / "out")]):
        assert_clean_error(run_cli(*args), "repack_moe", ".experts.")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w.safetensors").exists()


# the packed checkpoints whose shared experts are as wide as a routed expert: their shared module
FUSABLE = {"packed_ct_int4_asym_glm45": "shared_experts", "packed_quark_mxfp4_deepseekr1": "shared_experts",
           "packed_ct_int4_qwen35moe_text": "shared_expert"}


@pytest.mark.parametrize("name", sorted(FUSABLE))
def test_fused_shared_experts_are_stacked_last_and_undone_exactly(family, tmp_path, name):
    """convert --fuse-shared-experts: the shared expert is expert E of the stacked tensors, the
    metadata says so, verify and dequant undo it exactly, and the served layer is unchanged."""
    import moeprep

    src = family(name)
    ref = load_file(src / "ref_dequant.safetensors")
    cfg = _text_config(src)
    w = _weights(src)
    x = torch.randn(9, cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    layers = FAMILIES[name][1]
    for target in accepting_targets(src):
        out = tmp_path / target
        assert run_cli("convert", str(src), str(out), "--target", target, "--fuse-shared-experts", "-q").returncode == 0
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["fused_shared_experts"] == FUSABLE[name] and qc["num_experts"] == 8
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        assert not [n for n in index if f".{FUSABLE[name]}." in n]  # no copy beside the stacked one
        with safe_open(str(out / index[f"model.layers.{layers[0]}.mlp.experts.w13_weight"]), "pt") as f:
            assert f.get_slice(f"model.layers.{layers[0]}.mlp.experts.w13_weight").get_shape()[0] == 9
        assert run_cli("verify", str(src), str(out)).returncode == 0, target
        assert run_cli("dequant", str(out), str(tmp_path / f"{target}.safetensors"), "-q").returncode == 0
        assert_bit_equal(load_file(tmp_path / f"{target}.safetensors"), ref)
        loaded = moeprep.load(str(out))
        for layer in layers:
            got = moeprep.load_moe_layer(loaded, layer)(x)
            want = _reference_layer(w, cfg, layer, x)
            assert float((got - want).norm() / want.norm()) <= 1e-5, (target, layer)


def test_verify_finds_a_changed_byte_of_a_fused_shared_expert(family, tmp_path):
    src = family("packed_ct_int4_asym_glm45")
    out = tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", "canonical", "--fuse-shared-experts", "-q").returncode == 0
    name = "model.layers.1.mlp.experts.w13_weight"
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[name][8].view(-1)[0] ^= 0x11  # expert 8: the shared expert's gate codes
    save_file(tensors, str(shard), metadata=meta)
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1 and "model.layers.1.mlp.shared_experts.gate_proj: codes differ" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name, words", [
    ("ct_w4a16_g32_sym_kimik2_deepseekv3", "no shared expert quantized like its experts"),  # stored in bf16
    ("gptq_g32_descact0_qwen35moe_text", "the shared gate projection is stored as [64, 256]"),  # half the width
])
def test_shared_experts_that_cannot_be_fused_are_refused_by_name(family, tmp_path, name, words):
    proc = run_cli("convert", str(family(name)), str(tmp_path / "out"), "--fuse-shared-experts")
    assert_clean_error(proc, words)
    assert not (tmp_path / "out").exists()


def test_a_family_without_shared_experts_refuses_to_fuse_them(fixtures_dir, tmp_path):
    proc = run_cli("convert", str(fixtures_dir / "awq_gemm_g32_qwen3moe"), str(tmp_path / "out"), "--fuse-shared-experts")
    assert_clean_error(proc, "qwen3_moe has no shared experts")


def test_transformers_serves_a_fused_conversion_as_the_unfused_one(family, tmp_path):
    pytest.importorskip("transformers")
    from moeprep.hf import load_model

    src = family("packed_ct_int4_asym_glm45")
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    logits = []
    for flags in ([], ["--fuse-shared-experts"]):
        out = tmp_path / f"out{len(flags)}"
        assert run_cli("convert", str(src), str(out), "--target", "canonical", "-q", *flags).returncode == 0
        with torch.no_grad():
            logits.append(load_model(str(out), dtype=torch.float32)(ids).logits)
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("name, target", [("packed_ct_int4_asym_glm45", "w4a16_preshuffle_zp"),
                                          ("packed_quark_mxfp4_deepseekr1", "mxfp4_preshuffle"),
                                          ("packed_ct_int4_qwen35moe_text", "w4a16_preshuffle")])
def test_the_fused_kernels_compute_a_fused_shared_expert_with_the_routed_ones(family, tmp_path, name, target):
    """One fused_experts call on top-k + 1 choices (the shared expert last, at weight 1 or at
    Qwen3.5's sigmoid gate) gives the reference's routed experts plus shared expert."""
    import os

    import moeprep

    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs the kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = tmp_path / "out"
    assert run_cli("convert", str(family(name)), str(out), "--target", target, "--fuse-shared-experts", "-q").returncode == 0
    loaded = moeprep.load(str(out), device)
    x = torch.randn(5, loaded.config["hidden_size"], generator=torch.Generator().manual_seed(0)).to(device)
    layer = FAMILIES[name][1][-1]
    want = moeprep.load_moe_layer(loaded, layer, device, backend="reference")(x)
    got = moeprep.load_moe_layer(loaded, layer, device, backend="triton")(x)
    assert float((got - want).norm() / want.norm()) <= (1e-2 if device == "cuda" else 1e-5)
