"""The OpenAI request bodies we accept, their checks, and OpenAI-style error bodies.

Fields are strictly typed and unknown fields are refused (400), so a typo never passes silently.
Accepted beyond OpenAI's own: ``top_k`` and ``ignore_eos`` (as vLLM). Omitted sampling fields take
the server's ``sampling.*`` config; an omitted ``seed`` at temperature > 0 is drawn per request.
"""

from __future__ import annotations

import secrets
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from spd_megatron.serve.wire import DecodeRequest

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)


class APIError(Exception):
    """An OpenAI-style error answer: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unavailable(message: str) -> APIError:
    return APIError(503, message, kind="server_error", code="unavailable")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


def stop_strings(body: _Sampling) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(400, f"stop: give at most {MAX_STOP} non-empty strings", "stop")
    return stop


def check_unsupported(body: _Sampling) -> None:
    """Fields we parse but cannot honour: refused by name rather than ignored."""
    unsupported = [
        (body.n != 1, "n", "only n=1 is supported (one sequence at a time)"),
        (body.presence_penalty != 0 or body.frequency_penalty != 0, "presence_penalty",
         "presence_penalty and frequency_penalty are not supported; leave them 0"),
        (bool(body.logprobs), "logprobs", "logprobs are not supported"),
        (isinstance(body, CompletionRequest) and body.echo, "echo", "echo is not supported"),
        (isinstance(body, CompletionRequest) and (body.best_of or 1) != 1, "best_of", "only best_of=1 is supported"),
        (isinstance(body, CompletionRequest) and body.suffix is not None, "suffix", "suffix is not supported"),
    ]
    for bad, param, message in unsupported:
        if bad:
            raise APIError(400, message, param)


def prompt_ids(body: Union[ChatRequest, CompletionRequest], tokenizer) -> list[int]:
    """Token ids: the chat template applied to the messages, or the raw prompt (text or ids)."""
    if isinstance(body, ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # noqa: BLE001 - a template that refuses these messages (jinja raise)
            raise APIError(400, f"the chat template refused these messages: {err}", "messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        vocab = len(tokenizer)
        if any(not 0 <= p < vocab for p in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one prompt (a string, or a list of one string)", "prompt")
        prompt = prompt[0]
    return list(tokenizer(prompt)["input_ids"])


def check_sampling(body: _Sampling, defaults) -> tuple[float, float, int]:
    """(temperature, top_p, top_k), omitted ones from ``defaults`` (the sampling config)."""
    temperature = defaults.temperature if body.temperature is None else body.temperature
    top_p = defaults.top_p if body.top_p is None else body.top_p
    top_k = defaults.top_k if body.top_k is None else max(body.top_k, 0)  # vLLM's -1 = off
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature={temperature} must be in [0, 2]", "temperature")
    if temperature < GREEDY_BELOW:  # 1 / temperature would overflow the logits: greedy, as vLLM
        temperature = 0.0
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p={top_p} must be in (0, 1]", "top_p")
    if body.top_k is not None and body.top_k < -1:
        raise APIError(400, f"top_k={body.top_k} must be >= 0 (or -1: off)", "top_k")
    return temperature, top_p, top_k


def max_new_tokens(body: _Sampling, prompt_len: int, context: int, default: int) -> int:
    """The request's max_tokens, checked against the room left in the KV cache."""
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    room = context - prompt_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty: give at least one token", "prompt")
    if requested is not None and requested < 1:
        raise APIError(400, f"max_tokens={requested} must be >= 1", "max_tokens")
    if room < 1 or (requested is not None and requested > room):
        wanted = f" + max_tokens={requested}" if requested is not None else " + 1 new token"
        raise APIError(400, f"prompt of {prompt_len} tokens{wanted} does not fit the context of {context} "
                       "positions (model.max_seq_len); shorten the prompt or lower max_tokens",
                       "max_tokens", "context_length_exceeded")
    return requested if requested is not None else min(default, room)


def decode_request(body: _Sampling, tokenizer, sampling_cfg, context: int, default_max: int) -> DecodeRequest:
    """Every check, then the DecodeRequest all ranks will run; APIError on bad input."""
    check_unsupported(body)
    stop_strings(body)
    ids = prompt_ids(body, tokenizer)
    temperature, top_p, top_k = check_sampling(body, sampling_cfg)
    new = max_new_tokens(body, len(ids), context, default_max)
    if body.seed is not None:
        seed = body.seed % 2**62
    else:
        seed = sampling_cfg.seed if temperature == 0 else secrets.randbits(62)
    return DecodeRequest(tuple(ids), new, temperature, top_p, top_k, seed, body.ignore_eos)


def validation_message(errors: list) -> tuple[str, Optional[str]]:
    """FastAPI's RequestValidationError list -> (one line, the offending field)."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('msg')}", None
    if first.get("type") == "extra_forbidden":
        return f"unknown field '{param}'", param
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param
