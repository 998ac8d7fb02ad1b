"""Pure rank and layer arithmetic: which rank is which stage, which layers each stage owns.

No torch.distributed here, so every rule is unit-tested without processes. Megatron's rank order
is used (TP fastest): global rank = pp_rank * tp_size + tp_rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from spd_megatron.errors import SPDError


@dataclass(frozen=True)
class RankLayout:
    """The TP x PP grid of model ranks."""

    tensor_parallel_size: int
    pipeline_parallel_size: int

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise SPDError(
                f"parallel sizes must be >= 1, got tensor_parallel_size={self.tensor_parallel_size} "
                f"pipeline_parallel_size={self.pipeline_parallel_size}"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def pp_rank(self, rank: int) -> int:
        return rank // self.tensor_parallel_size

    def tp_rank(self, rank: int) -> int:
        return rank % self.tensor_parallel_size

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tensor_parallel_size + tp_rank


def resolve_layout(world_size: int, tp_size: int, pp_size: int) -> RankLayout:
    """Fill in PP from the world size (pp_size=0 means world / TP) and check that they agree.

    Raises:
        SPDError: TP x PP does not equal the number of launched processes.
    """
    if tp_size < 1:
        raise SPDError(f"parallel.tensor_parallel_size must be >= 1, got {tp_size}")
    if pp_size == 0:
        if world_size % tp_size:
            raise SPDError(
                f"{world_size} processes cannot be split into tensor_parallel_size={tp_size} groups; "
                f"launch a multiple of {tp_size} processes (torchrun --nproc-per-node)"
            )
        pp_size = world_size // tp_size
    layout = RankLayout(tp_size, pp_size)
    if layout.world_size != world_size:
        raise SPDError(
            f"parallel.tensor_parallel_size={tp_size} x parallel.pipeline_parallel_size={pp_size} "
            f"needs {layout.world_size} processes but {world_size} were launched; "
            f"use torchrun --nproc-per-node {layout.world_size} or change the parallel sizes"
        )
    return layout


def split_layers(
    num_layers: int, num_stages: int, explicit: Optional[Sequence[int]] = None
) -> list[int]:
    """Layers per pipeline stage: given explicitly, or balanced (earlier stages get the extra ones).

    Raises:
        SPDError: more stages than layers, or an explicit split that does not add up.
    """
    if num_stages > num_layers:
        raise SPDError(
            f"pipeline_parallel_size={num_stages} is larger than the model's {num_layers} layers; "
            f"use at most {num_layers} pipeline stages"
        )
    if explicit:
        split = [int(k) for k in explicit]
        if len(split) != num_stages or sum(split) != num_layers or min(split) < 1:
            raise SPDError(
                f"parallel.layers_per_stage={split} must list {num_stages} positive counts "
                f"summing to {num_layers} (one per pipeline stage)"
            )
        return split
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def layer_ranges(split: Sequence[int]) -> list[tuple[int, int]]:
    """Global [start, end) layer range of each stage, from a per-stage split."""
    ranges, start = [], 0
    for count in split:
        ranges.append((start, start + count))
        start += count
    return ranges
