"""Publishing outputs: never over what moeprep did not write, never losing the old output, and
the leftovers of dead runs removed by their lock, not by guessing from a PID."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_clean_error, run_cli
from moeprep.io import outputs
from test_commands_faults import _spawn, leftovers, tree_hash

DEMO = str(REPO / "examples" / "demo-qwen3moe-ct-w4a16")


def test_dequant_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "w.safetensors"
    assert run_cli("dequant", DEMO, str(out), "-q").returncode == 0
    first = out.read_bytes()
    assert_clean_error(run_cli("dequant", DEMO, str(out)), "already exists", "--overwrite")
    assert run_cli("dequant", DEMO, str(out), "--overwrite", "--dtype", "bfloat16", "-q").returncode == 0
    assert out.read_bytes() != first
    foreign = tmp_path / "model.safetensors"  # another checkpoint's shard
    foreign.write_bytes((Path(DEMO) / "model.safetensors").read_bytes())
    before = foreign.read_bytes()
    assert_clean_error(run_cli("dequant", DEMO, str(foreign), "--overwrite"), "not written by moeprep", "--force")
    assert foreign.read_bytes() == before
    assert run_cli("dequant", DEMO, str(foreign), "--force", "-q").returncode == 0 and foreign.read_bytes() != before
    assert leftovers(tmp_path) == []


def test_convert_overwrite_leaves_a_foreign_directory_alone(tmp_path):
    models = tmp_path / "models"  # a mistyped OUT that names a user's folder
    (models / "llama").mkdir(parents=True)
    (models / "llama" / "weights.bin").write_bytes(b"precious")
    before = tree_hash(models)
    assert_clean_error(run_cli("convert", DEMO, str(models), "--overwrite"), "not written by moeprep", "--force")
    assert tree_hash(models) == before


def test_a_long_output_name_works(tmp_path):
    name = "o" * 240
    assert run_cli("convert", DEMO, str(tmp_path / name), "-q").returncode == 0
    assert run_cli("dequant", DEMO, str(tmp_path / (name[:-12] + ".safetensors")), "-q").returncode == 0
    assert run_cli("convert", DEMO, str(tmp_path / name), "-q", "--overwrite").returncode == 0
    assert leftovers(tmp_path) == []


def test_an_interrupted_swap_is_undone_by_the_next_run(tmp_path, monkeypatch):
    """Where directories cannot be exchanged in one step, OUT is set aside, then the new one moved
    in: a run that dies between the two leaves OUT missing, and the next run puts it back."""
    out = tmp_path / "out"
    assert run_cli("convert", DEMO, str(out), "-q").returncode == 0
    before = tree_hash(out)
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def dies_on_the_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a signal would, between the two renames
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", dies_on_the_second)
    assert run_cli("convert", DEMO, str(out), "-q", "--overwrite", "--target", "canonical").returncode == 130
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(outputs.OLD)]
    outputs.clean_leftovers(out)  # what every writing run does first
    assert tree_hash(out) == before and leftovers(tmp_path) == []
    # and a swap that completes by the two renames leaves the new output alone
    assert run_cli("convert", DEMO, str(out), "-q", "--overwrite", "--target", "canonical").returncode == 0
    assert run_cli("verify", DEMO, str(out)).returncode == 0 and leftovers(tmp_path) == []


def test_leftovers_are_removed_only_once_their_run_is_gone(tmp_path):
    live = tmp_path / f"{outputs.TMP}live"
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        dead = tmp_path / f"{outputs.TMP}{os.getpid()}"  # named after a live PID, but no run holds it
        dead.mkdir()
        outputs.clean_leftovers(tmp_path / "out")
        assert live.exists() and not dead.exists()
    finally:
        holder.kill()
        holder.wait()
    outputs.clean_leftovers(tmp_path / "out")
    assert not live.exists()


@pytest.mark.slow
def test_dequant_stops_cleanly_on_sigterm(tmp_path):
    from packers import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "gptq", "qwen3_moe", num_layers=8, intermediate=512, hidden=512)
    out = tmp_path / "outs" / "w.safetensors"
    out.parent.mkdir()
    proc = _spawn("dequant", str(src), str(out))
    deadline = time.monotonic() + 60
    while not leftovers(out.parent) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if out.exists():  # the signal came after the rename
        return
    assert proc.returncode == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1, err
    assert leftovers(out.parent) == []


def _demo_copy(dest: Path) -> Path:
    import shutil

    shutil.copytree(DEMO, dest)
    return dest


def test_a_link_out_of_the_source_is_never_followed(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of any checkpoint")
    src = _demo_copy(tmp_path / "src")
    (src / "added_tokens.json").symlink_to(outside)
    assert_clean_error(run_cli("convert", str(src), str(tmp_path / "out")), "outside the checkpoint", "added_tokens.json")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    out = tmp_path / "converted"  # an OUT whose copied file became a link out of it does not verify
    assert run_cli("convert", DEMO, str(out), "-q").returncode == 0
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(Path(DEMO) / "tokenizer.json")
    proc = run_cli("verify", DEMO, str(out))
    assert proc.returncode == 1 and "tokenizer.json" in proc.stderr and "outside the checkpoint" in proc.stderr
    (src / "added_tokens.json").unlink()
    (src / "config.json").rename(src / "real-config")
    (src / "config.json").symlink_to(outside)
    assert_clean_error(run_cli("inspect", str(src)), "outside the checkpoint", "config.json")


def test_links_inside_the_source_and_its_hub_cache_are_followed(tmp_path):
    cache = tmp_path / "hub" / "models--acme--linked"
    blobs, snap = cache / "blobs", cache / "snapshots" / ("3" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in Path(DEMO).iterdir():  # as the hub lays out a snapshot: links into the repo's blobs
        (blobs / f"blob-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    out = tmp_path / "out"
    assert run_cli("convert", str(snap), str(out), "-q").returncode == 0
    assert run_cli("verify", str(snap), str(out)).returncode == 0
    assert not any(p.is_symlink() for p in out.iterdir())


@pytest.mark.parametrize("tamper", ["changed", "removed", "added"])
def test_verify_covers_every_copied_file(tmp_path, tamper):
    out = tmp_path / "out"
    assert run_cli("convert", DEMO, str(out), "-q").returncode == 0
    if tamper == "changed":
        (out / "tokenizer_config.json").write_text((out / "tokenizer_config.json").read_text().replace("}", ', "x": 1}', 1))
    elif tamper == "removed":
        (out / "generation_config.json").unlink()
    else:
        (out / "chat_template.jinja").write_text("{{ messages }}")
    proc = run_cli("verify", DEMO, str(out))
    assert proc.returncode == 1
    name = {"changed": "tokenizer_config.json", "removed": "generation_config.json", "added": "chat_template.jinja"}[tamper]
    assert name in proc.stderr
