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


def preference(kind: str) -> tuple[str, ...]:
    """The targets that hold ``kind`` weights, in the order a conversion tries them."""
    able = [t for t in TARGETS.values() if kind in t.kinds]
    return tuple(t.name for t in sorted(able, key=lambda t: t.preference))
