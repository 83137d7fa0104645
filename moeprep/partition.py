"""One rank's share of a MoE layer's stored tensors, for engines that spread experts over GPUs.

Expert parallelism gives each rank a contiguous range of whole experts: where a target stores
every tensor expert-major, a rank's share is a slice of the first dimension, bytes untouched
(``mxfp4_preshuffle`` shuffles all experts' scales as one matrix: refused). Tensor
parallelism would cut inside the preshuffled tiles of every expert; it is refused, naming the
sizes that work.
"""
from __future__ import annotations

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


def _check(partition: Partition, where: str) -> None:
    if partition.tp_size > 1 and not partition.use_ep:
        raise UnsupportedError(
            f"tensor parallelism ({partition.tp_size} ranks) would cut the preshuffled expert tiles; moeprep's "
            f"experts serve with tensor-parallel size 1, or with expert parallelism (--enable-expert-parallel) "
            f"at any size", tensor=where)


def local_plan(plan: LayerPlan, partition: Partition, where: str) -> LayerPlan:
    """The plan of this rank's experts."""
    _check(partition, where)
    n = len(partition.experts(plan.shapes["w13"].experts))
    return replace(plan, shapes={proj: replace(s, experts=n) for proj, s in plan.shapes.items()})


def slice_stored(tensor: torch.Tensor, plan: LayerPlan, partition: Partition, where: str) -> torch.Tensor:
    """This rank's share of one stored (expert-major) tensor: a view, nothing copied."""
    _check(partition, where)
    total = plan.shapes["w13"].experts
    r = partition.experts(total)
    if len(r) == total:
        return tensor
    if tensor.dim() == 0 or tensor.shape[0] != total:
        raise UnsupportedError(f"is {list(tensor.shape)}, one layout over all {total} experts (not one per expert): "
                               f"expert parallelism cannot give a rank its own; serve it on one rank, or convert to a "
                               f"target that stores every tensor per expert", tensor=where)
    return tensor[r.start:r.stop]


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
