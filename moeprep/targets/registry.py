"""The registry of target layouts."""
from __future__ import annotations

from ..errors import TargetError

TARGETS: dict[str, object] = {}


def register(cls: type) -> type:
    TARGETS[cls.name] = cls()
    return cls


def get_target(name: str):
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target {name!r} (choose from: {', '.join(TARGETS)})") from None
