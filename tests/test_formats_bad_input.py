"""Bad input to the readers: one line on stderr, non-zero exit, no traceback."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import REAL_FIXTURES, assert_clean_error, run_cli, run_cli_subprocess

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


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


@pytest.mark.parametrize("fixture", sorted(REAL_FIXTURES))
def test_a_list_or_object_where_the_config_holds_a_value_is_refused_cleanly(fixtures_dir, tmp_path, fixture):
    """Every single value of quantization_config, in turn, wrapped in a list and in an object."""
    import copy
    import shutil

    src = fixtures_dir / fixture
    work = tmp_path / "w"
    shutil.copytree(src, work)
    (work / "quantize_config.json").unlink(missing_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    for path in _leaves(cfg["quantization_config"]):
        for wrap in (lambda v: [v], lambda v: {"value": v}):
            bad = copy.deepcopy(cfg)
            parent = bad["quantization_config"]
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = wrap(parent[path[-1]])
            (work / "config.json").write_text(json.dumps(bad))
            proc = run_cli("inspect", str(work))
            assert proc.returncode in (0, 2), (path, proc.stderr)
            if proc.returncode == 2:
                assert_clean_error(proc, "config.json")


def test_a_shard_cut_short_after_opening_is_refused_not_a_crash(tmp_path, fixtures_dir):
    """Truncated after its header was read (another process rewriting it): the next tensor read
    is a clean refusal naming the file and tensor, not SIGBUS on a page that no longer exists."""
    import os
    import shutil

    from moeprep.errors import BadInputError
    from moeprep.io.checkpoint import Checkpoint

    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "awq_gemm_g32_qwen3moe", src)
    ckpt = Checkpoint(src)
    name = ckpt.names()[-1]
    shard = ckpt.file_of(name)
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(BadInputError, match="cut short while being read") as e:
        ckpt.get_tensor(name)
    assert shard.name in str(e.value) and name in str(e.value)


def test_a_shard_cut_short_while_a_tensor_of_it_is_read_exits_2_naming_the_file(tmp_path, fixtures_dir):
    """Cut between the size check and the read: the page fault (SIGBUS) ends the process with one
    line naming the file and exit code 2, not a signal death (exit 135)."""
    import subprocess
    import sys

    pytest.importorskip("moeprep._C")
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "awq_gemm_g32_qwen3moe", src)
    script = (
        "import os, sys\n"
        "from moeprep.io.checkpoint import Checkpoint\n"
        "ckpt = Checkpoint(sys.argv[1])\n"
        "name = max(ckpt.names(), key=lambda n: ckpt.info(n).end)\n"
        "t = ckpt.get_tensor(name)\n"
        "os.truncate(ckpt.file_of(name), 4096)\n"
        "print(float(t.float().sum()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "cut short while being read" in proc.stderr
    assert "model" in proc.stderr and str(src) in proc.stderr and proc.stdout == ""
    # a SIGBUS that is not in a shard keeps its own action
    other = subprocess.run([sys.executable, "-c", script.replace("print(", "import signal; signal.raise_signal(signal.SIGBUS); print(")
                            .replace("os.truncate(ckpt.file_of(name), 4096)\n", ""), str(src)], capture_output=True, text=True)
    assert other.returncode != 2
