"""The progress line of the commands that write or check a checkpoint: bytes and tensors done,
on stderr, only on a terminal wide enough to hold it and never with ``--quiet`` or ``--json``."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

MIN_COLUMNS = 40  # narrower terminals (or a width of zero) get no bar at all


class Progress:
    """``advance(nbytes, tensors)`` as work completes; updated at every call, so a caller that
    reports pieces of a tensor (an expert at a time) keeps it moving inside a layer."""

    def __init__(self, what: str, total_bytes: int, total_tensors: int, quiet: bool = False):
        on = not quiet and sys.stderr.isatty() and _columns() >= MIN_COLUMNS
        self.total_tensors, self.tensors = total_tensors, 0
        self._bar = tqdm(total=total_bytes, desc=what, unit="B", unit_scale=True, file=sys.stderr, disable=not on,
                         dynamic_ncols=True, mininterval=0.2, leave=False)

    def advance(self, nbytes: int = 0, tensors: int = 0) -> None:
        if tensors:
            self.tensors += tensors
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        self._bar.update(nbytes)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _columns() -> int:
    """The width of the terminal stderr writes to (0 where it has none)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 0
