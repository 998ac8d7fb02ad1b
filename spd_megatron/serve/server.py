"""Start every rank of the server: build the engine once, then serve (rank 0) or follow (others)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Optional, Sequence

from spd_megatron.config import SPDConfig
from spd_megatron.errors import SPDError

log = logging.getLogger(__name__)


class _SignalFlag:
    """SIGTERM / SIGINT on a rank: remember when, and call ``then`` (rank 0: begin shutdown)."""

    def __init__(self, then=lambda: None) -> None:
        self.at, self.then = 0.0, then

    def __call__(self, signum, frame) -> None:
        self.at = self.at or time.monotonic()
        self.then()

    def install(self) -> "_SignalFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)
        return self


def check_serve_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise SPDError(f"the server needs the serve extra ({err.name} is missing): "
                       "pip install -e '.[serve]'") from None


def serving_link(engine):
    """A StageLink from rank 0 to every other rank: the schedule's, or one made here (PP = 1)."""
    from spd_megatron.parallel.link import StageLink
    from spd_megatron.target.build import TORCH_DTYPES

    ctx = engine.ctx
    if ctx.world_size == 1:
        return None
    if engine.schedule.link is not None:
        return engine.schedule.link
    return StageLink(ctx.rank, None, None, 0, 0, engine.arch.hidden_size, TORCH_DTYPES[engine.cfg.model.dtype],
                     engine.cfg.parallel.timeout_s, [0], device=ctx.comm_device,
                     control_group=ctx.claim_control_group())


def follow(engine, link, flag: _SignalFlag) -> None:
    """Ranks other than 0: decode rank 0's requests until SHUTDOWN; SPDError after a SIGTERM that
    rank 0 did not follow with SHUTDOWN within the receive timeout."""
    from spd_megatron.serve.wire import follow_rank0

    grace = engine.cfg.parallel.timeout_s
    if follow_rank0(engine, link, lambda: bool(flag.at) and time.monotonic() - flag.at > grace):
        raise SPDError(f"rank {engine.ctx.rank}: SIGTERM, and rank 0 sent no SHUTDOWN within "
                       f"parallel.timeout_s={grace:g} s; leaving without it")


class _Server:
    """uvicorn without its own signal handling (ours starts the worker's shutdown too)."""

    @staticmethod
    def make(app, cfg: SPDConfig):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        config = uvicorn.Config(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning",
                                lifespan="off", timeout_graceful_shutdown=30)
        return Server(config)


def serve_rank0(cfg: SPDConfig, engine, link) -> None:
    """Rank 0: the decode thread and the HTTP server until SIGTERM/SIGINT or a failure (SPDError)."""
    from spd_megatron.serve.app import ServeState, build_app
    from spd_megatron.serve.prom import ServeMetrics
    from spd_megatron.serve.wire import heartbeat_seconds
    from spd_megatron.serve.worker import DecodeWorker

    ctx = engine.ctx
    model = cfg.serve.model_name or engine.checkpoint.name
    metrics = ServeMetrics(model, ctx.pp_size if engine.schedule.has_draft else 1)
    worker = DecodeWorker(engine, link, list(range(1, ctx.world_size)), cfg.serve.max_queue,
                          heartbeat_seconds(cfg.parallel.timeout_s), metrics.observe_result,
                          cancellable=ctx.tp_size == 1)
    server = _Server.make(build_app(ServeState(cfg, engine, worker, metrics, model)), cfg)
    worker.on_failure = lambda: setattr(server, "should_exit", True)

    def stop() -> None:
        worker.begin_shutdown()
        server.should_exit = True

    _SignalFlag(stop).install()
    worker.start()
    print(f"spd_megatron.serve: {model} ({cfg.schedule.name}, TP={ctx.tp_size} PP={ctx.pp_size}) on "
          f"http://{cfg.serve.host}:{cfg.serve.port}/v1", file=sys.stderr, flush=True)
    try:
        asyncio.run(server.serve())
    except SystemExit:  # uvicorn exits when it cannot bind
        worker.join(cfg.parallel.timeout_s)
        raise SPDError(f"cannot listen on {cfg.serve.host}:{cfg.serve.port}; pick another serve.port") from None
    worker.join(cfg.parallel.timeout_s + 2 * worker.heartbeat_s)
    if worker.failure:
        raise SPDError(worker.failure)
    print("spd_megatron.serve: shut down cleanly", file=sys.stderr, flush=True)


def run_server(cfg: SPDConfig) -> None:
    """Build this rank's engine, wait until every rank is ready, then serve or follow.

    Raises:
        SPDError: bad input, or the pipeline failed (a rank died) while serving.
    """
    from spd_megatron.engine import build_engine
    from spd_megatron.parallel.link import gather_to_rank0

    flag = _SignalFlag().install()  # rank 0 replaces it once its server exists
    check_serve_extra()
    engine = build_engine(cfg)
    link = serving_link(engine)
    gather_to_rank0(True)  # one-off: every rank has loaded its part
    if engine.ctx.rank == 0:
        serve_rank0(cfg, engine, link)
    else:
        follow(engine, link, flag)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``[--config NAME|PATH] [--verbose] [key=value ...]``; exit 0, 2 (bad input, or a rank
    failed: the error line names it, as examples/decode.py does) or 1 (a bug)."""
    from spd_megatron.runner import main as run_main

    return run_main(argv, job=run_server, prog="python -m spd_megatron.serve")
