"""The readers on the real fixtures: dequant is bit-exact against each quantizer's own reference,
inspect reports the right facts from headers alone, the hub path works offline."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REAL_FIXTURES, run_cli, run_cli_subprocess

EXPECTED_SYMMETRIC = {
    "awq_gemm_g32_qwen3moe": False,
    "ct_w4a16_g32_sym_qwen3moe": True,
    "gptq_g32_descact0_qwen3moe": True,
    "quark_mxfp4_qwen3moe": True,
}


def assert_bit_equal(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have.view(torch.int32), want.view(torch.int32)), f"{name}: max abs diff {(have - want).abs().max()}"


@pytest.mark.parametrize("name", sorted(REAL_FIXTURES))
def test_dequant_matches_quantizer_reference_bit_for_bit(fixtures_dir, tmp_path, name):
    out = tmp_path / "deq.safetensors"
    proc = run_cli("dequant", str(fixtures_dir / name), str(out))
    assert proc.returncode == 0, proc.stderr
    ref = load_file(fixtures_dir / name / "ref_dequant.safetensors")
    assert len(ref) == 56
    assert_bit_equal(load_file(out), ref)


def test_dequant_bfloat16_is_the_rounded_reference(fixtures_dir, tmp_path):
    name = "awq_gemm_g32_qwen3moe"
    out = tmp_path / "deq.safetensors"
    assert run_cli("dequant", str(fixtures_dir / name), str(out), "--dtype", "bfloat16").returncode == 0
    got = load_file(out)
    for key, want in load_file(fixtures_dir / name / "ref_dequant.safetensors").items():
        assert torch.equal(got[key], want.to(torch.bfloat16)), key


@pytest.mark.parametrize("name", sorted(REAL_FIXTURES))
def test_inspect_json(fixtures_dir, name):
    proc = run_cli("inspect", str(fixtures_dir / name), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["format"] == REAL_FIXTURES[name]
    assert info["architecture"] == "qwen3_moe"
    assert info["moe_layers"] == 2
    assert info["num_experts"] == 8
    assert info["group_size"] == 32
    assert info["bits"] == 4
    assert info["symmetric"] is EXPECTED_SYMMETRIC[name]
    assert info["desc_act"] is False
    assert info["expert_shapes"] == {"gate": [128, 256], "up": [128, 256], "down": [256, 128]}
    with safe_open(fixtures_dir / name / "model.safetensors", "pt") as f:
        names = set(f.keys())
    t = info["tensors"]
    # every tensor lands in exactly one class
    assert sorted(t["experts"] + t["quantized_linears"] + t["plain"]) == sorted(names)
    assert all(".experts." in n for n in t["experts"])
    assert all(".self_attn." in n for n in t["quantized_linears"])
    assert "model.layers.0.mlp.gate.weight" in t["plain"] and "lm_head.weight" in t["plain"]


def test_inspect_reads_no_tensor_data(fixtures_dir, tmp_path):
    """Scrambling every data byte (header kept) changes nothing: inspect is header-only."""
    src = fixtures_dir / "gptq_g32_descact0_qwen3moe"
    copy = tmp_path / "scrambled"
    shutil.copytree(src, copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:] = bytes(len(raw) - start)
    weights.write_bytes(bytes(raw))
    before = run_cli("inspect", str(src), "--json")
    after = run_cli("inspect", str(copy), "--json")
    assert after.returncode == 0, after.stderr
    assert json.loads(before.stdout)["tensors"] == json.loads(after.stdout)["tensors"]


def test_hub_repo_id_from_offline_cache(fixtures_dir, tmp_path):
    """A hub repo id resolves from the local cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-moe-awq"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(fixtures_dir / "awq_gemm_g32_qwen3moe", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli_subprocess("inspect", "acme/tiny-moe-awq", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "awq"
    missing = run_cli_subprocess("inspect", "acme/not-cached", env=env)
    assert missing.returncode == 2 and "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("exc, words", [
    ("GatedRepoError", "gated"), ("RepositoryNotFoundError", "no such hub repo"),
    ("RevisionNotFoundError", "no such revision"), ("LocalEntryNotFoundError", "not in the local hub cache"),
    ("ConnectError", "could not be reached"), ("SomethingElse", "could not be fetched (SomethingElse)"),
])
def test_hub_failures_are_said_in_words(monkeypatch, exc, words):
    from moeprep.io.hub import explain

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert words in explain(type(exc, (Exception,), {})())


def test_hub_revision_and_cache_dir(fixtures_dir, tmp_path):
    """--cache-dir names the hub cache, --revision a branch in it (offline: from the cache alone)."""
    cache = tmp_path / "elsewhere"
    repo = cache / "models--acme--two-revisions"
    for ref, commit, fixture in (("main", "1" * 40, "awq_gemm_g32_qwen3moe"), ("mxfp4", "2" * 40, "quark_mxfp4_qwen3moe")):
        shutil.copytree(fixtures_dir / fixture, repo / "snapshots" / commit)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    main = run_cli_subprocess("inspect", "acme/two-revisions", "--json", "--cache-dir", str(cache), env=env)
    assert main.returncode == 0, main.stderr
    assert json.loads(main.stdout)["format"] == "awq"
    other = run_cli_subprocess("inspect", "acme/two-revisions", "--json", "--cache-dir", str(cache), "--revision", "mxfp4", env=env)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["format"] == "quark-mxfp4"
    assert run_cli_subprocess("inspect", "acme/two-revisions", env=env).returncode == 2  # not in the default cache
