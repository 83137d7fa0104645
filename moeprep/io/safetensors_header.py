"""Strict, header-only parsing of safetensors files.

safetensors' own ``safe_open`` validates too, but its errors do not name the tensor and some
inconsistencies only surface when data is read. Parsing the header ourselves lets ``inspect``
stay header-only and lets every command refuse a bad file up front with a precise message.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ..errors import BadInputError
from . import strict_json

# safetensors dtype name -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
}
TORCH_TO_ST = {torch_name: st for st, (torch_name, _) in DTYPES.items()}
ITEMSIZE = {torch_name: size for torch_name, size in DTYPES.values()}


def dtype_name(dtype) -> str:
    """A torch dtype's name (``"bfloat16"``); a name is returned as it is. Header-level facts keep
    dtypes as names, so that work on headers alone never needs torch."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")

# safetensors refuses headers above 100 MB; anything larger is corrupt, not big.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype_name(self) -> str:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class Header:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate the header of one safetensors file without touching tensor data."""
    path = os.fspath(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
            raise BadInputError("not a regular file", path=path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = header_length(path, f.read(8), size)
            raw = f.read(n)
    except OSError as e:
        raise BadInputError(f"cannot read: {e.strerror or e}", path=path) from None
    return parse_header(path, raw, size)


def header_length(path: str, prefix: bytes, size: int) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size."""
    if size < 8 or len(prefix) < 8:
        raise BadInputError(f"not a safetensors file: {size} bytes, too short for a header", path=path)
    n = int.from_bytes(prefix[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise BadInputError(f"corrupt safetensors header: declared length {n} is over 100 MB", path=path)
    if 8 + n > size:
        raise BadInputError(f"truncated safetensors file: header needs {8 + n} bytes but the file has {size}", path=path)
    return n


def parse_header(path: str, raw: bytes, size: int) -> Header:
    """Validate the JSON header ``raw`` (the bytes after the length) of a file of ``size`` bytes;
    ``path`` names the file in errors (a local path or a hub file)."""
    try:
        obj = strict_json.loads(raw)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
        raise BadInputError(f"invalid safetensors header JSON: {e}", path=path) from None
    if not isinstance(obj, dict):
        raise BadInputError("invalid safetensors header: not a JSON object", path=path)
    return _validate(path, obj, 8 + len(raw), size)


def _validate(path: str, obj: dict, data_start: int, size: int) -> Header:
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadInputError("invalid safetensors header: __metadata__ must map strings to strings", path=path)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _tensor_info(path, name, entry, data_start)
    spans = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    cursor = data_start
    for t in spans:
        if t.begin != cursor:
            what = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap before it"
            raise BadInputError(f"bad data offsets: tensor {what}", path=path, tensor=t.name)
        cursor = t.end
    if cursor != size:
        if cursor > size:
            last = spans[-1].name if spans else None
            raise BadInputError(
                f"truncated safetensors file: tensor data needs {cursor} bytes but the file has {size}",
                path=path,
                tensor=last,
            )
        raise BadInputError(f"{size - cursor} trailing bytes after the last tensor", path=path)
    return Header(path, tensors, dict(metadata), data_start, size)


def _tensor_info(path: str, name: str, entry: object, data_start: int) -> TensorInfo:
    def bad(msg: str) -> BadInputError:
        return BadInputError(f"invalid tensor entry: {msg}", path=path, tensor=name)

    if not isinstance(entry, dict):
        raise bad("not a JSON object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    expected = DTYPES[dtype][1]
    for d in shape:  # as safetensors counts: in 64-bit words that must not overflow
        expected *= d
        if d >= 1 << 64 or expected >= 1 << 64:
            raise bad(f"shape {shape} holds more than 2^64 bytes")
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"dtype {dtype} and shape {shape} need {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
