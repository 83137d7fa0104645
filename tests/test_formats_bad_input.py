"""Bad input to the readers: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import assert_clean_error, run_cli, run_cli_subprocess

SRC = "gptq_g32_descact0_qwen3moe"


@pytest.fixture
def ckpt(fixtures_dir, tmp_path):
    dest = tmp_path / "ckpt"
    shutil.copytree(fixtures_dir / SRC, dest)
    return dest


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "quantize_config.json").unlink()


@pytest.mark.parametrize("command", ["inspect", "dequant"])
def test_not_a_checkpoint(tmp_path, command):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "o.safetensors")] if command == "dequant" else []
    assert_clean_error(run_cli(command, str(tmp_path / "empty"), *extra), "no config.json")
    assert_clean_error(run_cli(command, str(tmp_path / "nowhere" / "x"), *extra), "no such directory")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("command", ["inspect", "dequant"])
def test_truncated_safetensors(ckpt, tmp_path, command):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    out = tmp_path / "o.safetensors"
    extra = [str(out)] if command == "dequant" else []
    assert_clean_error(run_cli(command, str(ckpt), *extra), "model.safetensors", "truncated")
    assert not out.exists()


def test_missing_scale_tensor(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.scales"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "o.safetensors"
    assert_clean_error(run_cli("dequant", str(ckpt), str(out)), "model.layers.1.mlp.experts.5.up_proj.scales", "missing")
    assert not out.exists()
    assert not list(tmp_path.glob(".o.safetensors*")), "temporary output left behind"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"bits": 8}, "bits=8"),
        ({"bits": 3}, "bits=3"),
        ({"quant_method": "bitsandbytes"}, "'bitsandbytes'"),
        ({"quant_method": "fp8"}, "'fp8'"),
        ({"checkpoint_format": "marlin", "format": "marlin"}, "'marlin'"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "dequant"])
def test_unsupported_format(ckpt, tmp_path, command, changes, fragment):
    _edit_config(ckpt, **changes)
    extra = [str(tmp_path / "o.safetensors")] if command == "dequant" else []
    assert_clean_error(run_cli(command, str(ckpt), *extra), "config.json", fragment)


def test_unquantized_checkpoint_is_refused(fixtures_dir):
    assert_clean_error(run_cli("inspect", str(fixtures_dir / "base_qwen3moe_bf16")), "not a quantized checkpoint")


def test_real_entry_point_exit_code_and_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli_subprocess("inspect", str(tmp_path / "empty")), "no config.json")
