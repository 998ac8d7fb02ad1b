"""Data-parallel process groups for draft training: the world is DP replicas of one TP x PP teacher.

``init_data_parallel`` starts the default group from the launcher (torchrun, MPI, or one plain
process) and Megatron's groups with the world split into ``world / (TP x PP)`` replicas; the
returned context describes this rank *inside its replica* (what ``engine.build_stage`` needs) and
carries the data-parallel group that gradients are averaged over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd_megatron.config import ParallelConfig
from spd_megatron.errors import SPDError
from spd_megatron.parallel.cpu_compat import apply_cpu_patches
from spd_megatron.parallel.init import ParallelContext, start_process_group
from spd_megatron.parallel.layout import RankLayout


@dataclass
class DataParallel:
    """This rank's place among the replicas, and the group that connects them (None: one replica)."""

    rank: int
    size: int
    group: object
    model_rank: int = 0  # rank inside the replica (TP)

    @property
    def is_main(self) -> bool:
        """The one rank that writes files and prints progress."""
        return self.rank == 0 and self.model_rank == 0


def init_data_parallel(cfg: ParallelConfig) -> tuple[ParallelContext, DataParallel]:
    """Process groups for training: TP x PP inside a replica, DP across replicas.

    Raises:
        SPDError: the world size is not a multiple of TP x PP, or PP > 1 (the teacher runs on one stage).
    """
    apply_cpu_patches()
    env = start_process_group(cfg)
    tp = cfg.tensor_parallel_size
    pp = cfg.pipeline_parallel_size or 1
    if pp != 1:
        raise SPDError(f"draft training runs the teacher on one pipeline stage; set "
                       f"parallel.pipeline_parallel_size=1 (got {pp})")
    if env.world_size % (tp * pp):
        raise SPDError(f"{env.world_size} processes cannot form replicas of tensor_parallel_size={tp}; "
                       f"launch a multiple of {tp} processes (torchrun --nproc-per-node)")
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             create_gloo_process_groups=False)
    layout = RankLayout(tp, pp)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    ctx = ParallelContext(
        rank=env.rank % layout.world_size, world_size=layout.world_size, local_rank=env.local_rank,
        layout=layout, device=device, pp_group=parallel_state.get_pipeline_model_parallel_group(),
        tp_group=parallel_state.get_tensor_model_parallel_group(), timeout_s=cfg.timeout_s,
        comm_device=device if torch.distributed.get_backend() == "nccl" else torch.device("cpu"),
    )
    size = env.world_size // layout.world_size
    group = parallel_state.get_data_parallel_group() if size > 1 else None
    return ctx, DataParallel(env.rank // layout.world_size, size, group, ctx.rank)
