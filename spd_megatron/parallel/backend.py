"""Which torch.distributed backend a rank uses, and where its messages live: pure rules.

No process groups here (parallel/init.py makes them), so every rule is a unit-tested function of
the node's GPUs, its local process count and the placement.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)

_LOCAL_SIZE_KEYS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def local_world_size(environ: Optional[dict] = None) -> int:
    """Processes of this job on this node (0 when the launcher does not say)."""
    env = os.environ if environ is None else environ
    for key in _LOCAL_SIZE_KEYS:
        if key in env:
            return int(env[key])
    return 0


MIXED_BACKEND = "cpu:gloo,cuda:nccl"  # CUDA tensors over NCCL, host tensors over gloo


def pick_backend(requested: str, cuda: bool, gpus: int, local_procs: int, extra_ranks: int = 0) -> str:
    """The torch.distributed backend for ``parallel.backend`` on this node.

    auto: NCCL when every local model process has a GPU of its own; gloo on CPU, and when model
    processes share GPUs (NCCL refuses two ranks on one GPU; gloo stages tensors through host
    memory). With a dedicated draft rank (``extra_ranks``) the default group is ``cpu:gloo,cuda:nccl``
    on every node: model ranks keep NCCL among themselves (TP collectives, ring), and every message
    to or from the draft rank lives in host memory (gloo), so the draft rank may share a GPU: on a
    full node (TP x PP + 1 processes on TP x PP GPUs) it runs on GPU ``local_rank % gpus``, stage
    0's GPU on one node. The choice depends on the placement, never on which node asks, so every
    node agrees.
    """
    model_procs = max(local_procs - extra_ranks, 0)  # 0: the launcher did not say
    if requested == "auto":
        if not cuda:
            return "gloo"
        if model_procs > gpus:
            log.warning("%d model processes share %d GPU(s): NCCL needs one GPU per rank, using gloo",
                        model_procs, gpus)
            return "gloo"
        return MIXED_BACKEND if extra_ranks else "nccl"
    if requested == "nccl" and not cuda:
        raise SPDError("parallel.backend=nccl needs CUDA GPUs; use parallel.backend=gloo (or auto) on CPU")
    if requested == "nccl" and model_procs > gpus:
        raise SPDError(f"parallel.backend=nccl needs one GPU per model process, but {model_procs} model "
                       f"processes share {gpus} GPU(s) on this node; use parallel.backend=gloo (or auto)")
    return MIXED_BACKEND if requested == "nccl" and extra_ranks else requested


def comm_devices(backend: str, device: torch.device, is_draft_rank: bool,
                 draft_rank: Optional[int]) -> tuple[torch.device, frozenset]:
    """(where this rank's p2p messages live, the peers whose messages live in host memory).

    NCCL moves device tensors only: messages live on the GPU under an NCCL backend, else on the CPU.
    Under the mixed backend the dedicated draft rank talks to everyone through host memory.
    """
    if "nccl" not in backend or is_draft_rank:
        return torch.device("cpu"), frozenset()
    return device, frozenset() if draft_rank is None or backend == "nccl" else frozenset({draft_rank})


def backend_for_this_node(requested: str, extra_ranks: int) -> str:
    """``pick_backend`` with this node's CUDA devices and local process count."""
    cuda = torch.cuda.is_available()
    return pick_backend(requested, cuda, torch.cuda.device_count() if cuda else 0, local_world_size(),
                        extra_ranks)
