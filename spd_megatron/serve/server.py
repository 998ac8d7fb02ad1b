"""Start every rank of the server: build the engine once, then serve (rank 0) or follow (others)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import traceback
from typing import Optional, Sequence

from spd_megatron.config import SPDConfig, load_config
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


def follow(engine, link, flag: _SignalFlag) -> int:
    """Ranks other than 0: decode rank 0's requests until SHUTDOWN (0), or give up after a
    SIGTERM that rank 0 did not follow with SHUTDOWN within the receive timeout (1)."""
    from spd_megatron.serve.wire import follow_rank0

    grace = engine.cfg.parallel.timeout_s
    outcome = follow_rank0(engine, link, lambda: bool(flag.at) and time.monotonic() - flag.at > grace)
    return 0 if outcome is None else 1


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


def serve_rank0(cfg: SPDConfig, engine, link) -> int:
    """Rank 0: the decode thread and the HTTP server; returns the exit code."""
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
        print(f"error: {worker.failure}", file=sys.stderr, flush=True)
        return 1
    print("spd_megatron.serve: shut down cleanly", file=sys.stderr, flush=True)
    return 0


def run_server(cfg: SPDConfig) -> int:
    """Build this rank's engine, wait until every rank is ready, then serve or follow."""
    from spd_megatron.engine import build_engine
    from spd_megatron.parallel.link import gather_to_rank0

    flag = _SignalFlag().install()  # rank 0 replaces it once its server exists
    check_serve_extra()
    engine = build_engine(cfg)
    link = serving_link(engine)
    gather_to_rank0(True)  # one-off: every rank has loaded its part
    if engine.ctx.rank == 0:
        return serve_rank0(cfg, engine, link)
    return follow(engine, link, flag)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``[--config NAME|PATH] [key=value ...]``; exit 0, 2 (bad input) or 1 (a rank failed)."""
    import argparse

    from spd_megatron.parallel.init import read_launch_env, shutdown_parallel
    from spd_megatron.parallel.link import report_failure

    parser = argparse.ArgumentParser(prog="python -m spd_megatron.serve",
                                     description="OpenAI-compatible server; see README.md (Serving).")
    parser.add_argument("--config", default="default", help="preset name (spd_megatron/configs) or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rank = read_launch_env().rank
    code = 0
    try:
        code = run_server(load_config(args.config, args.overrides))
    except SPDError as err:
        report_failure(rank, str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception as err:  # noqa: BLE001 - a bug: show it, and tell the other ranks
        report_failure(rank, f"{type(err).__name__}: {err}")
        traceback.print_exc()
        code = 1
    finally:
        if code == 0:
            shutdown_parallel()  # after a failure a peer may be gone: do not wait on it
    return code
