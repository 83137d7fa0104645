"""Seeded, time-bounded fuzzing of safetensors header and index parsing: opening a checkpoint
whose header bytes, header JSON or index were mangled either works or is refused with a
moeprep error, never another exception."""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest

from moeprep.errors import MoeprepError
from moeprep.io.checkpoint import Checkpoint
from moeprep.model import build_model_map

BUDGET_S = 20
SEEDS = range(3)
_VALUES = [None, True, -1, 0, 1, 2**40, -(2**63), 1.5, "", "I32", "U8", "BF16", "nope", [], [1], [0, 0], [-1, 5], [3, 2], {}, {"a": 1}]


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    n = int.from_bytes(raw[:8], "little")
    choice = rng.randrange(4)
    if choice == 0:  # flip bytes inside the length or the header
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(min(len(b), 8 + n))] ^= 1 << rng.randrange(8)
    elif choice == 1:  # cut the file anywhere
        del b[rng.randrange(len(b)) :]
    elif choice == 2:  # a random header length
        b[:8] = rng.choice([0, 1, 7, n - 1, n + 1, len(b), 2**62, rng.randrange(2**32)]).to_bytes(8, "little", signed=False)
    else:  # random bytes in the header
        start = rng.randrange(8, 8 + n)
        b[start : start + 8] = bytes(rng.randrange(256) for _ in range(8))
    return bytes(b)


def mutate_json(raw: bytes, rng: random.Random) -> bytes:
    header, data = _split(raw)
    name = rng.choice(list(header))
    entry = header[name]
    if name == "__metadata__" or rng.random() < 0.2:
        header[name] = rng.choice(_VALUES)
    else:
        key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if rng.random() < 0.3:
            entry.pop(key, None)
        else:
            entry[key] = rng.choice(_VALUES)
    if rng.random() < 0.2:
        header = rng.choice(_VALUES)
    return _join(header, data)


def mutate_index(text: str, rng: random.Random) -> str:
    index = json.loads(text)
    wm = index["weight_map"]
    choice = rng.randrange(5)
    name = rng.choice(list(wm))
    if choice == 0:
        wm[name] = rng.choice(["", "../x.safetensors", "/etc/passwd", "model-00009-of-00002.safetensors", 3])
    elif choice == 1:
        del wm[name]
    elif choice == 2:
        wm[name + ".ghost"] = wm[name]
    elif choice == 3:
        index["weight_map"] = rng.choice(_VALUES)
    else:
        return text[: rng.randrange(len(text))]
    return json.dumps(index)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from packers import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", "gptq", "qwen3_moe", sym=False, desc_act=True, shards=2, num_layers=1)


def _open(path: Path) -> None:
    try:
        build_model_map(Checkpoint(path))
    except MoeprepError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_headers_and_index(base, tmp_path, seed):
    rng = random.Random(seed)
    work = tmp_path / "ckpt"
    shutil.copytree(base, work)
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    originals = {s: (base / s).read_bytes() for s in shards}
    index_text = (base / "model.safetensors.index.json").read_text()
    deadline = time.monotonic() + BUDGET_S / len(SEEDS)
    cases = 0
    while time.monotonic() < deadline and cases < 400:
        target = rng.choice(shards + ["index"])
        if target == "index":
            (work / "model.safetensors.index.json").write_text(mutate_index(index_text, rng))
        else:
            mutate = rng.choice([mutate_bytes, mutate_json])
            (work / target).write_bytes(mutate(originals[target], rng))
        _open(work)
        # restore for the next case
        (work / "model.safetensors.index.json").write_text(index_text)
        if target != "index":
            (work / target).write_bytes(originals[target])
        cases += 1
    assert cases >= 50
