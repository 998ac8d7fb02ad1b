"""How many intra-op CPU threads each rank uses (``parallel.threads_per_rank``).

Measured on 2 cores (docs/benchmarks.md, issue 13): with one process, a second thread speeds up
fp32 decode on some machines (Intel: HF 1.49x) and not on others (AMD EPYC: neither stack gains);
with one process per core, a second thread per process only oversubscribes. The rule is therefore
"the node's cores, shared evenly by its ranks": torchrun's default for several processes
(OMP_NUM_THREADS=1 on a 2-core node with 2 ranks) and torch's for one (all cores). The eval
baselines follow it: a one-process baseline gets the main run's total (ranks x threads per rank).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Optional

import torch

log = logging.getLogger(__name__)


def threads_per_rank(requested: int, local_procs: int, cores: int, environ: Mapping[str, str]) -> Optional[int]:
    """The thread count to set, or None to keep the launcher's OMP_NUM_THREADS.

    Args:
        requested: parallel.threads_per_rank (0 = the rule).
        local_procs: processes of this job on this node (0 = unknown: 1).
        cores: CPU cores of the node.
        environ: the environment (an explicit OMP_NUM_THREADS is kept under the rule).
    """
    if requested > 0:
        return requested
    if "OMP_NUM_THREADS" in environ:
        return None
    return max(1, cores // max(local_procs, 1))


def apply_threads(requested: int, local_procs: int) -> int:
    """Set torch's intra-op threads for this rank (see ``threads_per_rank``); returns the count."""
    count = threads_per_rank(requested, local_procs, os.cpu_count() or 1, os.environ)
    if count is not None and count != torch.get_num_threads():
        torch.set_num_threads(count)
    log.debug("%d intra-op threads on this rank", torch.get_num_threads())
    return torch.get_num_threads()
