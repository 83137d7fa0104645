"""Faults during conversion: nothing half-written, SRC untouched, a rerun succeeds and verifies."""
from __future__ import annotations

import errno
import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def multi_layer(tmp_path_factory) -> Path:
    """A checkpoint big enough that a conversion takes a moment: 8 MoE layers, 3 shards."""
    from packers import build_checkpoint

    root = tmp_path_factory.mktemp("faults")
    return build_checkpoint(root / "src", "awq", "qwen3_moe", num_layers=8, hidden=768, intermediate=384, num_experts=16, shards=3)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moeprep-" in p.name)


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moeprep", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_random_points_leaves_no_output(multi_layer, tmp_path, seed):
    before = tree_hash(multi_layer)
    out = tmp_path / "out"
    proc = _spawn("convert", str(multi_layer), str(out), "--max-shard-size", "1MB")
    # kill once the run is under way (its temp dir exists), at a random moment after that
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # the kill came after the final rename: OUT must then be whole
        assert run_cli("verify", str(multi_layer), str(out)).returncode == 0
    assert tree_hash(multi_layer) == before
    # the rerun cleans the dead run's temp dir and succeeds
    assert run_cli("convert", str(multi_layer), str(out), "--max-shard-size", "1MB", "--overwrite").returncode == 0
    assert leftovers(tmp_path) == []
    assert run_cli("verify", str(multi_layer), str(out)).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_cleanly(multi_layer, tmp_path, sig, seed):
    out = tmp_path / "out"
    proc = _spawn("convert", str(multi_layer), str(out))
    while not leftovers(tmp_path) and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0, 0.5))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if out.exists():  # the signal landed after the final rename: OUT must then be whole
        assert run_cli("verify", str(multi_layer), str(out)).returncode == 0
        return
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_full_disk_is_reported_and_leaves_nothing(multi_layer, tmp_path, monkeypatch):
    """A write that fails with ENOSPC part-way through (simulated by a write wrapper)."""
    from moeprep.io import safetensors_writer

    real_write = safetensors_writer.SafetensorsWriter._write_bytes
    calls = {"n": 0}

    def failing_write(self, data):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "_write_bytes", failing_write)
    out = tmp_path / "out"
    proc = run_cli("convert", str(multi_layer), str(out))
    assert proc.returncode == 1
    assert "no space left on device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "_write_bytes", real_write)
    assert run_cli("convert", str(multi_layer), str(out)).returncode == 0
    assert run_cli("verify", str(multi_layer), str(out)).returncode == 0


def test_crash_inside_a_layer_leaves_nothing(multi_layer, tmp_path, monkeypatch):
    from moeprep.targets.base import Target

    real = Target.encode_layer
    seen = []

    def crash_in_third_layer(self, plan, *args):
        seen.append(plan.index)
        for i, piece in enumerate(real(self, plan, *args)):
            if len(seen) == 3 and i == 5:
                raise RuntimeError("simulated crash")
            yield piece

    monkeypatch.setattr(Target, "encode_layer", crash_in_third_layer)
    out = tmp_path / "out"
    proc = run_cli("convert", str(multi_layer), str(out))
    assert proc.returncode == 1 and "simulated crash" in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_streams_one_expert_at_a_time(multi_layer, tmp_path, monkeypatch):
    """Weights leave the converter one expert block at a time and at most `workers` layers are
    in flight: memory does not grow with the number of experts or layers."""
    from moeprep.targets.base import Target

    real = Target.encode_layer
    in_flight, peak, biggest = set(), [0], [0]

    def tracked(self, plan, *args):
        in_flight.add(plan.index)
        peak[0] = max(peak[0], len(in_flight))
        for role, piece in real(self, plan, *args):
            if role.endswith("_weight"):
                biggest[0] = max(biggest[0], piece.shape[0])
            yield role, piece
        in_flight.discard(plan.index)

    monkeypatch.setattr(Target, "encode_layer", tracked)
    assert run_cli("convert", str(multi_layer), str(tmp_path / "out")).returncode == 0
    assert peak[0] <= 2 and biggest[0] == 1
