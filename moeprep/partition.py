"""One rank's share of a MoE layer's stored tensors, for engines that spread experts over GPUs.

Expert parallelism gives each rank a contiguous range of whole experts: every stored tensor is
expert-major, so a rank's share is a slice of the first dimension, bytes untouched. Tensor
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
    if tensor.dim() == 0 or tensor.shape[0] != total:
        raise UnsupportedError(f"is {list(tensor.shape)}, not stacked over the layer's {total} experts", tensor=where)
    r = partition.experts(total)
    return tensor[r.start:r.stop]
