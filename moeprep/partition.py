"""One rank's share of a MoE layer's stored tensors, for engines that spread a layer over GPUs.

Expert parallelism gives each rank a contiguous range of whole experts: where a target stores
every tensor expert-major, a rank's share is a slice of the first dimension, bytes untouched
(``mxfp4_preshuffle`` shuffles all experts' scales as one matrix: refused).

Tensor parallelism splits every expert's intermediate dimension I: rank r keeps rows
``[r I/t, (r+1) I/t)`` of both gate and up (w13, along N) and the same columns of down (w2, along
K), so that its partial down projections add up over the ranks. A rank's share is cut from the
stored bytes along whole layout tiles and scale groups (docs/layouts.md), never re-encoded:

- ``canonical``: rows and group columns as stored, so I/t must hold whole scale groups (and an
  even number of codes);
- ``w4a16_preshuffle(_zp)``: the (16,16) shuffle keeps each 16-row tile contiguous and, within
  it, each run of 32 columns; scales and zero points pair their groups: I/t must be a multiple of
  32 and of two groups.

Other targets (the MXFP4 shuffles interleave gate and up, or scales across experts), expert
biases (the down bias would be added on every rank) and act-order row permutations serve at
tensor-parallel size 1 only. A refusal names the sizes that work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .errors import UnsupportedError
from .targets import LayerPlan


@dataclass(frozen=True)
class Partition:
    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    use_ep: bool = False

    def experts(self, total: int) -> range:
        """The experts this rank holds: vLLM's linear placement, the remainder on the first ranks."""
        if not self.use_ep or self.ep_size == 1:
            return range(total)
        base, extra = divmod(total, self.ep_size)
        start = self.ep_rank * base + min(self.ep_rank, extra)
        return range(start, start + base + (self.ep_rank < extra))

    @property
    def splits_experts(self) -> bool:
        """Whether each expert is cut across ranks (vLLM uses expert parallelism instead when asked)."""
        return self.tp_size > 1 and not self.use_ep


def _tp_unit(target: str, plan: LayerPlan) -> int:
    """The smallest share of I a rank can hold in this layout (0: the layout cannot be split)."""
    g2 = plan.shapes["w2"].group_size
    if target == "canonical":
        return g2 if g2 % 2 == 0 else 2 * g2
    if target in ("w4a16_preshuffle", "w4a16_preshuffle_zp"):
        return math.lcm(2 * g2, 32)
    return 0


def tp_sizes(target: str, plan: LayerPlan, roles, row_perm: bool, limit: int = 64) -> list[int]:
    """The tensor-parallel sizes up to ``limit`` whose ranks each hold whole tiles and groups."""
    inter = plan.shapes["w13"].rows // 2
    unit = _tp_unit(target, plan)
    if not unit or row_perm or any(r.endswith("_bias") for r in roles):
        return [1]
    return [t for t in range(1, limit + 1) if inter % t == 0 and (inter // t) % unit == 0]


def check_partition(partition: Partition, target: str, plan: LayerPlan, roles, row_perm: bool, where: str) -> None:
    if not partition.splits_experts:
        return
    sizes = tp_sizes(target, plan, roles, row_perm)
    if partition.tp_size not in sizes:
        why = ("act-order rows" if row_perm else "expert biases" if any(r.endswith("_bias") for r in roles)
               else f"{target}'s tiles and scale groups")
        raise UnsupportedError(
            f"tensor-parallel size {partition.tp_size} cannot split I = {plan.shapes['w13'].rows // 2} along "
            f"{why}; tensor-parallel sizes that work: {', '.join(map(str, sizes))} (or expert parallelism, "
            f"--enable-expert-parallel)", tensor=where)


def local_plan(plan: LayerPlan, partition: Partition) -> LayerPlan:
    """The plan of this rank's share (call :func:`check_partition` first)."""
    n = len(partition.experts(plan.shapes["w13"].experts))
    w13, w2 = plan.shapes["w13"], plan.shapes["w2"]
    t = partition.tp_size if partition.splits_experts else 1
    shapes = {"w13": replace(w13, experts=n, rows=w13.rows // t),
              "w2": replace(w2, experts=n, cols=w2.cols // t, groups=w2.groups // t)}
    return replace(plan, shapes=shapes)


def slice_stored(tensor: torch.Tensor, role: str, target: str, plan: LayerPlan, partition: Partition, where: str) -> torch.Tensor:
    """This rank's share of one stored tensor (a view where the share is contiguous)."""
    total = plan.shapes["w13"].experts
    r = partition.experts(total)
    if len(r) != total:
        if tensor.dim() == 0 or tensor.shape[0] != total:
            raise UnsupportedError(f"is {list(tensor.shape)}, one layout over all {total} experts (not one per expert): "
                                   f"expert parallelism cannot give a rank its own; serve it on one rank, or convert to a "
                                   f"target that stores every tensor per expert", tensor=where)
        tensor = tensor[r.start:r.stop]
    if partition.splits_experts:
        tensor = _tp_slice(tensor, role, target, plan, partition)
    return tensor


def _tp_slice(t: torch.Tensor, role: str, target: str, plan: LayerPlan, p: Partition) -> torch.Tensor:
    inter = plan.shapes["w13"].rows // 2
    share = inter // p.tp_size
    start = p.tp_rank * share
    w13 = role.startswith("w13_")
    if target == "canonical":  # [E, N, K/2] codes, [E, N, G] scales and zero points
        if w13:
            return torch.cat([t.narrow(1, start, share), t.narrow(1, inter + start, share)], 1)
        return t.narrow(2, start * t.shape[2] // inter, share * t.shape[2] // inter)  # codes or groups of I
    # w4a16: codes [E, N, K/2] in 16-row tiles of 32-column runs (256 bytes); scales [E, G/2, N, 2] in memory
    e = t.shape[0]
    if role.endswith("_weight"):
        if w13:
            return torch.cat([t.narrow(1, start, share), t.narrow(1, inter + start, share)], 1)
        tiles = t.reshape(e, t.shape[1] // 16, inter // 32, 256)
        return tiles.narrow(2, start // 32, share // 32).reshape(e, t.shape[1], share // 2)
    pairs = t.reshape(e, t.shape[1] // 2, t.shape[2], 2)
    if w13:
        rows = torch.cat([pairs.narrow(2, start, share), pairs.narrow(2, inter + start, share)], 2)
        return rows.reshape(e, t.shape[1], 2 * share)
    g2 = plan.shapes["w2"].group_size
    return pairs.narrow(1, start // (2 * g2), share // (2 * g2)).reshape(e, share // g2, t.shape[2])


def local_choices(topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A rank's share of the router's choices, ids already mapped to its own experts with -1 for
    another rank's. The kernels take every pair as one of their experts and each token's experts
    distinct, so each foreign pair becomes an expert the token did not choose, at weight 0 (where the
    rank holds fewer experts than a token chooses, foreign pairs share one expert at weight 0: the
    plain-torch experts add those up correctly)."""
    ids = topk_ids.long()
    mine = ids >= 0
    weights = torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
    if ids.shape[1] > num_local:
        return weights, ids.clamp(min=0)
    chosen = torch.zeros(ids.shape[0], num_local, dtype=torch.int32, device=ids.device)
    chosen.scatter_add_(1, ids.clamp(min=0), mine.to(torch.int32))
    free = torch.argsort(chosen, dim=1, stable=True)  # the experts a token did not choose come first
    nth_foreign = (torch.cumsum((~mine).to(torch.int64), dim=1) - 1).clamp(min=0)
    return weights, torch.where(mine, ids, free.gather(1, nth_foreign))
