"""The readers on the formats without a fixture: checkpoints from the independent packers
(tests/packers), each with the packer's own exact reference."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cases import BY_ID, CASE_IDS
from conftest import run_cli
from test_formats_fixtures import assert_bit_equal


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_dequant_matches_packer_reference(packed, tmp_path, case_id):
    src = packed(case_id)
    out = tmp_path / "deq.safetensors"
    proc = run_cli("dequant", str(src), str(out))
    assert proc.returncode == 0, proc.stderr
    assert_bit_equal(load_file(out), load_file(src / "ref_dequant.safetensors"))


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_inspect_json(packed, case_id):
    case = BY_ID[case_id]
    src = packed(case_id)
    proc = run_cli("inspect", str(src), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    packer = json.loads((src / "packer_info.json").read_text())
    assert info["format"] == case.format
    assert info["architecture"] == case.arch
    assert info["moe_layers"] == 2 and info["num_experts"] == 8
    assert info["group_size"] == case.group_size
    assert info["symmetric"] is case.symmetric
    assert info["desc_act"] is case.desc_act
    assert info["expert_shapes"] == {"gate": [128, 256], "up": [128, 256], "down": [256, 128]}
    assert set(info["tensors"]["experts"]).isdisjoint(info["tensors"]["plain"])
    for router in packer["routers"]:
        assert any(name.startswith(router) for name in info["tensors"]["plain"]), router


def test_gpt_oss_experts_are_split_per_expert(packed, tmp_path):
    out = tmp_path / "deq.safetensors"
    assert run_cli("dequant", str(packed("gptoss_mxfp4")), str(out)).returncode == 0
    names = set(load_file(out))
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert not any("self_attn" in n for n in names)  # gpt-oss attention is not quantized


def test_mixtral_original_names_are_kept(packed, tmp_path):
    out = tmp_path / "deq.safetensors"
    assert run_cli("dequant", str(packed("awq_mixtral_original")), str(out)).returncode == 0
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in set(load_file(out))


def test_dequant_streams_one_linear_at_a_time(packed, tmp_path, monkeypatch):
    """Memory stays bounded by one module: each linear is read, dequantized, written, dropped."""
    from moeprep import dequant as dequant_mod
    from moeprep.io.checkpoint import Checkpoint
    from moeprep.model import build_model_map

    live = []
    original = dequant_mod.dequantize

    def spy(ql, dtype=torch.float32):
        w = original(ql, dtype)
        live.append(w.numel())
        return w

    monkeypatch.setattr(dequant_mod, "dequantize", spy)
    model = build_model_map(Checkpoint(packed("gptq_v2_asym")))
    dequant_mod.dequantize_checkpoint(model, tmp_path / "o.safetensors")
    assert max(live) == 256 * 256  # the largest single linear, never a stacked layer
    assert torch.equal(load_file(tmp_path / "o.safetensors")["model.layers.0.self_attn.q_proj.weight"],
                       load_file(packed("gptq_v2_asym") / "ref_dequant.safetensors")["model.layers.0.self_attn.q_proj.weight"])
