"""Tile configurations of the grouped GEMMs, per shape and batch size.

Decode (few rows per expert) is a stream over the touched experts' weights: 16-row blocks (the
one-row, no-MMA blocks remain selectable but lost every H100 sweep once the MMA operand was
decoded two values per instruction), split-K on the down projection when the grid would still
not fill the GPU, and on the gate/up projection where TUNED asks for it. Prefill is tensor-core
bound: large tiles, 64- to 128-row blocks so that each decoded weight serves many tokens.
Swapped operands (``swap_ab``) won most int4 sweeps, in decode and prefill. ``TUNED`` holds what
``scripts/bench_moe.py --tune`` measured (and checked against the fp32 reference) on an H100,
decode re-swept on an H200, for the benchmarked models; other shapes get the heuristic. Decode
entries may also name the CUDA decode GEMMs (``MmaDecode``), and prefill entries the CUDA Hopper
GEMMs (``wgmma``), which replace the Triton ones on CUDA builds where they apply.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import triton

from .device import sm_count


@dataclass(frozen=True)
class GemmConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # w2: 0 is as many as it takes to fill the device (see fit); w13: 0 is 1
    group_m: int = 8
    swap_ab: bool = False  # weights as the MMA's first operand (see moe_gemm._product)


@dataclass(frozen=True)
class MmaGemm:
    """One GEMM of the CUDA tensor-core decode kernels (kernels/mma_decode.py)."""

    warps: int = 8  # per CTA: 4 or 8
    k_warps: int = 8  # warps of a CTA splitting K for the same rows (divides warps; the rest take more rows)
    stages: int = 3  # 64-k windows in each warp's shared-memory ring: 2 to 4
    split: int = 1  # CTAs along K (w2 only; 0: enough to fill the device)


@dataclass(frozen=True)
class MmaDecode:
    w13: MmaGemm = MmaGemm()
    w2: MmaGemm = MmaGemm(split=0)

    @property
    def block_m(self) -> int:
        return 8  # routed rows per block: the MMA's N


WGMMA_BLOCK_M = 256  # routed rows per block of the CUDA prefill GEMMs


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # shared by both GEMMs: the routing pads every expert's rows to it
    w13: GemmConfig
    w2: GemmConfig
    mma: Optional[MmaDecode] = None  # the CUDA decode GEMMs (with their own block_m) where they apply
    wgmma: bool = False  # the CUDA Hopper prefill GEMMs (kernels/wgmma_prefill.py) where they apply

    @property
    def route_block_m(self) -> int:
        """The block size the routing pads to: that of the CUDA GEMMs when they run."""
        if self.wgmma:
            return WGMMA_BLOCK_M
        return self.block_m if self.mma is None else self.mma.block_m


def _cfg(block_m: int, w13: tuple, w2: tuple, mma: Optional[tuple] = None, wgmma: bool = False) -> MoEConfig:
    """Tuples of GemmConfig's leading fields, ending in "swap" for swap_ab; ``mma``: the (w13, w2)
    MmaGemm fields of the CUDA decode GEMMs, which take over where they apply; ``wgmma``: the CUDA
    prefill GEMMs take over where they apply."""
    decode = None if mma is None else MmaDecode(MmaGemm(*mma[0]), MmaGemm(*mma[1]))
    return MoEConfig(block_m, _gemm(w13), _gemm(w2), decode, wgmma)


def _gemm(fields: tuple) -> GemmConfig:
    if fields[-1] == "swap":
        return GemmConfig(*fields[:-1], swap_ab=True)
    return GemmConfig(*fields)


# (format family, E, H, I, top_k, w13 group size) -> [(smallest T, config)], ascending T; the comments give the
# GEMMs' times. From `scripts/bench_moe.py --tune` on an H100, T <= 16 since re-swept on an H200 with the
# gate/up split along K, and the CUDA decode GEMMs ("CUDA", mma=...) swept on the H200 against the
# Triton configuration beside them, kept where the pair was faster (docs/benchmarks.md). The CUDA down
# GEMM starts while the gate/up one runs: its time is the pair's less the gate/up GEMM's alone. Qwen3's
# T = 4 entries serve from T = 2: the layer at T = 2 / 3 took 35 / 42 us on them against 38 / 53 on the
# T = 1 entries (H200, fifteenth round); gpt-oss and Mixtral measured the same or slower that way. Mixtral's
# T = 2 entry is a sweep at T = 2 (its Triton GEMMs those of T = 1; sixteenth round).
TUNED: dict[tuple, list[tuple[int, MoEConfig]]] = {
    ("int4", 8, 4096, 14336, 2, 32): [  # mixtral-8x7b
        (1, _cfg(16, (64, 64, 4, 3, 2, "swap"), (128, 64, 4, 4, 8, "swap"),
                 mma=((4, 4, 4), (8, 8, 3, 2)))),  # 81 + 42 us; CUDA 60 + 23 us (H200)
        (2, _cfg(16, (64, 64, 4, 3, 2, "swap"), (128, 64, 4, 4, 8, "swap"),
                 mma=((4, 4, 4), (8, 8, 4, 1)))),  # CUDA 89 + 38 us (H200)
        (4, _cfg(16, (64, 128, 4, 3, "swap"), (128, 64, 4, 4, 8, "swap"),
                 mma=((4, 4, 4), (8, 8, 3, 0)))),  # 145 + 76 us; CUDA 93 + 41 us (H200)
        (16, _cfg(16, (64, 128, 4, 3, "swap"), (128, 64, 4, 4, 8, "swap"),
                  mma=((4, 4, 3), (8, 8, 2, 0)))),  # 274 + 141 us; CUDA 154 + 75 us (H200)
        (64, _cfg(32, (64, 128, 4, 3, "swap"), (128, 64, 4, 4, 2, "swap"))),  # 306 + 162 us
        (512, _cfg(128, (64, 64, 4, 3, "swap"), (128, 128, 8, 4, 1),
                   wgmma=True)),  # 803 + 538 us; CUDA 582 + 297 us (H200)
        (2048, _cfg(128, (64, 64, 4, 3, "swap"), (256, 64, 8, 3, 1, "swap"),
                    wgmma=True)),  # 2262 + 1382 us; CUDA 1536 + 801 us (H200)
        (8192, _cfg(128, (64, 64, 4, 3, "swap"), (256, 64, 8, 3, 1, "swap"),
                    wgmma=True)),  # 8158 + 4430 us; CUDA 6249 + 3033 us (H200)
    ],
    ("int4", 128, 2048, 768, 8, 32): [  # qwen3-30b-a3b
        (1, _cfg(16, (64, 64, 4, 3, 4, "swap"), (128, 64, 4, 4, 2, "swap"),
                 mma=((8, 8, 2), (8, 8, 2, 2)))),  # 17 + 11 us; CUDA 15 + 8 us (H200)
        (2, _cfg(16, (64, 64, 4, 3, 2, "swap"), (128, 64, 4, 4, 1, "swap"),
                 mma=((4, 4, 3), (8, 2, 3, 1)))),  # T = 4: 35 + 22 us; CUDA 29 + 16 us (H200)
        (16, _cfg(16, (64, 128, 4, 3, "swap"), (128, 64, 4, 4, 1, "swap"),
                  mma=((4, 4, 3), (4, 1, 3, 1)))),  # 86 + 48 us; CUDA 62 + 35 us (H200)
        (64, _cfg(16, (64, 64, 4, 3, "swap"), (128, 64, 4, 4, 1, "swap"),
                  mma=((4, 4, 3), (4, 2, 3, 1)))),  # 130 + 67 us; CUDA 81 + 53 us (H200)
        (512, _cfg(64, (64, 64, 4, 3), (128, 64, 4, 3, 1))),  # 172 + 105 us
        (2048, _cfg(128, (64, 64, 4, 3, "swap"), (128, 64, 4, 3, 1))),  # 356 + 217 us
        (8192, _cfg(128, (64, 64, 4, 3, "swap"), (128, 64, 4, 3, 1),
                    wgmma=True)),  # 1031 + 640 us; CUDA 760 + 726 us (H200)
    ],
    ("mxfp4", 128, 2880, 2880, 4, 32): [  # gpt-oss-120b
        (1, _cfg(16, (32, 64, 4, 3, 5), (64, 64, 4, 3, 3),
                 mma=((4, 4, 4), (4, 2, 4, 4)))),  # 37 + 23 us; CUDA 25 + 13 us (H200)
        (4, _cfg(16, (128, 64, 4, 3, 3), (64, 64, 4, 3, 3),
                 mma=((4, 4, 3), (4, 4, 3, 1)))),  # 87 + 54 us; CUDA 56 + 30 us (H200)
        (16, _cfg(16, (128, 64, 4, 3), (128, 64, 4, 3, 3),
                  mma=((4, 4, 3), (4, 4, 3, 1)))),  # 257 + 147 us; CUDA 151 + 76 us (H200)
        (64, _cfg(16, (128, 64, 4, 3), (128, 64, 4, 3, 3),
                  mma=((8, 2, 4), (4, 2, 3, 1)))),  # 513 + 293 us; CUDA 318 + 175 us (H200)
        (512, _cfg(32, (32, 64, 4, 3, "swap"), (64, 64, 4, 4, 1, "swap"))),  # 827 + 446 us
        (2048, _cfg(64, (128, 64, 4, 3), (128, 64, 4, 3, 1))),  # 1261 + 753 us
        (8192, _cfg(128, (64, 64, 8, 3), (128, 64, 4, 3, 1, "swap"))),  # 3680 + 1814 us
    ],
    ("int4", 128, 2048, 768, 8, 128): [  # qwen3-30b-a3b-zp
        (1, _cfg(16, (128, 64, 4, 3, 8), (64, 64, 4, 4, 2),
                 mma=((8, 8, 2), (8, 8, 2, 4)))),  # 17 + 11 us; CUDA 16 + 7 us (H200)
        (2, _cfg(16, (128, 64, 4, 4, 2), (64, 64, 4, 4, 1),
                 mma=((4, 4, 4), (8, 2, 3, 1)))),  # T = 4: 39 + 25 us; CUDA 33 + 17 us (H200)
        (16, _cfg(16, (64, 64, 4, 4, 2), (128, 64, 4, 3, 1),
                  mma=((4, 4, 3), (4, 1, 3, 1)))),  # 88 + 46 us; CUDA 59 + 36 us (H200)
        (64, _cfg(16, (128, 64, 4, 3), (64, 64, 4, 4, 1),
                  mma=((4, 2, 4), (4, 1, 4, 0)))),  # 117 + 72 us; CUDA 82 + 54 us (H200)
        (512, _cfg(64, (64, 64, 4, 3), (128, 64, 4, 3, 1))),  # 181 + 109 us
        (2048, _cfg(128, (64, 64, 8, 3), (128, 64, 8, 3, 1),
                    wgmma=True)),  # 401 + 227 us; CUDA 324 + 244 us (H200)
        (8192, _cfg(128, (64, 64, 8, 3), (128, 64, 8, 3, 1),
                    wgmma=True)),  # 1210 + 683 us; CUDA 802 + 748 us (H200)
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


def _programs_wanted(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 1


def _heuristic(tokens: int, top_k: int, experts: int) -> MoEConfig:
    """Untuned shapes, by rows per expert: tiles the H100 sweeps favoured, with the weights as the
    MMA's second operand. Swapped operands only come from TUNED, whose sweeps checked every result:
    one swapped MXFP4 tile compiled to wrong results on gpt-oss's shapes (docs/benchmarks.md)."""
    per_expert = tokens * top_k / experts
    if per_expert <= 8:
        return _cfg(16, (64, 128, 4, 3), (128, 64, 4, 3))
    if per_expert <= 32:
        return _cfg(32, (64, 64, 4, 3), (128, 64, 4, 3))
    if per_expert <= 128:
        return _cfg(64, (64, 64, 4, 3), (128, 64, 4, 3))
    return _cfg(128, (64, 64, 8, 3), (128, 64, 4, 3))


def pick(tokens: int, top_k: int, experts: int, hidden: int, inter: int, family: str, device: torch.device,
         group_sizes: tuple[int, int]) -> MoEConfig:
    """The configuration for one call, fitted to the shapes (block_k to K and the scale groups,
    block_n to N, split-K to fill the device)."""
    cfg = _heuristic(tokens, top_k, experts)
    for t_min, tuned in TUNED.get((family, experts, hidden, inter, top_k, group_sizes[0]), []):
        if tokens >= t_min:
            cfg = tuned
    return fit(cfg, tokens, top_k, experts, hidden, inter, device, group_sizes)


MAX_ADDS = 16  # partial sums added into each output element by the down projection, at most


def fit(cfg: MoEConfig, tokens: int, top_k: int, experts: int, hidden: int, inter: int, device: torch.device,
        group_sizes: tuple[int, int], split_k: Optional[int] = None) -> MoEConfig:
    w13 = _fit_gemm(cfg.w13, inter, hidden, group_sizes[0])
    w13 = replace(w13, split_k=_split(w13.split_k, hidden // w13.block_k))
    w2 = _fit_gemm(cfg.w2, hidden, inter, group_sizes[1])
    wanted = split_k or cfg.w2.split_k
    if not wanted:
        pairs = tokens * top_k
        blocks = max(min(experts, pairs), pairs // cfg.block_m)  # blocks that do work, at least
        grid = blocks * triton.cdiv(hidden, w2.block_n)
        wanted = triton.next_power_of_2(triton.cdiv(_programs_wanted(device), grid))
    # every split adds each token's top-k partial sums into the output once more, rounded to its
    # dtype each time: keep it to MAX_ADDS roundings (32 measured 8e-3 of bf16 error, near the 1e-2 bound)
    wanted = min(wanted, max(1, MAX_ADDS // top_k))
    return MoEConfig(cfg.block_m, w13, replace(w2, split_k=_split(wanted, inter // w2.block_k)), cfg.mma, cfg.wgmma)


def _split(wanted: int, k_tiles: int) -> int:
    """The largest split <= wanted that divides the K tiles evenly, leaving each at least two."""
    return max([s for s in range(1, max(wanted, 1) + 1) if k_tiles % s == 0 and k_tiles // s >= 2] or [1])


def _fit_gemm(g: GemmConfig, rows: int, cols: int, group_size: int) -> GemmConfig:
    bk = fit_block_k(g.block_k, cols, group_size)
    bn = max(16, min(g.block_n, triton.next_power_of_2(rows)))
    return replace(g, block_k=bk, block_n=bn)
