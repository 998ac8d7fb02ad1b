"""The OpenAI-compatible server, end to end: the official openai client against 2-rank servers.

Two servers (spd and autoregressive, started once, in parallel) serve every test; the two fault
tests (a rank killed, SIGTERM) end the server they use, which the pool restarts if a later test
needs it. The reference answers come from runner.run_decode (what examples/decode.py runs).
"""

from __future__ import annotations

import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from multiproc import run_distributed
from serve_harness import ServerProcess, wait_until

openai = pytest.importorskip("openai")

from spd_megatron.config import DraftConfig, load_config  # noqa: E402
from spd_megatron.runner import run_decode  # noqa: E402

pytestmark = pytest.mark.distributed

KEY = "sk-test-15"
MODEL = "tiny"
PROMPT = "Say hi"
RAW = "hello wor"
MAX = 24
RANDOM_DRAFT = ["draft.allow_random=true"] if hasattr(DraftConfig(), "allow_random") else []
CONFIGS = {  # name -> overrides (the reference decode uses the same ones)
    "spd": [f"serve.model_name={MODEL}", "schedule.name=spd", *RANDOM_DRAFT, "model.max_seq_len=1024", "serve.max_queue=16"],
    "ar": [f"serve.model_name={MODEL}", "schedule.name=autoregressive", "model.max_seq_len=1024", "serve.max_queue=2",
           f"serve.api_key={KEY}"],
}


class Pool:
    """Servers by name, started on first use, restarted when a fault test ended one."""

    def __init__(self, ckpt, tmp) -> None:
        self.ckpt, self.tmp, self.servers, self.starts = ckpt, tmp, {}, 0

    def _launch(self, name: str) -> ServerProcess:
        self.starts += 1
        return ServerProcess([f"model.checkpoint={self.ckpt}", *CONFIGS[name]],
                             self.tmp / f"{name}-{self.starts}.log")

    def start_all(self) -> None:
        launched = {name: self._launch(name) for name in CONFIGS}  # load side by side
        self.servers = {name: server.wait_ready() for name, server in launched.items()}

    def get(self, name: str) -> ServerProcess:
        server = self.servers.get(name)
        if server is None or not server.alive:
            self.servers[name] = self._launch(name).wait_ready()
        return self.servers[name]

    def take(self, name: str) -> ServerProcess:
        """A server the caller will end (it is not handed out again)."""
        return self.servers.pop(name, None) or self._launch(name).wait_ready()

    def close(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="module")
def pool(tiny_models, tmp_path_factory):
    pool = Pool(tiny_models["llama"][1], tmp_path_factory.mktemp("serve"))
    try:
        pool.start_all()
        yield pool
    finally:
        pool.close()


def client(server: ServerProcess, key: str = KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def _reference(rank, world_size, cfg, out):
    records = run_decode(cfg)
    if rank == 0:
        out.write_text(json.dumps([[r["text"], len(r["output_ids"])] for r in records]))


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """name -> {"chat": (text, tokens), "raw": (text, tokens)}: greedy decode.py answers."""
    out, root = {}, tmp_path_factory.mktemp("ref")
    for name, overrides in CONFIGS.items():
        for kind, extra in (("chat", []), ("raw", ["chat_template=false"])):
            cfg = load_config("tiny", [f"model.checkpoint={tiny_models['llama'][1]}", *overrides, *extra,
                                       f"prompt={PROMPT if kind == 'chat' else RAW}", f"max_new_tokens={MAX}",
                                       "report.stream=false"])
            path = root / f"{name}-{kind}.json"
            run_distributed(_reference, 2, cfg, path, timeout_s=120)
            out.setdefault(name, {})[kind] = tuple(json.loads(path.read_text())[0])
    return out


def chat(c, stream=False, **kw):
    kw = {"max_tokens": MAX, "temperature": 0, **kw}
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                     stream=stream, **kw)


def streamed_text(stream, chat_api=True) -> tuple[str, str]:
    parts, reason = [], None
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            parts.append((choice.delta.content or "") if chat_api else choice.text)
            reason = choice.finish_reason or reason
    return "".join(parts), reason


@pytest.mark.parametrize("name", ["spd", "ar"])
def test_greedy_answers_equal_decode_py(pool, reference, name):
    c = client(pool.get(name))
    ref_chat, ref_raw = reference[name]["chat"], reference[name]["raw"]
    full = chat(c)
    assert (full.choices[0].message.content, full.usage.completion_tokens) == tuple(ref_chat)
    assert streamed_text(chat(c, stream=True))[0] == ref_chat[0]
    done = c.completions.create(model=MODEL, prompt=RAW, max_tokens=MAX, temperature=0)
    assert (done.choices[0].text, done.usage.completion_tokens) == tuple(ref_raw)
    streamed = c.completions.create(model=MODEL, prompt=RAW, max_tokens=MAX, temperature=0, stream=True)
    assert streamed_text(streamed, chat_api=False)[0] == ref_raw[0]
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_fixed_seed_repeats(pool):
    c = client(pool.get("spd"))
    texts = [chat(c, temperature=0.9, top_p=0.95, seed=11).choices[0].message.content for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_sixteen_concurrent_clients(pool):
    c = client(pool.get("spd"))
    prompts = [f"{i} apples" for i in range(16)]

    def ask(prompt, stream=False):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        if stream:
            return streamed_text(c.completions.create(stream=True, **kw), chat_api=False)[0]
        return c.completions.create(**kw).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(lambda i: [ask(prompts[i]), ask(prompts[i], stream=True)], range(16)))
    assert together == [[a, a] for a in alone]


def test_disconnect_mid_stream_then_next_request(pool, reference):
    server = pool.get("spd")
    c = client(server)
    before = server.metric("spd:generation_tokens_total")
    stream = chat(c, stream=True, max_tokens=900, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_until(lambda: server.metric('spd:request_cancelled_total{reason="client"}') >= 1, 60, "the cancel")
    assert server.metric("spd:generation_tokens_total") - before < 900
    assert chat(c).choices[0].message.content == reference["spd"]["chat"][0]


def test_queue_limit_answers_429(pool):
    server = pool.get("ar")
    c = client(server)
    stream = chat(c, stream=True, max_tokens=900, extra_body={"ignore_eos": True})
    next(iter(stream))
    results = []
    waiting = [threading.Thread(target=lambda: results.append(chat(c, max_tokens=4))) for _ in range(2)]
    for t in waiting:
        t.start()
    wait_until(lambda: server.metric("spd:num_requests_waiting") == 2, 60, "two waiting requests")
    with pytest.raises(openai.RateLimitError, match="serve.max_queue=2"):
        chat(c, max_tokens=4)
    stream.close()  # cancels the long one; the two waiting ones run
    for t in waiting:
        t.join(120)
    assert len(results) == 2 and all(r.choices[0].finish_reason in ("length", "stop") for r in results)


def _post(server, path, body, key=KEY):
    data = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=data, timeout=30,
                      headers={"authorization": f"Bearer {key}", "content-type": "application/json"})


BAD = [  # (body, status, words in the message)
    ('{"model": MODEL, "prompt": ', 400, "malformed JSON"),
    ({"model": MODEL, "prompt": "x", "colour": 1}, 400, "unknown field 'colour'"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "only n=1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "must be >= 1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "does not fit the context"),
    ({"model": MODEL, "prompt": "x" * 1100}, 400, "does not fit the context"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
]


def test_bad_inputs_get_openai_errors(pool, reference):
    server = pool.get("ar")
    for body, status, words in BAD:
        reply = _post(server, "/v1/completions", body)
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.json()["error"]["message"], reply.text
    assert _post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        chat(client(server, key="wrong"))
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert chat(client(server)).choices[0].message.content == reference["ar"]["chat"][0]


def test_rank_killed_mid_request(pool):
    server = pool.take("spd")
    try:
        c = client(server)
        stream = chat(c, stream=True, max_tokens=900, extra_body={"ignore_eos": True})
        next(iter(stream))
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(_post(server, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})))
        waiter.start()
        wait_until(lambda: server.metric("spd:num_requests_waiting") == 1, 60, "a waiting request")
        os.kill(server.rank_pids()[1], signal.SIGKILL)
        with pytest.raises(openai.APIError, match="decode pipeline failed"):
            for _ in stream:
                pass
        waiter.join(60)
        assert queued and queued[0].status_code == 503, queued
        assert "decode pipeline failed" in queued[0].json()["error"]["message"]
        assert server.wait_exit() != 0
    finally:
        server.kill()


def test_sigterm_during_a_request(pool):
    server = pool.take("ar")
    try:
        stream = chat(client(server), stream=True, max_tokens=300, extra_body={"ignore_eos": True})
        next(iter(stream))
        server.proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
        text, reason = streamed_text(stream)
        assert reason == "length"  # the running sequence finished
        server.wait_exit()
        log = server.output()
        assert "shut down cleanly" in log, log[-3000:]
        assert "error:" not in log, log[-3000:]
    finally:
        server.kill()
