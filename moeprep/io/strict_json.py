"""JSON as the standard defines it, bounded: what every checkpoint file moeprep parses must be.

Python's ``json`` also accepts ``NaN`` and ``Infinity`` (which then reach ``inspect --json`` as
output that is not JSON), strings with lone surrogates (which no file system or safetensors
header can hold), and nesting deep enough to exhaust the interpreter's stack. These are refused
here with a ``ValueError`` saying what was found; callers name the file.
"""
from __future__ import annotations

import json

MAX_DEPTH = 64  # nesting of arrays and objects; real configs and headers stay under 10


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(raw: bytes | str) -> object:
    """Parse ``raw`` (UTF-8 bytes or text) strictly; ``ValueError`` says what is wrong."""
    text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    _check(obj)
    return obj


def _check(obj: object) -> None:
    """Depth and strings, walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _utf8(value)
        elif isinstance(value, (list, dict)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None:
                    _utf8(key)
                stack.append((item, depth + 1))


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"string {text[:40]!r} is not valid UTF-8 (a lone surrogate escape)") from None
