"""Scales no quantizer writes (NaN, infinite, zero, negative; E8M0 0xFF) are refused where they are
read, unless --allow-invalid-scales carries them through; a narrower dequant dtype that cannot
hold a weight is refused with the count."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli


def _with(src, dest, name: str, edit):
    shutil.copytree(src, dest)
    shard = next(p for p in dest.glob("*.safetensors") if name in safe_open(str(p), "pt").keys())
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    tensors = load_file(shard)
    tensors[name] = edit(tensors[name].clone())
    save_file(tensors, shard, metadata=meta)
    return dest


def test_e8m0_nan_is_refused_unless_carried_through(fixtures_dir, tmp_path):
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale"
    src = fixtures_dir / "quark_mxfp4_qwen3moe"

    def nan_byte(t):
        t.view(torch.uint8).view(-1)[5] = 0xFF
        return t

    bad = _with(src, tmp_path / "bad", name, nan_byte)
    for command, args in (("convert", [str(tmp_path / "out")]), ("dequant", [str(tmp_path / "w.safetensors")])):
        assert_clean_error(run_cli(command, str(bad), *args), name, "0xFF", "--allow-invalid-scales")
    assert not (tmp_path / "out").exists() and not (tmp_path / "w.safetensors").exists()
    out = tmp_path / "carried"
    assert run_cli("convert", str(bad), str(out), "--allow-invalid-scales", "-q").returncode == 0
    assert run_cli("verify", str(bad), str(out), "--allow-invalid-scales").returncode == 0
    assert_clean_error(run_cli("verify", str(bad), str(out)), "0xFF")
    deq = tmp_path / "w.safetensors"
    assert run_cli("dequant", str(out), str(deq), "--allow-invalid-scales", "-q").returncode == 0
    assert torch.isnan(load_file(deq)[name.replace("_scale", "")]).sum() == 32  # one group of 32 inputs


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_weight_beyond_the_dtype_is_refused(packed, tmp_path, dtype):
    src = packed("gptq_v2_asym")  # fp16 scales: 60000 x (q - z) leaves fp16's range, not bf16's
    name = "model.layers.0.mlp.experts.1.gate_proj.scales"

    def huge(t):
        t.view(-1)[0] = 60000.0 if dtype == "float16" else 0
        return t

    if dtype == "bfloat16":  # bf16 holds what fp32 does: nothing to refuse
        assert run_cli("dequant", str(src), str(tmp_path / "w.safetensors"), "--dtype", dtype, "-q").returncode == 0
        return
    bad = _with(src, tmp_path / "bad", name, huge)
    proc = run_cli("dequant", str(bad), str(tmp_path / "w.safetensors"), "--dtype", dtype)
    assert_clean_error(proc, "exceed float16's range", "model.layers.0.mlp.experts.1.gate_proj")
    assert run_cli("dequant", str(bad), str(tmp_path / "w32.safetensors"), "-q").returncode == 0


def test_a_nonzero_weight_that_float16_would_round_to_zero_is_refused(packed, tmp_path):
    src = packed("ct_int4_asym")  # bf16 scales: 1e-12 x (q - z) is far below fp16's smallest subnormal
    name = "model.layers.0.mlp.experts.2.up_proj.weight_scale"

    def tiny(t):
        t.view(-1)[0] = 1e-12
        return t

    bad = _with(src, tmp_path / "bad", name, tiny)
    proc = run_cli("dequant", str(bad), str(tmp_path / "w.safetensors"), "--dtype", "float16")
    assert_clean_error(proc, "below float16's range", "model.layers.0.mlp.experts.2.up_proj")
    assert not (tmp_path / "w.safetensors").exists()
    for dtype in ("float32", "bfloat16"):
        assert run_cli("dequant", str(bad), str(tmp_path / f"{dtype}.safetensors"), "--dtype", dtype, "-q").returncode == 0
