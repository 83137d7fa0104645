"""Test fixtures used across the suite: the real quantizers' checkpoints (tests/data, unpacked once
per run), the packed checkpoints of tests/cases.py, and ways to run the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's interpreter: set before any test module
    # imports them (triton.jit reads it when it wraps a kernel)
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"  # FORMATS.md says who wrote each fixture, and how
FIXTURE_TAR = DATA / "qwen3moe-quantized.tar.xz"
ARCH_FIXTURE_TAR = DATA / "moe-architectures.tar.xz"  # ARCHITECTURES.md describes them
REAL_FIXTURES = {
    "awq_gemm_g32_qwen3moe": "awq",
    "ct_w4a16_g32_sym_qwen3moe": "compressed-tensors-int4",
    "gptq_g32_descact0_qwen3moe": "gptq",
    "quark_mxfp4_qwen3moe": "quark-mxfp4",
}


def _unpacked(tmp_path_factory, tar_path: Path, name: str) -> Path:
    dest = tmp_path_factory.mktemp(name)
    with tarfile.open(tar_path, "r:xz") as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    return _unpacked(tmp_path_factory, FIXTURE_TAR, "fixtures")


@pytest.fixture(scope="session")
def arch_fixtures_dir(tmp_path_factory) -> Path:
    return _unpacked(tmp_path_factory, ARCH_FIXTURE_TAR, "arch_fixtures")


def run_cli_subprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real ``moeprep`` entry point in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "moeprep", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in-process (fast); same exit code, stdout and stderr as the real command."""
    from click.testing import CliRunner

    from moeprep.cli import main

    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    """One line on stderr, the expected exit code, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="session")
def packed(tmp_path_factory):
    """``packed(case_id)``: the checkpoint of a tests/cases.py case, built once per session."""
    from cases import BY_ID
    from packers import build_checkpoint

    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("packed")

    def get(case_id: str) -> Path:
        if case_id not in built:
            case = BY_ID[case_id]
            built[case_id] = build_checkpoint(root / case_id, case.fmt, case.arch, **case.options)
        return built[case_id]

    return get


def source_dir(fixtures_dir: Path, packed, name: str) -> Path:
    """A real fixture by directory name, or a packed case by id."""
    return fixtures_dir / name if name in REAL_FIXTURES else packed(name)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device; without one they are skipped, with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
