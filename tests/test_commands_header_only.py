"""Header-only work never imports torch (it takes a second or more): ``--help`` of every command,
``--version``, ``inspect`` and ``convert --dry-run`` read headers and JSON alone."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli

PROBE = """
import runpy, sys
sys.argv = ["moeprep"] + sys.argv[1:]
try:
    runpy.run_module("moeprep", run_name="__main__")
except SystemExit as e:
    code = e.code or 0
else:
    code = 0
print("TORCH_LOADED" if "torch._C" in sys.modules else "TORCH_NOT_LOADED", code)
"""


def _torch_loaded(*args: str) -> tuple[bool, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[1] == "0", proc.stdout[-2000:] + proc.stderr[-2000:]
    return last[0] == "TORCH_LOADED", proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["convert", "--help"], ["inspect", "--help"],
                                  ["verify", "--help"], ["dequant", "--help"], ["generate", "--help"]])
def test_help_and_version(args):
    assert not _torch_loaded(*args)[0]


@pytest.mark.parametrize("name", ["awq_gemm_g32_qwen3moe", "ct_w4a16_g32_sym_qwen3moe", "gptq_g32_descact0_qwen3moe",
                                  "quark_mxfp4_qwen3moe"])
def test_inspect_and_dry_run_of_a_source(fixtures_dir, tmp_path, name):
    src = str(fixtures_dir / name)
    for args in (["inspect", "--json", src], ["inspect", src], ["convert", "--dry-run", src, str(tmp_path / "out")]):
        loaded, out = _torch_loaded(*args)
        assert not loaded, args
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source, target", [("quark_mxfp4_qwen3moe", "mxfp4_moe"),
                                            ("gptq_v1_asym_descact_mixtral_sharded", "w4a16_preshuffle_zp")])
def test_inspect_of_a_conversion(fixtures_dir, packed, tmp_path, source, target):
    """An act-order conversion too: its folded row order is checked from the header with numpy."""
    from conftest import source_dir

    out = tmp_path / "out"
    assert run_cli("convert", str(source_dir(fixtures_dir, packed, source)), str(out), "--target", target, "-q").returncode == 0
    loaded, text = _torch_loaded("inspect", "--json", str(out))
    assert not loaded and f'"target": "{target}"' in text
