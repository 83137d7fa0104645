"""Conversion: every format into every target that accepts it, proven by verify and dequant;
the CLI's guarantees (refusals, existing OUT, dry run, no double shuffle, sharding)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cases import CASE_IDS
from conftest import REAL_FIXTURES, assert_clean_error, run_cli, source_dir
from test_formats_fixtures import assert_bit_equal

ALL_SOURCES = sorted(REAL_FIXTURES) + CASE_IDS


def accepting_targets(src: Path) -> list[str]:
    from moeprep.io.checkpoint import Checkpoint
    from moeprep.model import build_model_map
    from moeprep.targets import TARGETS

    model = build_model_map(Checkpoint(src))
    return [name for name, t in TARGETS.items() if not model.target_problems(t)]


def assert_loads_with_plain_safetensors(out: Path) -> dict[str, str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert sorted(p.name for p in shards) == sorted(set(index["weight_map"].values()))
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
            for name in f.keys():
                assert name not in seen, f"{name} in two shards"
                seen[name] = shard.name
                t = f.get_tensor(name)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    return seen


def assert_plain_tensors_identical(src: Path, out: Path, expert_names: set[str]) -> None:
    from moeprep.io.checkpoint import Checkpoint

    a, b = Checkpoint(src), Checkpoint(out)
    for name in a.names():
        if name in expert_names:
            continue
        assert torch.equal(a.get_tensor(name).view(torch.uint8), b.get_tensor(name).view(torch.uint8)), name


@pytest.mark.parametrize("source", ALL_SOURCES)
def test_convert_verify_dequant_every_target(fixtures_dir, packed, tmp_path, source):
    from moeprep.io.checkpoint import Checkpoint
    from moeprep.model import build_model_map

    src = source_dir(fixtures_dir, packed, source)
    ref = load_file(src / "ref_dequant.safetensors")
    experts = set(build_model_map(Checkpoint(src)).expert_tensors())
    targets = accepting_targets(src)
    assert "canonical" in targets and len(targets) >= 2
    for target in targets:
        out = tmp_path / target
        proc = run_cli("convert", str(src), str(out), "--target", target)
        assert proc.returncode == 0, (target, proc.stderr)
        proc = run_cli("verify", str(src), str(out))
        assert proc.returncode == 0, (target, proc.stderr)
        deq = tmp_path / f"{target}.safetensors"
        assert run_cli("dequant", str(out), str(deq)).returncode == 0
        assert_bit_equal(load_file(deq), ref)
        weight_map = assert_loads_with_plain_safetensors(out)
        assert not any(n in weight_map for n in experts)
        assert_plain_tensors_identical(src, out, experts)
        info = json.loads(run_cli("inspect", str(out), "--json").stdout)
        assert (info["target"], info["shuffle_kind"]) == (target, target)


@pytest.mark.parametrize(
    "source, default",
    [
        ("ct_w4a16_g32_sym_qwen3moe", "w4a16_preshuffle"),
        ("awq_gemm_g32_qwen3moe", "w4a16_preshuffle_zp"),
        ("gptq_g32_descact0_qwen3moe", "w4a16_preshuffle_zp"),  # fp16 scales
        ("gptq_v2_sym_descact_bf16", "w4a16_preshuffle"),
        ("quark_mxfp4_qwen3moe", "mxfp4_moe"),
        ("gptoss_mxfp4", "mxfp4_moe"),
    ],
)
def test_default_target(fixtures_dir, packed, tmp_path, source, default):
    out = tmp_path / "out"
    assert run_cli("convert", str(source_dir(fixtures_dir, packed, source)), str(out), "--quiet").returncode == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["target"] == default


def test_converted_layout_names_and_metadata(fixtures_dir, tmp_path):
    src = fixtures_dir / "ct_w4a16_g32_sym_qwen3moe"
    out = tmp_path / "out"
    assert run_cli("convert", str(src), str(out), "--target", "w4a16_preshuffle").returncode == 0
    names = set(load_file(out / "model-00001-of-00001.safetensors"))
    prefix = "model.layers.0.mlp.experts."
    assert {prefix + r for r in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale")} <= names
    with safe_open(out / "model-00001-of-00001.safetensors", "pt") as f:
        meta = f.metadata()
        w13 = f.get_tensor(prefix + "w13_weight")
        scale = f.get_tensor(prefix + "w13_weight_scale")
    assert w13.shape == (8, 256, 128) and scale.shape == (8, 8, 256) and scale.dtype == torch.bfloat16
    m = json.loads(meta[prefix + "w13_weight"])
    assert m["shuffle_kind"] == "w4a16_preshuffle" and m["shape"] == [8, 256, 128]
    assert m["source_format"] == "compressed-tensors-int4" and m["layout"]["layout"] == [16, 16]
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "moeprep" and qc["shuffle_kind"] == "w4a16_preshuffle"
    assert qc["source_quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    for small in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "recipe.yaml"):
        assert (out / small).read_bytes() == (src / small).read_bytes()


def test_desc_act_keeps_only_the_gate_up_input_perm(packed, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", str(packed("gptq_v1_sym_descact")), str(out), "--target", "w4a16_preshuffle_zp").returncode == 0
    names = set(load_file(out / "model-00001-of-00001.safetensors"))
    assert "model.layers.0.mlp.experts.w13_input_perm" in names
    assert not any(".experts." in n and n.endswith(("w2_input_perm", "g_idx")) for n in names)


@pytest.mark.parametrize(
    "source, target, alternative",
    [
        ("awq_gemm_g32_qwen3moe", "w4a16_preshuffle", "w4a16_preshuffle_zp"),
        ("gptq_g32_descact0_qwen3moe", "w4a16_preshuffle", "w4a16_preshuffle_zp"),
        ("quark_mxfp4_qwen3moe", "w4a16_preshuffle_zp", "mxfp4_moe"),
        ("ct_w4a16_g32_sym_qwen3moe", "mxfp4_moe", "w4a16_preshuffle"),
    ],
)
def test_target_that_cannot_hold_the_source_is_refused_before_work(fixtures_dir, tmp_path, source, target, alternative):
    out = tmp_path / "out"
    proc = run_cli("convert", str(fixtures_dir / source), str(out), "--target", target)
    assert_clean_error(proc, target, f"--target {alternative}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gpt_oss_120b_hidden_size_needs_mxfp4_preshuffle(tmp_path):
    """H = 2880 is not a multiple of 128: the interleaved layout cannot hold it."""
    from packers import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "gptoss_mxfp4", "gpt_oss", hidden=2880 // 9, intermediate=64, num_layers=1, num_experts=4)
    proc = run_cli("convert", str(src), str(tmp_path / "a"), "--target", "mxfp4_moe")
    assert_clean_error(proc, "mxfp4_moe", "not a multiple of 128", "--target mxfp4_preshuffle")
    assert run_cli("convert", str(src), str(tmp_path / "b")).returncode == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["target"] == "mxfp4_preshuffle"
    assert run_cli("verify", str(src), str(tmp_path / "b")).returncode == 0


def test_existing_output_refused_unless_overwrite(fixtures_dir, tmp_path):
    src = fixtures_dir / "awq_gemm_g32_qwen3moe"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert_clean_error(run_cli("convert", str(src), str(out)), "already exists", "--overwrite")
    assert_clean_error(run_cli("convert", str(src), str(out), "--overwrite"), "not written by moeprep", "--force")
    assert (out / "keep").read_text() == "mine"
    assert run_cli("convert", str(src), str(out), "--force").returncode == 0
    assert not (out / "keep").exists() and run_cli("verify", str(src), str(out)).returncode == 0
    assert run_cli("convert", str(src), str(out), "--overwrite", "--target", "canonical").returncode == 0  # ours now
    assert run_cli("verify", str(src), str(out)).returncode == 0


def test_dry_run_writes_nothing(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("convert", str(fixtures_dir / "quark_mxfp4_qwen3moe"), str(out), "--dry-run", "--max-shard-size", "500KB")
    assert proc.returncode == 0, proc.stderr
    assert "mxfp4_moe" in proc.stdout and "model.layers.1.mlp.experts.w2_weight_scale" in proc.stdout
    assert "model-00002-of-" in proc.stdout and "[8, 256, 64]" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_converted_checkpoint_cannot_be_converted_again(fixtures_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", str(fixtures_dir / "quark_mxfp4_qwen3moe"), str(out)).returncode == 0
    assert_clean_error(run_cli("convert", str(out), str(tmp_path / "again")), "already converted")
    assert not (tmp_path / "again").exists()


def test_output_inside_source_is_refused(fixtures_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "awq_gemm_g32_qwen3moe", src)
    assert_clean_error(run_cli("convert", str(src), str(src / "out")), "inside the source")
    assert not (src / "out").exists()


def test_sharding_and_workers(fixtures_dir, packed, tmp_path):
    src = packed("gptq_v1_asym_descact_mixtral_sharded")
    out = tmp_path / "out"
    proc = run_cli("convert", str(src), str(out), "--max-shard-size", "300KB", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert_loads_with_plain_safetensors(out)
    assert run_cli("verify", str(src), str(out)).returncode == 0


def test_summary_line_and_quiet(fixtures_dir, tmp_path):
    src = fixtures_dir / "awq_gemm_g32_qwen3moe"
    proc = run_cli("convert", str(src), str(tmp_path / "a"))
    assert proc.returncode == 0
    assert re.search(r"converted 2 MoE layers to w4a16_preshuffle_zp: [\d.]+ MB in [\d.]+ s \([\d.]+ [KMG]?B/s\)", proc.stdout), proc.stdout
    proc = run_cli("convert", str(src), str(tmp_path / "b"), "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_help_lists_targets_and_formats():
    proc = run_cli("convert", "--help")
    assert proc.returncode == 0
    for word in ("mxfp4_moe", "mxfp4_preshuffle", "w4a16_preshuffle_zp", "canonical", "awq", "gptq", "gpt-oss-mxfp4", "quark-mxfp4"):
        assert word in proc.stdout
