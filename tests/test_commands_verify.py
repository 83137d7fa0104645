"""``moeprep verify`` proves exactness, and fails loudly on any corruption of OUT."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from hostile import drop_tensor, shard_of
from moeprep.io.safetensors_header import read_header


@pytest.fixture(scope="module")
def converted(fixtures_dir, tmp_path_factory):
    """(src, out) for an mxfp4_preshuffle conversion split over several shards (padded scales)."""
    src = fixtures_dir / "quark_mxfp4_qwen3moe"
    out = tmp_path_factory.mktemp("verify") / "out"
    assert run_cli("convert", str(src), str(out), "--target", "mxfp4_preshuffle", "--max-shard-size", "400KB").returncode == 0
    return src, out


@pytest.fixture
def broken(converted, tmp_path):
    src, out = converted
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return src, copy


def flip_byte(out: Path, name: str, at: int = 0) -> None:
    path = shard_of(out, name)
    info = read_header(path).tensors[name]
    raw = bytearray(path.read_bytes())
    raw[info.begin + at] ^= 0x10
    path.write_bytes(bytes(raw))


def test_intact_conversion_verifies(converted):
    proc = run_cli("verify", *map(str, converted))
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout


def test_one_flipped_byte_in_one_expert(broken):
    src, out = broken
    # expert 5's rows of w2 start at 5 * H * (I/2) bytes
    flip_byte(out, "model.layers.1.mlp.experts.w2_weight", at=5 * 256 * 64 + 1000)
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1
    assert "model.layers.1.mlp.experts.5.down_proj: codes differ" in proc.stderr
    assert "1 byte(s) differ" in proc.stderr


def test_flipped_pad_byte_of_a_padded_scale(broken):
    src, out = broken
    name = "model.layers.0.mlp.experts.w2_weight_scale"  # Ks 4 padded to 8 columns
    info = read_header(shard_of(out, name)).tensors[name]
    flip_byte(out, name, at=info.nbytes - 1)  # the last column group is padding (Ks 4 -> 8)
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1 and name in proc.stderr and "encoding" in proc.stderr


def test_flipped_byte_in_a_copied_tensor(broken):
    src, out = broken
    flip_byte(out, "model.layers.0.self_attn.q_proj.weight")
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1 and "model.layers.0.self_attn.q_proj.weight: bytes differ" in proc.stderr


def test_missing_shard(broken):
    src, out = broken
    shard = shard_of(out, "model.layers.1.mlp.experts.w13_weight")
    shard.unlink()
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode != 0 and shard.name in proc.stderr and "missing" in proc.stderr


def test_tensor_in_index_but_absent_from_its_shard(broken):
    src, out = broken
    name = "model.layers.1.mlp.experts.w2_weight"
    drop_tensor(name, reindex=False)(out)
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode != 0 and name in proc.stderr and "not in its shard" in proc.stderr


def test_extra_shard_not_in_index(broken):
    src, out = broken
    shutil.copy(next(out.glob("model-00001-*.safetensors")), out / "model-stray.safetensors")
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1 and "model-stray.safetensors" in proc.stderr


def test_wrong_total_size(broken):
    src, out = broken
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 1
    index_path.write_text(json.dumps(index))
    proc = run_cli("verify", str(src), str(out))
    assert proc.returncode == 1 and "total_size" in proc.stderr


def test_against_the_wrong_source(converted, fixtures_dir):
    _, out = converted
    proc = run_cli("verify", str(fixtures_dir / "ct_w4a16_g32_sym_qwen3moe"), str(out))
    assert proc.returncode == 1 and "source_format" in proc.stderr
