"""The transformers path: ``import moeprep`` registers moeprep's quantization method, so that
``AutoModelForCausalLM.from_pretrained(OUT)`` loads the converted bytes as they are and computes
with moeprep's MoE blocks; checked against transformers' own model built from the source config
with the quantizer's reference weights (ref_dequant), for every family transformers implements."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_formats_architectures import FAMILIES, family  # noqa: F401  (family: a fixture)
from test_serve import converted, read_plain, rel_err  # noqa: F401  (converted: a fixture)

transformers = pytest.importorskip("transformers")

RENAMES = {"mixtral": (".mlp.", ".block_sparse_moe.")}  # transformers' module -> the checkpoint's
CANONICAL_TYPE = {"kimi_k2": "deepseek_v3"}  # Kimi-K2 ships DeepSeek-V3's model under its own model_type


def _config(src: Path):
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization_config", None)
    model_type = CANONICAL_TYPE.get(raw["model_type"], raw["model_type"])
    return transformers.CONFIG_MAPPING[model_type].from_dict(raw)


def transformers_reference(src: Path):
    """transformers' own model, from the source config, with ref_dequant's dense weights."""
    config = _config(src)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref = load_file(src / "ref_dequant.safetensors")
    old, new_name = RENAMES.get(config.model_type, (".mlp.", ".mlp."))
    # the multimodal layout keeps the language model under model.language_model (ARCHITECTURES.md)
    text_prefix = "model.language_model." if "text_config" in json.loads((src / "config.json").read_text()) else "model."
    state = {}
    for name, param in model.state_dict().items():
        stored = name.replace(old, new_name)
        if stored.startswith("model."):
            stored = text_prefix + stored[len("model."):]
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            q = stored.rsplit(".", 1)[0]
            names = ("w1", "w3", "w2") if f"{q}.0.w1.weight" in ref else ("gate_proj", "up_proj", "down_proj")
            g, u, d = (torch.stack([ref[f"{q}.{e}.{n}.weight"] for e in range(param.shape[0])]) for n in names)
            if name.endswith(".down_proj"):
                state[name] = d.transpose(1, 2).contiguous() if config.model_type == "gpt_oss" else d
            elif config.model_type == "gpt_oss":  # [E, H, 2I], gate and up interleaved
                gate_up = torch.empty(g.shape[0], g.shape[2], 2 * g.shape[1])
                gate_up[..., 0::2], gate_up[..., 1::2] = g.transpose(1, 2), u.transpose(1, 2)
                state[name] = gate_up
            else:
                state[name] = torch.cat([g, u], dim=1)
        elif stored in ref:
            state[name] = ref[stored]
        else:
            state[name] = read_plain(src, stored).float()
    model.load_state_dict(state)
    return model


def assert_logits_match(src: Path, out: Path) -> None:
    from moeprep.hf import load_model

    ours = load_model(str(out), dtype=torch.float32)
    theirs = transformers_reference(src)
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert rel_err(a, b) <= 1e-4, rel_err(a, b)


@pytest.mark.parametrize(
    "source, target",
    [("awq_gemm_g32_qwen3moe", "w4a16_preshuffle_zp"), ("ct_int4_sym_mixtral_llmc", "w4a16_preshuffle"),
     ("gptq_v1_asym_descact_mixtral_sharded", "w4a16_preshuffle_zp"), ("gptoss_mxfp4", "mxfp4_moe"),
     ("quark_mxfp4_qwen3moe", "mxfp4_preshuffle")],
)
def test_logits_match_transformers(converted, source, target):
    assert_logits_match(*converted(source, target))


@pytest.mark.parametrize("name, target", [("gptq_g32_descact0_qwen35moe_text", "w4a16_preshuffle_zp"),
                                          ("ct_w4a16_g32_sym_kimik2_deepseekv3", "w4a16_preshuffle"),
                                          ("packed_ct_int4_asym_glm45", "w4a16_preshuffle_zp"),
                                          ("packed_quark_mxfp4_deepseekr1", "mxfp4_moe"),
                                          ("packed_ct_int4_qwen35moe_text", "w4a16_preshuffle"),
                                          ("packed_ct_int4_qwen35moe_multimodal", "w4a16_preshuffle"),
                                          ("packed_gptq_asym_descact_qwen35moe_multimodal", "w4a16_preshuffle_zp")])
def test_logits_match_transformers_for_the_new_families(family, tmp_path, name, target):
    src, out = family(name), tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", target, "-q").returncode == 0
    assert_logits_match(src, out)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_generate_runs_every_family(family, tmp_path, name):
    """``moeprep generate`` on a conversion of every family (Qwen3.5 in both layouts, DeepSeek-V3
    as Kimi-K2 ships it, DeepSeek-R1, GLM-4.5), through the default target it converts to."""
    out = tmp_path / "out"
    assert run_cli("convert", str(family(name)), str(out), "-q").returncode == 0
    proc = run_cli("generate", str(out), "--prompt", "Return the", "--max-new-tokens", "4")
    assert proc.returncode == 0 and proc.stdout.startswith("Return the") and len(proc.stdout) > len("Return the\n")


LOAD = """
import json, sys
import moeprep  # registers the quantization method; nothing else is called
import torch, transformers
model, info = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, output_loading_info=True)
experts = [p for n, p in model.named_parameters() if n.endswith(("w13_weight", "w2_weight"))]
pipe = transformers.pipeline("text-generation", model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(sys.argv[1]))
text = pipe("Return the", max_new_tokens=4, do_sample=False)[0]["generated_text"]
print(json.dumps({"info": {k: sorted(map(str, v)) for k, v in info.items()}, "experts": len(experts),
                  "tags": sorted({(p.is_shuffled, p.shuffle_kind) for p in experts}), "text": text}))
"""


def test_from_pretrained_after_import_moeprep(converted):
    """In a fresh interpreter: no registration call, no missing or unexpected keys, the expert
    parameters tagged, and a pipeline generates."""
    _, out = converted("ct_w4a16_g32_sym_qwen3moe", "w4a16_preshuffle")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert got["experts"] == 2 * 2 and got["tags"] == [[True, "w4a16_preshuffle"]]
    assert got["text"].startswith("Return the") and len(got["text"]) > len("Return the")


def test_importing_moeprep_imports_neither_torch_nor_transformers():
    code = "import sys, moeprep; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_a_stored_tensor_left_unloaded_is_an_error(converted, monkeypatch):
    """Where transformers' loader does not place a stored tensor (here its placing function skips
    one), the model is refused by name instead of computing with the memory transformers fills in."""
    import transformers.core_model_loading as loading

    from moeprep.errors import BadInputError

    place = loading.set_param_for_module

    def skipping(model, target_name, *args, **kwargs):
        if not target_name.endswith("layers.0.mlp.experts.w2_weight_scale"):
            place(model, target_name, *args, **kwargs)

    monkeypatch.setattr(loading, "set_param_for_module", skipping)
    _, out = converted("ct_w4a16_g32_sym_qwen3moe", "w4a16_preshuffle")
    with pytest.raises(BadInputError, match="was not loaded") as e:
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert "model.layers.0.mlp.experts.w2_weight_scale" in str(e.value)
