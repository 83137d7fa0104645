"""Write safetensors files tensor by tensor, with the header planned before any data.

``safetensors.save_file`` needs every tensor in memory at once; a converter that streams one
layer at a time cannot do that. Here the header (names, dtypes, shapes, offsets) is written
first from a plan, then each tensor's bytes as they are produced, in plan order.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..errors import OutputError
from .safetensors_header import TORCH_TO_ST

_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def st_dtype(self) -> str:
        return TORCH_TO_ST[str(self.dtype).removeprefix("torch.")]


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": spec.st_dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return len(raw).to_bytes(8, "little") + raw


def file_size(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(specs, metadata)) + sum(s.nbytes for s in specs)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous on CPU."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    def __init__(self, path: str | os.PathLike, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        self._f = open(self.path, "wb")
        self._f.write(header_bytes(self.specs, metadata))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise RuntimeError(f"{self.path}: no more tensors planned, got {name}")
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"{self.path}: planned {spec.name} {spec.dtype} {list(spec.shape)}, got {name} {tensor.dtype} {list(tensor.shape)}"
            )
        self._f.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path}: {len(self.specs) - self._next} planned tensors were not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``final``, renamed onto it only if the block completes."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.moeprep-tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write: {exc.strerror or exc}", path=str(path))
