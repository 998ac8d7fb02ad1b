"""Run ``fn(rank, world_size, *args)`` on N gloo ranks (fork on CPU), with a hard timeout.

Every rank's traceback is collected and shown sorted by rank, so the root cause is visible even
when the other ranks died of "connection closed". A group that outlives ``timeout_s`` is killed
and the test fails: a distributed test can never hang CI.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

START = os.environ.get("SPD_TEST_START", "fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    # One thread per rank, declared the way torchrun declares it, so parallel.threads_per_rank keeps
    # it: more threads in a forked child of a process that already ran OpenMP work hang (libgomp is not
    # fork-safe). No LOCAL_WORLD_SIZE either: code that widens rank 0's threads by it must not here.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    code = 0
    try:
        fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        errors.put((rank, traceback.format_exc()))
        code = 1
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)  # skip atexit handlers inherited from the pytest parent


def run_distributed(fn, world_size: int, *args, timeout_s: float = 120.0, start: str = "") -> None:
    """Run ``fn`` on ``world_size`` ranks; raise AssertionError with every failing rank's traceback.

    ``start``: the multiprocessing start method (default $SPD_TEST_START or fork); GPU tests use
    spawn, since a forked child cannot use a CUDA context its parent already made.
    """
    ctx = mp.get_context(start or START)
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors, timeout_s))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    if hung:
        reports.append((-1, f"ranks {hung} still running after {timeout_s:.0f} s: killed"))
    failed = [r for r, p in enumerate(procs) if p.exitcode not in (0, None)]
    if reports or failed:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(reports))
        raise AssertionError(f"distributed test failed (exit codes {[p.exitcode for p in procs]}):\n{text}")
