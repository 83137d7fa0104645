"""Tile configurations of the grouped GEMMs, per shape and batch size.

Decode (few rows per expert) is a stream over the touched experts' weights: one-row blocks (no
MMA) or 16-row blocks, narrow column tiles so that enough programs run, and split-K on the down
projection when the grid would still not fill the GPU. Prefill is tensor-core bound: large tiles. ``TUNED`` holds what
``scripts/bench_moe.py --tune`` measured on an H100 for the benchmarked models; other shapes get
the heuristic.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional

import torch
import triton


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    group_m: int = 8


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # shared by both GEMMs: the routing pads every expert's rows to it
    w13: GemmConfig
    w2: GemmConfig


def _cfg(block_m: int, w13: tuple, w2: tuple) -> MoEConfig:
    return MoEConfig(block_m, GemmConfig(*w13), GemmConfig(*w2))


# (format family, E, H, I, top_k) -> [(smallest T, config)], ascending T. From
# `scripts/bench_moe.py --tune --tokens 1,4,16,64,2048` on an H100 (docs/benchmarks.md).
TUNED: dict[tuple, list[tuple[int, MoEConfig]]] = {
    ("int4", 128, 2048, 768, 8): [  # Qwen3-30B-A3B
        (1, _cfg(1, (16, 256, 4, 3), (16, 128, 4, 3, 1))),
        (4, _cfg(1, (32, 64, 4, 4), (32, 128, 4, 3, 1))),
        (16, _cfg(16, (64, 64, 4, 4), (64, 128, 4, 3, 1))),
        (64, _cfg(16, (64, 64, 4, 4), (64, 64, 4, 4, 1))),
        (512, _cfg(32, (64, 128, 4, 3), (64, 128, 4, 3, 1))),  # not tuned
        (2048, _cfg(128, (128, 128, 8, 3), (128, 64, 8, 3, 1))),
    ],
    ("mxfp4", 128, 2880, 2880, 4): [  # gpt-oss-120b
        (1, _cfg(16, (32, 64, 4, 3), (64, 64, 4, 4, 3))),
        (4, _cfg(16, (64, 64, 4, 3), (64, 64, 4, 3, 3))),
        (16, _cfg(16, (64, 64, 4, 3), (64, 64, 4, 3, 1))),
        (2048, _cfg(64, (64, 64, 4, 3), (64, 64, 4, 3, 1))),
    ],
    ("int4", 8, 4096, 14336, 2): [  # Mixtral-8x7B
        (1, _cfg(1, (16, 128, 4, 3), (16, 256, 4, 3, 4))),
        (4, _cfg(16, (64, 64, 4, 4), (64, 64, 4, 4, 4))),
        (64, _cfg(32, (64, 64, 4, 3), (64, 64, 4, 3, 2))),
        (512, _cfg(64, (128, 64, 8, 3), (128, 64, 8, 3, 1))),  # not tuned: the sweep ran out of time
    ],
}


def fit_block_k(block_k: int, cols: int, group_size: int) -> int:
    """The largest power of two <= block_k (and >= 16) that divides ``cols`` and either lies inside
    one scale group or holds whole groups; 0 if none does."""
    bk = block_k
    while bk >= 16:
        whole_groups = bk % group_size == 0 and group_size >= 8 and group_size & (group_size - 1) == 0
        if cols % bk == 0 and (group_size % bk == 0 or whole_groups):
            return bk
        bk //= 2
    return 0


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def _heuristic(tokens: int, top_k: int, experts: int) -> MoEConfig:
    per_expert = tokens * top_k / experts
    if per_expert <= 1:
        return MoEConfig(1, GemmConfig(32, 128, 4, 3), GemmConfig(32, 128, 4, 3))
    if per_expert <= 8:
        return MoEConfig(16, GemmConfig(64, 128, 4, 3), GemmConfig(64, 128, 4, 3))
    if per_expert <= 64:
        return MoEConfig(32, GemmConfig(64, 128, 4, 3), GemmConfig(64, 128, 4, 3))
    return MoEConfig(64, GemmConfig(128, 64, 8, 3), GemmConfig(128, 64, 8, 3))


def pick(tokens: int, top_k: int, experts: int, hidden: int, inter: int, family: str, device: torch.device,
         group_sizes: tuple[int, int]) -> MoEConfig:
    """The configuration for one call, fitted to the shapes (block_k to K and the scale groups,
    block_n to N, split-K to fill the device)."""
    cfg = _heuristic(tokens, top_k, experts)
    for t_min, tuned in TUNED.get((family, experts, hidden, inter, top_k), []):
        if tokens >= t_min:
            cfg = tuned
    return fit(cfg, tokens, top_k, experts, hidden, inter, device, group_sizes)


def fit(cfg: MoEConfig, tokens: int, top_k: int, experts: int, hidden: int, inter: int, device: torch.device,
        group_sizes: tuple[int, int], split_k: Optional[int] = None) -> MoEConfig:
    w13 = _fit_gemm(cfg.w13, inter, hidden, group_sizes[0])
    w2 = _fit_gemm(cfg.w2, hidden, inter, group_sizes[1])
    if split_k is None and cfg.w2.split_k == 1:
        pairs = tokens * top_k
        blocks = max(min(experts, pairs), pairs // cfg.block_m)  # blocks that do work, at least
        grid = blocks * triton.cdiv(hidden, w2.block_n)
        split_k = triton.next_power_of_2(triton.cdiv(_programs_wanted(device), grid))
    return MoEConfig(cfg.block_m, w13, replace(w2, split_k=_split(split_k or cfg.w2.split_k, inter // w2.block_k)))


def _split(wanted: int, k_tiles: int) -> int:
    """The largest split <= wanted that divides the K tiles evenly, leaving each at least two."""
    return max([s for s in range(1, max(wanted, 1) + 1) if k_tiles % s == 0 and k_tiles // s >= 2] or [1])


def _fit_gemm(g: GemmConfig, rows: int, cols: int, group_size: int) -> GemmConfig:
    bk = fit_block_k(g.block_k, cols, group_size)
    bn = max(16, min(g.block_n, triton.next_power_of_2(rows)))
    return replace(g, block_k=bk, block_n=bn)
