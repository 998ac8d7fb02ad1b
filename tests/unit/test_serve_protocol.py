"""Server pieces without processes: request checks, stop strings, metrics text, the FIFO."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("fastapi")

from tiny_models import byte_tokenizer  # noqa: E402

from spd_megatron.config import SamplingConfig  # noqa: E402
from spd_megatron.metrics import DecodeStats  # noqa: E402
from spd_megatron.schedule.base import GenerationResult  # noqa: E402
from spd_megatron.serve import protocol  # noqa: E402
from spd_megatron.serve.output import OutputText  # noqa: E402
from spd_megatron.serve.prom import ServeMetrics  # noqa: E402
from spd_megatron.serve.protocol import APIError, ChatRequest, CompletionRequest  # noqa: E402
from spd_megatron.serve.wire import DecodeRequest  # noqa: E402
from spd_megatron.serve.worker import DecodeWorker, Job, QueueFull  # noqa: E402

TOK = byte_tokenizer()


def request(body: dict, context: int = 64):
    cls = ChatRequest if "messages" in body else CompletionRequest
    return protocol.decode_request(cls.model_validate({"model": "m", **body}), TOK, SamplingConfig(), context, 16)


def test_chat_request_applies_the_template_and_defaults():
    req = request({"messages": [{"role": "user", "content": "hi"}]})
    assert req.prompt_ids == tuple(TOK.apply_chat_template([{"role": "user", "content": "hi"}],
                                                           add_generation_prompt=True, tokenize=True)["input_ids"])
    assert (req.max_new_tokens, req.temperature, req.seed) == (16, 0.0, SamplingConfig().seed)
    assert request({"prompt": "x", "temperature": 1e-30}).temperature == 0.0  # no overflow: greedy


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x" * 70}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": [1, 99999]}, "prompt"),
])
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(APIError) as err:
        request(body)
    assert err.value.status == 400 and err.value.param == param and "\n" not in err.value.message


def test_unknown_and_mistyped_fields_are_refused():
    from pydantic import ValidationError

    for body in ({"model": "m", "prompt": "x", "tempreature": 1}, {"model": "m", "prompt": "x", "seed": "1"}):
        with pytest.raises(ValidationError) as err:
            CompletionRequest.model_validate(body)
        message, param = protocol.validation_message(err.value.errors())
        assert param in ("tempreature", "seed") and param in message


def test_output_text_cuts_at_a_stop_string_across_tokens():
    out = OutputText(TOK, ["END"])
    ids = TOK("abcEN")["input_ids"]
    sent = "".join(out.add([i]) for i in ids)
    assert sent == "abc" and not out.stopped  # "EN" held back: it may become "END"
    assert out.add(TOK("Dxyz")["input_ids"][:1]) == "" and out.stopped
    assert out.text == "abc" and out.tokens_used == 6
    plain = OutputText(TOK, [])
    assert "".join(plain.add([i]) for i in TOK("héllo")["input_ids"]) + plain.finish() == "héllo"


def test_metrics_text_has_vllm_like_spec_decode_counters():
    metrics = ServeMetrics("m", pipeline_depth=2)
    stats = DecodeStats(prompt_tokens=5, new_tokens=9, cycles=10, verified=8, accepted=6,
                        verified_by_fill={1: 8}, accepted_by_fill={1: 6})
    job = Job(DecodeRequest((1,), 9), asyncio.new_event_loop(), deadline=0.0)
    job.first_token = job.created + 0.2
    metrics.observe_result(job, GenerationResult([0] * 9, stats))
    text = metrics.render(running=1, waiting=3)
    for line in ("spd:num_requests_waiting 3", "spd:spec_decode_num_accepted_tokens_total 6.0",
                 'spd:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 6.0',
                 "spd:spec_decode_acceptance_rate 0.75", "spd:spec_decode_tokens_per_cycle 0.8",
                 "spd:spec_decode_equivalent_accept_length 1.6", "spd:time_to_first_token_seconds_count 1"):
        assert line in text.splitlines(), line


def _queued_worker(loop):
    worker = DecodeWorker(engine=None, link=None, ranks=[], max_queue=1, heartbeat_s=0.01)
    jobs = [Job(DecodeRequest((1,), 1), loop, time.monotonic() + 60) for _ in range(3)]
    worker.running = jobs[0]  # as if the decode thread had taken it
    worker.submit(jobs[1])
    return worker, jobs


def test_fifo_refuses_beyond_max_queue_and_drops_waiting_on_shutdown():
    loop = asyncio.new_event_loop()
    worker, jobs = _queued_worker(loop)
    with pytest.raises(QueueFull, match="serve.max_queue=1"):
        worker.submit(jobs[2])
    worker.begin_shutdown()
    with pytest.raises(RuntimeError, match="shutting down"):
        worker.submit(jobs[2])
    loop.run_until_complete(asyncio.sleep(0))
    assert jobs[1].events.empty()  # answered when the running job ends, not before
    worker._finish_running()
    loop.run_until_complete(asyncio.sleep(0))
    assert jobs[1].events.get_nowait() == ("error", 503, "the server is shutting down")
    worker.begin_shutdown()  # idle now: a job waiting at shutdown is answered at once
    loop.close()


def test_a_shutdown_that_follows_a_rank_death_reports_the_failure_to_waiting_jobs():
    """torchrun SIGTERMs rank 0 when another rank dies; the waiting job must hear why."""
    loop = asyncio.new_event_loop()
    worker, jobs = _queued_worker(loop)
    worker.begin_shutdown()
    worker._fail(RuntimeError("rank 1: the connection failed"))
    loop.run_until_complete(asyncio.sleep(0))
    for job in jobs[:2]:
        assert job.events.get_nowait() == ("error", 503, "the decode pipeline failed: rank 1: the connection failed")
    loop.close()


def test_a_request_still_queued_at_its_deadline_gets_504():
    from spd_megatron.serve.app import next_event

    loop = asyncio.new_event_loop()
    job = Job(DecodeRequest((1,), 1), loop, deadline=time.monotonic() - 1)  # never started
    assert loop.run_until_complete(next_event(job))[:2] == ("error", 504)
    assert job.cancel_reason == "timeout" and job.should_stop()
    loop.close()
