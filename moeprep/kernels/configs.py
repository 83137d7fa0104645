"""Configurations of the fused MoE GEMMs, per device, shape and batch size.

Decode (few rows per expert) is a stream over the touched experts' weights: 16-row blocks,
split-K on the down projection when the grid would still not fill the GPU, and on the gate/up
projection where a tuned entry asks for it. Prefill is tensor-core bound: large tiles, 64- to
128-row blocks so that each decoded weight serves many tokens.

A configuration names the backend that should run it (``backend``, see kernels/backend.py) and
always carries the Triton GEMMs' tiles, which run wherever that backend cannot. Tuned
configurations are data: ``tuned/<device name>.json`` (written by ``scripts/bench_moe.py --tune
--write``), looked up by the GPU's name and the problem's shape. A device or shape without entries
gets its vendor's heuristic. docs/design/tuning.md says how the tables are made.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
import triton

from .device import sm_count

TUNED_DIR = Path(__file__).resolve().parent / "tuned"


@dataclass(frozen=True)
class GemmConfig:
    """One Triton GEMM's tiles."""

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
    """The parameters of the CUDA decode backend."""

    w13: MmaGemm = MmaGemm()
    w2: MmaGemm = MmaGemm(split=0)


@dataclass(frozen=True)
class MoEConfig:
    block_m: int  # routed rows per block, shared by both GEMMs: the routing pads every expert's rows to it
    w13: GemmConfig
    w2: GemmConfig
    backend: str = "triton"  # the registered backend asked for (kernels/backend.py)
    mma: Optional[MmaDecode] = None  # the parameters of the "cuda_mma_decode" backend

    def __post_init__(self):
        if (self.backend == "cuda_mma_decode") != (self.mma is not None):
            raise ValueError("mma parameters go with the cuda_mma_decode backend, and only with it")

    @property
    def route_block_m(self) -> int:
        """The block size the routing pads to (the dispatcher sets ``block_m`` to the backend's)."""
        return self.block_m


@dataclass(frozen=True)
class Problem:
    """What a tuned table is keyed by: the code family and the layer's shapes."""

    family: str  # "int4" or "mxfp4"
    experts: int
    hidden: int
    intermediate: int
    top_k: int
    group_size: int  # of w13


@dataclass
class TunedTable:
    """One device's tuned configurations: per problem, entries in ascending smallest batch size."""

    device: str
    entries: dict[Problem, list[tuple[int, MoEConfig]]] = field(default_factory=dict)
    source: str = ""
    models: dict[Problem, str] = field(default_factory=dict)  # the benchmark model each problem is

    def lookup(self, problem: Problem, tokens: int) -> Optional[MoEConfig]:
        chosen = None
        for t_min, cfg in self.entries.get(problem, []):
            if tokens >= t_min:
                chosen = cfg
        return chosen


def config_from_json(entry: dict) -> MoEConfig:
    mma = entry.get("mma")
    return MoEConfig(
        entry["block_m"], GemmConfig(**entry["w13"]), GemmConfig(**entry["w2"]), entry.get("backend", "triton"),
        None if mma is None else MmaDecode(MmaGemm(**mma["w13"]), MmaGemm(**mma["w2"])),
    )


def config_to_json(t_min: int, cfg: MoEConfig) -> dict:
    entry = {"min_tokens": t_min, "backend": cfg.backend, "block_m": cfg.block_m, "w13": asdict(cfg.w13),
             "w2": asdict(cfg.w2)}
    if cfg.mma is not None:
        entry["mma"] = {"w13": asdict(cfg.mma.w13), "w2": asdict(cfg.mma.w2)}
    return entry


def table_from_json(doc: dict) -> TunedTable:
    table = TunedTable(doc["device"], source=doc.get("source", ""))
    for p in doc["problems"]:
        problem = Problem(p["family"], p["experts"], p["hidden"], p["intermediate"], p["top_k"], p["group_size"])
        table.entries[problem] = sorted((e["min_tokens"], config_from_json(e)) for e in p["entries"])
        if "model" in p:
            table.models[problem] = p["model"]
    return table


def table_to_json(table: TunedTable) -> dict:
    problems = []
    for problem, entries in table.entries.items():
        head = {"model": table.models[problem]} if problem in table.models else {}
        problems.append({**head, **asdict(problem), "entries": [config_to_json(t, c) for t, c in entries]})
    return {"device": table.device, "source": table.source, "problems": problems}


def table_path(device_name: str) -> Path:
    return TUNED_DIR / ("".join(c if c.isalnum() else "_" for c in device_name) + ".json")


@lru_cache(maxsize=None)
def tuned_table(device_name: str) -> Optional[TunedTable]:
    """The tuned table of a GPU by its name (``torch.cuda.get_device_name``), if there is one."""
    path = table_path(device_name)
    if not path.is_file():
        return None
    table = table_from_json(json.loads(path.read_text()))
    return table if table.device == device_name else None


def vendor(device: torch.device) -> str:
    """``amd`` on ROCm builds, else ``nvidia`` (the CPU runs the Triton interpreter, which takes the
    NVIDIA heuristic)."""
    return "amd" if torch.version.hip is not None and device.type == "cuda" else "nvidia"


def device_table(device: torch.device) -> Optional[TunedTable]:
    if device.type != "cuda":
        return None
    return tuned_table(torch.cuda.get_device_name(device))


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


# Untuned shapes, by rows per expert: (most rows per expert, block_m, w13 tiles, w2 tiles). NVIDIA: the
# tiles the H100 sweeps favoured. AMD: the same tiles in two stages (Triton's AMD pipeliner), until
# measured. Only unswapped tiles: swapped ones come from tuned tables, whose sweeps checked every
# result (docs/design/triton-kernels.md).
HEURISTICS = {
    "nvidia": [(8, 16, (64, 128, 4, 3), (128, 64, 4, 3)), (32, 32, (64, 64, 4, 3), (128, 64, 4, 3)),
               (128, 64, (64, 64, 4, 3), (128, 64, 4, 3)), (None, 128, (64, 64, 8, 3), (128, 64, 4, 3))],
    "amd": [(8, 16, (64, 128, 4, 2), (128, 64, 4, 2)), (32, 32, (64, 64, 4, 2), (128, 64, 4, 2)),
            (128, 64, (64, 64, 4, 2), (128, 64, 4, 2)), (None, 128, (64, 64, 8, 2), (128, 64, 4, 2))],
}


def heuristic(vendor_name: str, tokens: int, top_k: int, experts: int) -> MoEConfig:
    """A vendor's configuration for a shape it has no tuned entry for."""
    per_expert = tokens * top_k / experts
    for most, block_m, w13, w2 in HEURISTICS[vendor_name]:
        if most is None or per_expert <= most:
            return MoEConfig(block_m, GemmConfig(*w13), GemmConfig(*w2))
    raise AssertionError("every heuristic ends in a catch-all row")


def pick(tokens: int, top_k: int, experts: int, hidden: int, inter: int, family: str, device: torch.device,
         group_sizes: tuple[int, int], table: Optional[TunedTable] = None) -> MoEConfig:
    """The configuration for one call: the tuned entry of ``table`` (by default the device's own),
    else the vendor's heuristic, fitted to the shapes (block_k to K and the scale groups, block_n to
    N, split-K to fill the device)."""
    table = table if table is not None else device_table(device)
    problem = Problem(family, experts, hidden, inter, top_k, group_sizes[0])
    cfg = table.lookup(problem, tokens) if table is not None else None
    if cfg is None:
        cfg = heuristic(vendor(device), tokens, top_k, experts)
    return fit(cfg, tokens, top_k, experts, hidden, inter, device, group_sizes)


MAX_ADDS = 16  # partial sums added into each output element by the down projection, at most


def fit(cfg: MoEConfig, tokens: int, top_k: int, experts: int, hidden: int, inter: int, device: torch.device,
        group_sizes: tuple[int, int], split_k: Optional[int] = None) -> MoEConfig:
    # Triton's AMD backend fails to compile some down-projection tiles split 3 ways (gfx950,
    # scripts/check_amd.py): AMD GPUs split in powers of two only
    pow2 = vendor(device) == "amd"
    w13 = _fit_gemm(cfg.w13, inter, hidden, group_sizes[0])
    w13 = replace(w13, split_k=_split(w13.split_k, hidden // w13.block_k, pow2))
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
    return replace(cfg, w13=w13, w2=replace(w2, split_k=_split(wanted, inter // w2.block_k, pow2)))


def _split(wanted: int, k_tiles: int, pow2: bool = False) -> int:
    """The largest split <= wanted that divides the K tiles evenly, leaving each at least two
    (and, with ``pow2``, a power of two)."""
    able = [s for s in range(1, max(wanted, 1) + 1)
            if k_tiles % s == 0 and k_tiles // s >= 2 and not (pow2 and s & (s - 1))]
    return max(able or [1])


def _fit_gemm(g: GemmConfig, rows: int, cols: int, group_size: int) -> GemmConfig:
    bk = fit_block_k(g.block_k, cols, group_size)
    bn = max(16, min(g.block_n, triton.next_power_of_2(rows)))
    return replace(g, block_k=bk, block_n=bn)
