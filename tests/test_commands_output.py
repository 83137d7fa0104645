"""What the commands print for a person: summaries, not dumps; MXFP4 in its own words; usage
mistakes as one-line refusals with exit code 2; generated text safe for a terminal."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, assert_clean_error, run_cli
from moeprep.cli import printable
from moeprep.inspect import FIRST_NAMES

DEMO = str(REPO / "examples" / "demo-qwen3moe-ct-w4a16")


def _names(text: str) -> set[str]:
    return {line.strip() for line in text.splitlines() if line.startswith("  ") and not line.strip().startswith(("expert ", "..."))}


def test_inspect_summarises_and_lists_everything_on_request():
    full = json.loads(run_cli("inspect", DEMO, "--json").stdout)["tensors"]
    every = set().union(*full.values())
    short = run_cli("inspect", DEMO)
    assert short.returncode == 0
    for key, title in (("experts", "expert tensors"), ("quantized_linears", "other quantized linears"),
                       ("plain", "plain tensors")):
        assert any(line.startswith(title) and line.split()[-1] == str(len(full[key])) for line in short.stdout.splitlines())
    assert len(_names(short.stdout)) == sum(min(len(v), FIRST_NAMES) for v in full.values()) < len(every)
    assert "--tensors lists them all" in short.stdout
    listed = run_cli("inspect", DEMO, "--tensors")
    assert _names(listed.stdout) == every and "more" not in listed.stdout


def test_mxfp4_is_described_in_its_own_terms(fixtures_dir):
    text = run_cli("inspect", str(fixtures_dir / "quark_mxfp4_qwen3moe")).stdout
    quant = next(line for line in text.splitlines() if line.startswith("quantization"))
    assert "E2M1" in quant and "E8M0" in quant
    assert "desc_act" not in quant and "symmetric" not in quant and "bit" not in quant


@pytest.mark.parametrize("size", ["500M", "inf", "nan", "0", "-5GB", "5 XB", "1e9"])
def test_a_bad_shard_size_is_a_usage_error(tmp_path, size):
    assert_clean_error(run_cli("convert", DEMO, str(tmp_path / "out"), "--max-shard-size", size), "--max-shard-size")
    assert not (tmp_path / "out").exists()


def test_verify_with_swapped_arguments_says_so(tmp_path):
    out = tmp_path / "out"
    assert run_cli("convert", DEMO, str(out), "-q").returncode == 0
    assert_clean_error(run_cli("verify", str(out), DEMO), "look swapped", f"moeprep verify {DEMO} {out}")


def test_generated_text_is_safe_to_print():
    assert printable("a\x1b[2Jb\x07c\nd\te\x00") == "a\ufffd[2Jb\ufffdc\nd\te\ufffd"
    assert printable("plain, ünïcødé, 中文") == "plain, ünïcødé, 中文"


def test_convert_and_verify_report_json(tmp_path):
    out = tmp_path / "out"
    dry = json.loads(run_cli("convert", DEMO, str(out), "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True and not out.exists()
    done = json.loads(run_cli("convert", DEMO, str(out), "--json").stdout)
    assert done["target"] == dry["target"] == "w4a16_preshuffle" and done["bytes"] == dry["bytes"] > 0
    assert done["moe_layers"] == 2 and done["seconds"] >= 0 and out.is_dir()
    good = run_cli("verify", DEMO, str(out), "--json")
    result = json.loads(good.stdout)
    assert good.returncode == 0 and result["ok"] is True and result["failures"] == []
    assert result["checked"] > 0 and result["files"] > 0  # the tokenizer and generation config
    shard = next(out.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor
    shard.write_bytes(bytes(data))
    bad = run_cli("verify", DEMO, str(out), "--json")
    assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False and json.loads(bad.stdout)["failures"]


def _stderr_on_a_terminal(args: list[str], columns: int) -> str:
    """What a command writes to stderr when stderr is a terminal ``columns`` wide."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    main_fd, child_fd = pty.openpty()
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "moeprep", *args], stdout=subprocess.PIPE, stderr=child_fd,
                            env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")})
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait()
    os.close(main_fd)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("command", ["convert", "verify", "dequant"])
def test_progress_only_on_a_terminal_wide_enough(tmp_path, command):
    out = tmp_path / "out"
    if command != "convert":
        assert run_cli("convert", DEMO, str(out), "-q").returncode == 0
    args = {"convert": ["convert", DEMO, str(tmp_path / "new")], "verify": ["verify", DEMO, str(out)],
            "dequant": ["dequant", DEMO, str(tmp_path / "w.safetensors")]}[command]
    shown = _stderr_on_a_terminal(args, 120)
    assert f"{command}:" in shown and "B/s" in shown, shown
    for i, columns in enumerate((0, 10)):
        if command != "verify":
            args[2] = str(tmp_path / f"again{i}{'.safetensors' if command == 'dequant' else ''}")
        assert _stderr_on_a_terminal(args, columns) == ""
    if command != "verify":
        args[2] = str(tmp_path / f"quiet{'.safetensors' if command == 'dequant' else ''}")
    assert _stderr_on_a_terminal([*args, "--quiet"], 120) == ""
    if command != "verify":
        args[2] = str(tmp_path / f"piped{'.safetensors' if command == 'dequant' else ''}")
    piped = run_cli(*args)  # stderr is not a terminal
    assert piped.returncode == 0 and piped.stderr == ""
