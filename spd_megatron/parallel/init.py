"""Start torch.distributed and Megatron's model-parallel groups; the only place groups are made.

Launchers understood: torchrun (RANK/WORLD_SIZE/LOCAL_RANK), OpenMPI (OMPI_COMM_WORLD_*), MPICH /
Intel MPI (PMI_RANK/PMI_SIZE), and a plain single process (world size 1). Under MPI, rank 0's
address and port reach the other ranks through mpi4py when it is installed (set_mpi_master).
"""

from __future__ import annotations

import logging
import os
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from spd_megatron.config import ParallelConfig
from spd_megatron.errors import SPDError
from spd_megatron.parallel.backend import (  # noqa: F401 - pick_backend etc. are used through init
    MIXED_BACKEND,
    backend_for_this_node,
    comm_devices,
    local_world_size,
    pick_backend,
)
from spd_megatron.parallel.cpu_compat import apply_cpu_patches
from spd_megatron.parallel.layout import RankLayout, resolve_layout

log = logging.getLogger(__name__)

_ENV_KEYS = (  # (rank, world size, local rank) per launcher, in order of preference
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | mpi | single


def read_launch_env(environ: Optional[dict] = None) -> LaunchEnv:
    """Rank, world size and local rank from whichever launcher started this process."""
    env = os.environ if environ is None else environ
    for rank_key, size_key, local_key in _ENV_KEYS:
        if rank_key in env and size_key in env:
            launcher = "torchrun" if rank_key == "RANK" else "mpi"
            local = int(env.get(local_key, env[rank_key]))
            return LaunchEnv(int(env[rank_key]), int(env[size_key]), local, launcher)
    return LaunchEnv(0, 1, 0, "single")


@dataclass
class ParallelContext:
    """Everything a rank needs to know about the process grid; passed down instead of globals."""

    rank: int
    world_size: int
    local_rank: int
    layout: RankLayout
    device: torch.device
    pp_group: object
    tp_group: object
    timeout_s: float
    draft_rank: Optional[int] = None  # a dedicated draft rank after the TP x PP model ranks
    draft_groups: Optional[object] = None  # megatron ProcessGroupCollection of the draft rank alone
    comm_device: torch.device = torch.device("cpu")  # where p2p messages live: GPU (NCCL) or CPU (gloo)
    control_group: Optional[object] = None  # gloo group of every rank for message headers, or None
    reverse_group: Optional[object] = None  # every rank: messages to lower ranks (link.py), or None
    cpu_peers: frozenset = frozenset()  # ranks whose messages to/from this rank live in host memory

    def claim_control_group(self):
        """The header group for this rank's one StageLink; None to any later caller.

        A link keeps header receives posted on it, so a second link on the same group could lose
        messages to the first one's; later links post on demand instead.
        """
        group, self.control_group = self.control_group, None
        return group

    @property
    def is_draft_rank(self) -> bool:
        return self.draft_rank is not None and self.rank == self.draft_rank

    @property
    def pp_rank(self) -> int:
        return self.layout.pp_rank(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank(self.rank)

    @property
    def pp_size(self) -> int:
        return self.layout.pipeline_parallel_size

    @property
    def tp_size(self) -> int:
        return self.layout.tensor_parallel_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of the given stage in this rank's TP slot (p2p always pairs TP slots)."""
        return self.layout.rank_of(pp_rank % self.pp_size, self.tp_rank)


_JOB_ID_KEYS = ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_JOBID", "SLURM_JOB_ID")


def mpi_master_port(environ: Optional[dict] = None) -> int:
    """MASTER_PORT for an MPI launch without mpi4py that did not set one: derived from the job id.

    Every rank of a job computes the same port (without mpi4py no communication is possible before
    the process group exists) and two jobs on one node get different ones. Pin it with
    ``-x MASTER_PORT=...`` when a port is known to be free.
    """
    env = os.environ if environ is None else environ
    for key in _JOB_ID_KEYS:
        if env.get(key):
            return 20000 + zlib.crc32(env[key].encode()) % 20000
    return 29500


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def mpi_spans_nodes(environ: Optional[dict] = None) -> bool:
    """True when the MPI launcher says this node holds fewer ranks than the job (False if unsaid)."""
    env = os.environ if environ is None else environ
    return 0 < local_world_size(env) < read_launch_env(env).world_size


def route_address(peer_host: str) -> Optional[str]:
    """This host's address on the route to ``peer_host`` (a UDP connect sends nothing); None if unknown."""
    try:
        peer = socket.gethostbyname(peer_host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((peer, 9))
            addr = sock.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def master_address(hostnames: list, route=route_address) -> str:
    """Where the other ranks reach rank 0 (``hostnames[0]``), given every rank's hostname.

    127.0.0.1 when every rank shares rank 0's host. Across hosts: rank 0's address on the route to
    the first rank on another host, else the address rank 0's name resolves to (when not loopback),
    else rank 0's name for the other hosts to resolve.
    """
    own = hostnames[0]
    peers = [host for host in hostnames if host != own]
    if not peers:
        return "127.0.0.1"
    addr = route(peers[0])
    if addr:
        return addr
    try:
        addr = socket.gethostbyname(own)
    except OSError:
        return own
    return own if addr.startswith("127.") else addr


def mpi_rendezvous(comm, master_port: Optional[str] = None) -> tuple:
    """(MASTER_ADDR, MASTER_PORT) chosen on rank 0 and broadcast over an mpi4py communicator.

    Rank 0's address from every rank's hostname (master_address) and ``master_port`` when given,
    else a port free on rank 0. Collective: every rank of ``comm`` calls it.
    """
    hostnames = comm.allgather(socket.gethostname())
    choice = None
    if comm.Get_rank() == 0:
        try:
            choice = (master_address(hostnames), int(master_port) if master_port else _free_port(""))
        except (OSError, ValueError) as err:  # sent to every rank: none is left waiting in bcast
            choice = f"MPI rendezvous: rank 0 could not pick MASTER_ADDR/MASTER_PORT: {err}"
    choice = comm.bcast(choice, root=0)
    if isinstance(choice, str):
        raise SPDError(choice)
    return choice


def _mpi4py_world(env: LaunchEnv):
    """mpi4py's COMM_WORLD when mpi4py imports and agrees with the launcher's ranks; else None."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    except RuntimeError as err:  # installed, but no MPI library it can load
        log.warning("mpi4py is installed but cannot load an MPI library (%s): not using it to find "
                    "rank 0", str(err).splitlines()[0] if str(err) else "")
        return None
    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (env.rank, env.world_size):
        log.warning("mpi4py sees rank %d of %d but the launcher says %d of %d (an MPI library other "
                    "than the launcher's?): not using it to find rank 0", comm.Get_rank(),
                    comm.Get_size(), env.rank, env.world_size)
        return None
    return comm


def set_mpi_master(env: LaunchEnv, environ: Optional[dict] = None, world=_mpi4py_world) -> None:
    """Fill MASTER_ADDR / MASTER_PORT for an MPI launch.

    ``-x MASTER_ADDR=...`` given: kept, MASTER_PORT defaults to mpi_master_port. Otherwise with
    mpi4py: rank 0's address and a port free there (or the given MASTER_PORT), broadcast over MPI,
    so multi-node jobs need no -x. Without mpi4py: 127.0.0.1 and mpi_master_port, one node only.

    Raises:
        SPDError: the job spans nodes, and neither MASTER_ADDR nor mpi4py is there.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("MASTER_ADDR"):
        comm = world(env)
        if comm is not None:
            addr, port = mpi_rendezvous(comm, environ.get("MASTER_PORT"))
            environ["MASTER_ADDR"], environ["MASTER_PORT"] = addr, str(port)
            log.debug("MPI rendezvous through mpi4py: %s:%s", addr, port)
            return
        if mpi_spans_nodes(environ):
            raise SPDError(f"mpirun across nodes ({local_world_size(environ)} of {env.world_size} ranks "
                           "on this node) cannot find rank 0 without mpi4py: install the mpi extra "
                           "(pip install -e '.[mpi]') or pass -x MASTER_ADDR=<rank 0's host>")
        environ["MASTER_ADDR"] = "127.0.0.1"
    if not environ.get("MASTER_PORT"):
        environ["MASTER_PORT"] = str(mpi_master_port(environ))


def start_process_group(cfg: ParallelConfig, extra_ranks: int = 0) -> LaunchEnv:
    """Initialise the default process group from the launcher's environment (idempotent)."""
    env = read_launch_env()
    if dist.is_initialized():
        return LaunchEnv(dist.get_rank(), dist.get_world_size(), env.local_rank, env.launcher)
    if env.launcher == "mpi":
        set_mpi_master(env)
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()) if env.launcher == "single" else "29500")
    backend = backend_for_this_node(cfg.backend, extra_ranks)
    if torch.cuda.is_available():  # one GPU per local rank; several ranks may share one (gloo)
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size,
        timeout=timedelta(seconds=cfg.setup_timeout_s),
    )
    return env


def init_parallel(cfg: ParallelConfig, extra_ranks: int = 0) -> ParallelContext:
    """Start the process group and Megatron's TP x PP groups for this run.

    Args:
        extra_ranks: processes after the TP x PP model ranks (1 for a dedicated draft rank);
            they join the default group but none of Megatron's model-parallel groups.

    Raises:
        SPDError: the launched world size does not match TP x PP (+ extra ranks).
    """
    apply_cpu_patches()
    try:  # before any group exists: every rank fails alone, at once, with this line
        layout = resolve_layout(read_launch_env().world_size - extra_ranks, cfg.tensor_parallel_size,
                                cfg.pipeline_parallel_size)
    except SPDError as err:
        if not extra_ranks:
            raise
        raise SPDError(f"{err} (plus {extra_ranks} dedicated draft rank: launch one more process)") from None
    env = start_process_group(cfg, extra_ranks)
    from spd_megatron.parallel.threads import apply_threads

    apply_threads(cfg.threads_per_rank, local_world_size())  # parallel.threads_per_rank
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _initialize_megatron_groups(layout)
    draft_groups = _draft_rank_groups(layout.world_size) if extra_ranks else None
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    is_model_rank = env.rank < layout.world_size
    draft_rank = layout.world_size if extra_ranks else None
    comm_device, cpu_peers = comm_devices(str(dist.get_backend()), device, not is_model_rank, draft_rank)
    control = _control_group(cfg) if cfg.prepost_receives and env.world_size > 1 else None
    reverse = _reverse_group(cfg) if env.world_size > 1 else None
    return ParallelContext(
        rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, layout=layout,
        device=device,
        pp_group=parallel_state.get_pipeline_model_parallel_group() if is_model_rank else None,
        tp_group=parallel_state.get_tensor_model_parallel_group() if is_model_rank else None,
        timeout_s=cfg.timeout_s, draft_rank=draft_rank,
        draft_groups=draft_groups if env.rank == layout.world_size else None,
        comm_device=comm_device, control_group=control, reverse_group=reverse, cpu_peers=cpu_peers,
    )


def _control_group(cfg: ParallelConfig):
    """A gloo group of every rank that carries only message headers (parallel/link.py).

    Headers on a channel of their own can have their receives posted ahead of time: nothing else
    travels on it, so a posted header receive can never match a payload. Gloo keeps them in host
    memory, so reading one never synchronises a GPU stream.
    """
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.setup_timeout_s))


def _reverse_group(cfg: ParallelConfig):
    """Every rank, the default backend: messages from higher to lower ranks (parallel/link.py).

    With NCCL each rank pair gets a communicator (and stream) per group, so each direction of a
    pair has its own in-order stream and a send can never wait behind a send the other way.
    """
    return dist.new_group(timeout=timedelta(seconds=cfg.setup_timeout_s))


def _draft_rank_groups(draft_rank: int):
    """Single-rank groups for the dedicated draft rank's TP=1 megatron layers (made on every rank)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    solo = dist.new_group([draft_rank])
    groups = ProcessGroupCollection()
    for name in ("tp", "pp", "mp", "embd", "pos_embd", "cp", "tp_cp", "dp", "dp_cp"):
        setattr(groups, name, solo)
    return groups


def _initialize_megatron_groups(layout: RankLayout) -> None:
    """Megatron's TP x PP groups over the first TP x PP ranks, on every rank.

    Megatron sizes its grid by the default group's world size; with a dedicated draft rank the
    world is one larger, so it is told the model size while every rank (the draft rank too) makes
    the same new_group calls, as torch requires. The draft rank ends up in none of the groups.
    """
    from megatron.core import parallel_state

    real_world_size = dist.get_world_size
    dist.get_world_size = lambda group=None: layout.world_size if group is None else real_world_size(group)
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel_size,
            pipeline_model_parallel_size=layout.pipeline_parallel_size,
            create_gloo_process_groups=False,
        )
    finally:
        dist.get_world_size = real_world_size


def shutdown_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
