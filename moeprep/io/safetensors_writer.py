"""Write safetensors files tensor by tensor, with the header planned before any data.

``safetensors.save_file`` needs every tensor in memory at once; a converter that streams one
layer at a time cannot do that. Here the header (names, dtypes, shapes, offsets) is written
first from a plan, then each tensor's bytes as they are produced, in plan order.
"""
from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..lazy import torch

from ..errors import OutputError
from .safetensors_header import ITEMSIZE, TORCH_TO_ST, dtype_name

_ALIGN = 8
# Writes of a few hundred KB run at memory speed here; single writes of hundreds of MB are
# several times slower (on a 2-core machine: 4 GB/s against 0.4 GB/s).
_WRITE_CHUNK = 256 << 10


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # torch's name of it ("bfloat16"); a torch dtype given here is turned into its name
    shape: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def st_dtype(self) -> str:
        return TORCH_TO_ST[self.dtype]


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
        header = header_bytes(self.specs, metadata)
        # Reserving the whole file first makes a full disk fail here, before any data is written,
        # and spares the filesystem block allocation on every later write.
        try:
            os.posix_fallocate(self._f.fileno(), 0, len(header) + sum(s.nbytes for s in self.specs))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # unsupported here: fine
                self._f.close()
                raise
        self._f.write(header)

    def _expect(self, name: str) -> TensorSpec:
        if self._next >= len(self.specs):
            raise RuntimeError(f"{self.path}: no more tensors planned, got {name}")
        spec = self.specs[self._next]
        if name != spec.name:
            raise RuntimeError(f"{self.path}: planned {spec.name} next, got {name}")
        return spec

    def _write_bytes(self, data: memoryview) -> None:
        for start in range(0, len(data), _WRITE_CHUNK):
            self._f.write(data[start : start + _WRITE_CHUNK])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """One whole planned tensor."""
        spec = self._expect(name)
        if dtype_name(tensor.dtype) != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"{self.path}: planned {name} {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self._write_bytes(tensor_bytes(tensor))
        self._next += 1

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """One planned tensor from consecutive pieces of its row-major bytes."""
        spec = self._expect(name)
        total = 0
        for piece in pieces:
            if dtype_name(piece.dtype) != spec.dtype:
                raise RuntimeError(f"{self.path}: planned {name} {spec.dtype}, got a {piece.dtype} piece")
            data = tensor_bytes(piece)
            total += len(data)
            if total > spec.nbytes:
                raise RuntimeError(f"{self.path}: pieces of {name} exceed its {spec.nbytes} bytes")
            self._write_bytes(data)
        if total != spec.nbytes:
            raise RuntimeError(f"{self.path}: pieces of {name} hold {total} of its {spec.nbytes} bytes")
        self._next += 1

    def copy(self, name: str, src: Path, begin: int, nbytes: int) -> None:
        """One planned tensor copied byte for byte from another file, in the kernel where it can."""
        spec = self._expect(name)
        if spec.nbytes != nbytes:
            raise RuntimeError(f"{self.path}: planned {name} of {spec.nbytes} bytes, got {nbytes}")
        _copy_range(src, begin, nbytes, self._f)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path}: {len(self.specs) - self._next} planned tensors were not written")
        self._f.close()

    def abort(self) -> None:
        self._f.close()


def write_error(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"cannot write: {exc.strerror or exc}", path=str(path))


def _copy_range(src: Path, begin: int, nbytes: int, dst) -> None:
    dst.flush()
    with open(src, "rb") as f:
        offset, left = begin, nbytes
        while left:
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), left, offset)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                n = 0
            if n == 0:  # unsupported here, or the source ended early: fall back to plain reads
                f.seek(offset)
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    raise OSError(errno.EIO, f"{src} ended early")
                dst.write(chunk)
                dst.flush()
                n = len(chunk)
            offset += n
            left -= n
