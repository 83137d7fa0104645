"""Checkpoints by hub repo id, against a hub on localhost (tests/fake_hub.py): describing one reads
its small JSON files and the shard headers by HTTP range, converting one downloads it, and hub
failures are said in words. The offline cache is tested in test_formats_fixtures.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import assert_clean_error, run_cli_subprocess
from fake_hub import FakeHub

REPO = "acme/kimi-k2-tiny"
FIXTURE = "ct_w4a16_g32_sym_kimik2_deepseekv3"


@pytest.fixture
def hub(arch_fixtures_dir, tmp_path):
    with FakeHub() as h:
        h.add(REPO, arch_fixtures_dir / FIXTURE)
        yield h


def hub_env(hub: FakeHub, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": "",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def shard_bytes(hub: FakeHub, repo: str) -> dict[str, int]:
    return {f: hub.served[f"{repo}/{f}"] for f in hub.files(repo) if f.startswith("model-")}


def header_end(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_inspect_of_a_hub_repo_reads_headers_not_weights(hub, arch_fixtures_dir, tmp_path):
    local = run_cli_subprocess("inspect", str(arch_fixtures_dir / FIXTURE), "--json")
    remote = run_cli_subprocess("inspect", REPO, "--json", env=hub_env(hub, tmp_path))
    assert remote.returncode == 0, remote.stderr
    got, want = json.loads(remote.stdout), json.loads(local.stdout)
    assert {k: v for k, v in got.items() if k != "source"} == {k: v for k, v in want.items() if k != "source"}
    for fname, sent in shard_bytes(hub, REPO).items():
        size = (arch_fixtures_dir / FIXTURE / fname).stat().st_size
        assert 0 < sent < size and sent <= max(100_000, header_end(arch_fixtures_dir / FIXTURE / fname)), fname
    assert not list((tmp_path / "hf").rglob("*.safetensors")), "no shard is downloaded"
    assert hub.served[f"{REPO}/tokenizer.json"] == 0


def test_a_header_longer_than_the_first_range_is_read_in_a_second(hub, arch_fixtures_dir, tmp_path):
    src = tmp_path / "long-header"
    shutil.copytree(arch_fixtures_dir / FIXTURE, src)
    shard = src / "model-00004-of-00004.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = {**(f.metadata() or {}), "notes": "x" * 250_000}
    save_file(tensors, str(shard), metadata=metadata)
    hub.add("acme/long-header", src)
    proc = run_cli_subprocess("inspect", "acme/long-header", "--json", env=hub_env(hub, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert hub.served[f"acme/long-header/{shard.name}"] == header_end(shard) < shard.stat().st_size
    assert json.loads(proc.stdout)["moe_layers"] == json.loads(run_cli_subprocess("inspect", str(src), "--json").stdout)["moe_layers"]


def test_a_dry_run_of_a_hub_repo_downloads_no_weights_and_a_conversion_downloads_them(hub, arch_fixtures_dir, tmp_path):
    env = hub_env(hub, tmp_path)
    dry = run_cli_subprocess("convert", REPO, str(tmp_path / "out"), "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["dry_run"] is True and not (tmp_path / "out").exists()
    assert all(sent < (arch_fixtures_dir / FIXTURE / f).stat().st_size for f, sent in shard_bytes(hub, REPO).items())
    real = run_cli_subprocess("convert", REPO, str(tmp_path / "out"), "--json", env=env)
    assert real.returncode == 0, real.stderr
    assert {k: v for k, v in json.loads(real.stdout).items() if k not in ("seconds", "dry_run")} == \
        {k: v for k, v in json.loads(dry.stdout).items() if k != "dry_run"}
    local = run_cli_subprocess("convert", str(arch_fixtures_dir / FIXTURE), str(tmp_path / "local"), "-q")
    assert local.returncode == 0, local.stderr
    for f in sorted(p.name for p in (tmp_path / "local").glob("*.safetensors")):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f


def test_revision_and_token_reach_the_hub(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    proc = run_cli_subprocess("inspect", REPO, "--revision", hub.sha(REPO), "--token", "hf_secret", env=env)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests and all(auth == "Bearer hf_secret" for _, path, auth in hub.requests if "/api/agent" not in path)
    assert any(path.endswith(f"/revision/{hub.sha(REPO)}") for _, path, _ in hub.requests)
    hub.requests.clear()
    from_env = run_cli_subprocess("inspect", REPO, env={**env, "HF_TOKEN": "hf_from_env"})
    assert from_env.returncode == 0, from_env.stderr
    assert any(auth == "Bearer hf_from_env" for _, _, auth in hub.requests)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_hub_failures_are_one_line_in_words(hub, tmp_path, command):
    env = hub_env(hub, tmp_path)
    hub.add("acme/gated", hub.repos[REPO])
    hub.gated.add("acme/gated")
    args = [str(tmp_path / "out")] if command == "convert" else []
    assert_clean_error(run_cli_subprocess(command, "acme/none", *args, env=env), "acme/none", "no such hub repo")
    assert_clean_error(run_cli_subprocess(command, "acme/gated", *args, env=env), "acme/gated", "gated")
    assert_clean_error(run_cli_subprocess(command, REPO, *args, "--revision", "v9", env=env), REPO, "no such revision")
    assert not (tmp_path / "out").exists()


def test_a_name_that_looks_like_a_path_is_never_looked_up_on_the_hub(hub, tmp_path):
    env = hub_env(hub, tmp_path)
    for name in ("./acme/kimi-k2-tiny", "~/models/kimi", "../kimi", "/nowhere/kimi", "two//slashes"):
        assert_clean_error(run_cli_subprocess("inspect", name, env=env), "no such directory")
    assert not [r for r in hub.requests if "/api/agent" not in r[1]]
