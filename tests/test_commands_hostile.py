"""Hostile input: every command refuses every hostile input with one line naming the file and the
tensor, exit code 2, no traceback, nothing written, and the input unchanged."""
from __future__ import annotations


import pytest

import moeprep
from conftest import run_cli
from hostile import BY_ID, CORPUS_IDS, make
from test_commands_faults import leftovers, tree_hash

COMMANDS = ["inspect", "dequant", "convert", "verify", "load"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A valid sharded desc_act GPTQ source (g_idx, zeros, index) and its conversion."""
    from packers import build_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    src = build_checkpoint(root / "src", "gptq", "qwen3_moe", checkpoint_format="gptq", sym=False, desc_act=True, shards=2)
    out = root / "converted"
    assert run_cli("convert", str(src), str(out), "--target", "w4a16_preshuffle_zp", "--max-shard-size", "1MB").returncode == 0
    return {"source": src, "converted": out}


def assert_names(line: str, case) -> None:
    assert case.file in line, (case.file, line)
    if case.tensor:
        assert case.tensor in line, (case.tensor, line)
    elif case.tensor == "":
        assert "[" in line and "]" in line, line  # some tensor is named


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case_id", CORPUS_IDS)
def test_refused_cleanly(bases, tmp_path, case_id, command):
    case = BY_ID[case_id]
    bad = make(case, bases[case.base], tmp_path / "bad")
    before = tree_hash(bad)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    if command == "load":
        with pytest.raises(moeprep.MoeprepError) as e:
            moeprep.load(str(bad))
        line = str(e.value)
        assert "\n" not in line
        # a damaged source may be refused for what it is (not converted) rather than its damage
        if case.base == "converted" or "not a converted checkpoint" not in line:
            assert_names(line, case)
    else:
        if command == "inspect":
            args = [str(bad)]
        elif command == "dequant":
            args = [str(bad), str(out_parent / "deq.safetensors")]
        elif command == "convert":
            args = [str(bad), str(out_parent / "out")]
        else:
            args = [str(bases["source"]), str(bad)] if case.base == "converted" else [str(bad), str(bases["converted"])]
        proc = run_cli(command, *args)
        if command == "inspect" and case.data_level:
            assert proc.returncode == 0, proc.stderr  # header-only by contract: cannot see data
        else:
            assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert_names(lines[0], case)
    assert list(out_parent.iterdir()) == [] and leftovers(out_parent) == []
    assert tree_hash(bad) == before, "the input was modified"
