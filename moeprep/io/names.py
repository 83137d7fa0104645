"""Tensor-name helpers shared by every layer that orders or groups a checkpoint's tensors."""
from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor or module name belongs to, if any."""
    m = _LAYER.search(name)
    return int(m[1]) if m else None


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
