"""What the kernels ask of a GPU: its compute capability and size, cached per device because every
call's dispatch asks."""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def index(device: torch.device) -> int:
    """The device's index, the current device's for a bare ``cuda``."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _of(device: torch.device):
    return _properties(index(device))


def nvidia_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) of an NVIDIA GPU; (0, 0) for any other device (CPU, ROCm), on which no PTX runs."""
    if torch.version.hip is not None or device.type != "cuda":
        return 0, 0
    p = _of(device)
    return p.major, p.minor


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (CUDA) or compute units (ROCm) of a device."""
    return _of(device).multi_processor_count
