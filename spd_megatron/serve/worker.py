"""Rank 0's decode thread: a FIFO of jobs in front of the pipeline, one sequence at a time.

The HTTP handlers (on the event loop) submit Jobs; this thread sends each job's request to every
other rank, runs ``schedule.generate`` with a callback that hands each committed token to the
job's asyncio queue, and sends IDLE heartbeats while there is nothing to do. A job is cancelled
(client gone, stop string seen, timeout, shutdown) at the next cycle on every rank through
``generate(should_stop=...)``. Any failure of the pipeline (a rank died, a protocol error) is
fatal: every job gets a 503 with the cause and the server is told to exit non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from spd_megatron.parallel.link import Op, report_failure
from spd_megatron.serve import wire

log = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"
SHUTDOWN_GRACE_S = 10.0  # after SIGTERM the running sequence may finish for this long, then is cancelled


class QueueFull(Exception):
    """No room for another waiting request (answered 429)."""


@dataclass
class Job:
    """One request's way through the queue and the pipeline.

    Events posted to ``events`` (on the job's event loop): ("tokens", [ids]), ("done",
    GenerationResult), ("error", status, message).
    """

    req: wire.DecodeRequest
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is cancelled
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    started: float = 0.0  # when its prefill began
    first_token: float = 0.0  # when its first token was committed
    cancel_reason: str = ""  # client | stop | timeout | shutdown (the first one wins)
    sent: int = 0  # tokens handed to the event loop so far

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def cancel(self, reason: str) -> None:
        self.cancel_reason = self.cancel_reason or reason

    def should_stop(self) -> bool:
        if not self.cancel_reason and time.monotonic() > self.deadline:
            self.cancel("timeout")
        return bool(self.cancel_reason)

    def on_token(self, new_ids: list[int]) -> None:
        """The schedule's streaming callback (decode thread): pass on the tokens not yet sent."""
        if not self.first_token:
            self.first_token = time.monotonic()
        fresh = list(new_ids[self.sent:])
        self.sent = len(new_ids)
        if fresh:
            self.post("tokens", fresh)


class DecodeWorker:
    """The decode thread of rank 0 and the queue in front of it.

    Args:
        engine: rank 0's Engine.
        link: a StageLink that reaches every other rank (None in a one-process server).
        ranks: every other global rank (each gets every request).
        max_queue: waiting requests allowed behind the running one.
        heartbeat_s: IDLE interval while there is no work.
        observe: ``observe(job, result)`` after each finished sequence (metrics).
        cancellable: False with TP > 1 (stage 0's TP peers cannot see a cancel): sequences then
            run to their end and only the text is cut.
    """

    def __init__(self, engine, link, ranks: list[int], max_queue: int, heartbeat_s: float,
                 observe: Callable = lambda job, result: None, cancellable: bool = True) -> None:
        self.engine, self.link, self.ranks = engine, link, list(ranks)
        self.max_queue, self.heartbeat_s = max_queue, heartbeat_s
        self.observe, self.cancellable = observe, cancellable
        self.failure: Optional[str] = None  # set once the pipeline is broken
        self.on_failure: Callable[[], None] = lambda: None
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self.running: Optional[Job] = None
        self._stopping = False
        self._shutdown_at = 0.0
        self._dropped: list[Job] = []  # waiting at SIGTERM behind a running job: answered when it ends
        self.thread = threading.Thread(target=self._main, name="spd-decode", daemon=True)

    # ---- event-loop side --------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        return self.failure is None and not self._stopping

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when ``max_queue`` jobs already wait behind a running one."""
        with self._cond:
            if not self.accepting:
                raise RuntimeError(self.failure or SHUTTING_DOWN)
            if len(self._waiting) + (self.running is not None) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (serve.max_queue="
                                f"{self.max_queue}); retry later")
            self._waiting.append(job)
            self._cond.notify()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new jobs, let the running one finish (grace), answer waiting ones 503.

        Waiting jobs are answered at once when nothing runs; behind a running job they are answered
        when it ends, so that a SIGTERM which only follows a rank's death (torchrun stops the other
        ranks) reports the pipeline failure the running job meets, not a plain shutdown.
        """
        with self._cond:
            if self._stopping:
                return
            self._stopping, self._shutdown_at = True, time.monotonic()
            dropped, self._waiting = list(self._waiting), deque()
            if self.running is not None:
                self._dropped, dropped = dropped, []
            self._cond.notify()
        _refuse(dropped, SHUTTING_DOWN)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.begin_shutdown()
        self.thread.join(timeout)

    # ---- decode thread ----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job is not None:
                    self._serve(job)
                    continue
                if self.link is not None:  # nothing to do: a heartbeat, or the end
                    wire.send_all(self.link, self.ranks, Op.SHUTDOWN if self._stopping else Op.IDLE)
                if self._stopping:
                    return
        except BaseException as err:  # noqa: BLE001 - the pipeline is broken: tell everyone
            self._fail(err)

    def _next_job(self) -> Optional[Job]:
        with self._cond:
            if not self._waiting and not self._stopping:
                self._cond.wait(self.heartbeat_s)
            if not self._waiting:
                return None
            self.running = self._waiting.popleft()
            return self.running

    def _serve(self, job: Job) -> None:
        """Run one job (a failure leaves it in ``running`` for ``_fail`` to answer)."""
        if job.should_stop():  # gone or timed out while waiting: it never reaches the pipeline
            job.post("error", 504 if job.cancel_reason == "timeout" else 499, "cancelled before it started")
        else:
            job.started = time.monotonic()
            if self.link is not None:
                wire.send_request(self.link, self.ranks, job.req)
            stop = self._stop_check(job) if self.cancellable else None
            result = wire.run(self.engine, job.req, on_token=job.on_token, should_stop=stop)
            job.post("done", result)
            self.observe(job, result)
        self._finish_running()

    def _finish_running(self) -> None:
        """The running job ended well: answer the jobs a shutdown dropped behind it."""
        with self._cond:
            self.running = None
            dropped, self._dropped = self._dropped, []
        _refuse(dropped, SHUTTING_DOWN)

    def _stop_check(self, job: Job) -> Callable[[], bool]:
        def should_stop() -> bool:
            if self._stopping and time.monotonic() - self._shutdown_at > SHUTDOWN_GRACE_S:
                job.cancel("shutdown")
            return job.should_stop()

        return should_stop

    def _fail(self, err: BaseException) -> None:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.error("the pipeline failed: %s", message)
        report_failure(0, message)
        with self._cond:
            self.failure = f"the decode pipeline failed: {message}"
            jobs = ([self.running] if self.running else []) + self._dropped + list(self._waiting)
            self._waiting.clear()
            self._dropped = []
        _refuse(jobs, self.failure)
        self.on_failure()


def _refuse(jobs: list[Job], message: str) -> None:
    """Answer jobs that will not run (or not finish) 503 with ``message``."""
    for job in jobs:
        job.post("error", 503, message)
