"""The ASGI app on rank 0: OpenAI endpoints in front of the DecodeWorker.

Handlers never decode: they check the request, queue a Job and read its events (committed tokens,
then the result) from an asyncio queue the decode thread fills, so the event loop never waits on
the pipeline and the pipeline never waits on a client.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from spd_megatron.serve import output, protocol
from spd_megatron.serve.protocol import APIError, ChatRequest, CompletionRequest
from spd_megatron.serve.worker import DecodeWorker, Job, QueueFull

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class ServeState:
    """What the handlers share: config, tokenizer, worker, metrics."""

    def __init__(self, cfg, engine, worker: DecodeWorker, metrics, model: str) -> None:
        self.cfg, self.engine, self.worker, self.metrics, self.model = cfg, engine, worker, metrics, model
        self.tokenizer = engine.tokenizer
        self.context = engine.stage.cache.max_seq_len if engine.stage is not None else cfg.model.max_seq_len


def build_app(state: ServeState) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics."""
    app = FastAPI(title="spd_megatron", docs_url=None, redoc_url=None, openapi_url=None)

    def error(err: APIError, endpoint: str) -> JSONResponse:
        state.metrics.count_response(endpoint, err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        message, param = protocol.validation_message(exc.errors())
        return error(APIError(400, message, param), request.url.path)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error(exc, request.url.path)

    async def authorize(request: Request) -> None:
        key = state.cfg.serve.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <serve.api_key>'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if state.worker.failure:
            return JSONResponse({"status": "failed", "error": state.worker.failure}, status_code=503)
        if not state.worker.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}  # the HTTP server starts only once every rank is ready

    @app.get("/metrics")
    async def metrics():
        running = int(state.worker.running is not None)
        return PlainTextResponse(state.metrics.render(running, state.worker.waiting),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        card = {"id": state.model, "object": "model", "created": 0, "owned_by": "spd_megatron",
                "max_model_len": state.context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request):
        return await complete(state, body, request, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        return await complete(state, body, request, chat=False)

    return app


async def complete(state: ServeState, body, request: Request, chat: bool):
    """Check, queue, and answer one completion request (streamed or not)."""
    endpoint = request.url.path
    if body.model != state.model:
        raise APIError(404, f"model '{body.model}' does not exist; this server serves '{state.model}'",
                       "model", "model_not_found")
    cfg = state.cfg
    req = protocol.decode_request(body, state.tokenizer, cfg.sampling, state.context, cfg.max_new_tokens)
    job = Job(req, asyncio.get_running_loop(), time.monotonic() + cfg.serve.request_timeout_s)
    try:
        state.worker.submit(job)
    except QueueFull as err:
        raise APIError(429, str(err), kind="rate_limit_error", code="queue_full") from None
    except RuntimeError as err:
        raise protocol.unavailable(str(err)) from None
    out = output.OutputText(state.tokenizer, protocol.stop_strings(body))
    responder = output.Responder(chat, state.model)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        state.metrics.count_response(endpoint, 200)
        return StreamingResponse(stream_events(state, job, out, responder, include_usage),
                                 media_type="text/event-stream")
    answer = await collect(state, job, out, responder, request)
    state.metrics.count_response(endpoint, 200)
    return answer


async def next_event(job: Job, request: Optional[Request] = None) -> tuple:
    """The job's next event; a request still waiting in the queue at its deadline gets a 504
    event here (the decode thread would see it only when its turn comes), and a non-streamed
    request whose client left is cancelled (a stream notices that by itself)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if not job.started and time.monotonic() > job.deadline:
                job.cancel("timeout")
                return ("error", 504, "the request waited in the queue beyond serve.request_timeout_s")
            if request is not None and await request.is_disconnected():
                job.cancel("client")
                raise APIError(499, "client closed the request") from None


async def collect(state: ServeState, job: Job, out: output.OutputText, responder, request: Request) -> dict:
    """A non-streamed answer: wait for the result, cancel the sequence if the client leaves."""
    while True:
        event = await next_event(job, request)
        if event[0] == "tokens":
            out.add(event[1])
            if out.stopped:
                job.cancel("stop")
        elif event[0] == "error":
            raise APIError(event[1], event[2], kind="server_error" if event[1] >= 500 else "invalid_request_error")
        else:
            return finished(state, job, out, responder, event[1])


def finished(state: ServeState, job: Job, out: output.OutputText, responder, result) -> dict:
    """The full answer once the sequence ended (504 when it was cut by the request timeout)."""
    if job.cancel_reason == "timeout" and not out.stopped:
        raise APIError(504, f"the request took longer than serve.request_timeout_s="
                       f"{state.cfg.serve.request_timeout_s:g} s", kind="server_error", code="timeout")
    out.finish()
    reason = output.finish_reason(result.stats.stop_reason, out, job.cancel_reason)
    state.metrics.observe_finished(reason, time.monotonic() - job.created)
    tokens = out.tokens_used if out.stopped else len(result.output_ids)
    return responder.full(out.text, reason, output.usage(len(job.req.prompt_ids), tokens))


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def stream_events(state: ServeState, job: Job, out: output.OutputText, responder,
                        include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events: a role chunk (chat), one chunk per committed token, the final chunk,
    usage if asked, ``[DONE]``. A client that goes away cancels the sequence (``finally``)."""
    done = False
    try:
        if responder.chat:
            yield sse(responder.chunk(None, role=True))
        while True:
            event = await next_event(job)
            if event[0] == "error":
                kind = "server_error" if event[1] >= 500 else "invalid_request_error"
                yield sse(APIError(event[1], event[2], kind=kind).body())
                done = True
                return
            if event[0] == "done":
                break
            if not out.stopped:
                yield sse(responder.chunk(out.add(event[1])))
                if out.stopped:
                    job.cancel("stop")
        result = event[1]
        if job.cancel_reason == "timeout" and not out.stopped:
            yield sse(APIError(504, "the request took longer than serve.request_timeout_s",
                               kind="server_error", code="timeout").body())
            done = True
            return
        rest = out.finish()
        reason = output.finish_reason(result.stats.stop_reason, out, job.cancel_reason)
        yield sse(responder.chunk(rest or None, finish_reason=reason))
        state.metrics.observe_finished(reason, time.monotonic() - job.created)
        if include_usage:
            tokens = out.tokens_used if out.stopped else len(result.output_ids)
            yield sse(responder.usage_chunk(output.usage(len(job.req.prompt_ids), tokens)))
        yield sse("[DONE]")
        done = True
    finally:
        if not done:
            job.cancel("client")
