"""Minimal safetensors reader/writer on numpy arrays.

numpy has no bfloat16, so bf16 tensors travel as uint16 bit patterns: a uint16 array is
written as BF16 and BF16 is read back as uint16 (no format here stores real uint16 data).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

_TO_ST = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint8): "U8",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}


def save(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors in the given order with an 8-byte aligned header, as the Rust writer does."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {"dtype": _TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return header, meta, 8 + n


class SafetensorsFile:
    """Lazy, memory-mapped access to one file's tensors."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries, self.metadata, self._base = read_header(self.path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> np.ndarray:
        e = self.entries[name]
        start, end = (self._base + o for o in e["data_offsets"])
        return self._map[start:end].view(_FROM_ST[e["dtype"]]).reshape(e["shape"]).copy()


def checkpoint_files(ckpt_dir: Path) -> dict[str, Path]:
    """tensor name -> file, for a single-file or an indexed sharded checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: ckpt_dir / v for k, v in weight_map.items()}
    single = ckpt_dir / "model.safetensors"
    return {k: single for k in read_header(single)[0]}


class Checkpoint:
    """Name-addressed lazy access across the shards of a checkpoint directory."""

    def __init__(self, ckpt_dir: Path) -> None:
        self.files = checkpoint_files(ckpt_dir)
        self._open: dict[Path, SafetensorsFile] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def _file(self, name: str) -> SafetensorsFile:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)
