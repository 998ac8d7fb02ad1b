"""Committed tokens -> the text a client sees, and the OpenAI response and chunk bodies."""

from __future__ import annotations

import time
import uuid
from typing import Optional


class OutputText:
    """The decoded text of a growing token list, cut at the first stop string.

    Text that could still turn into a stop string (its last ``len(longest stop) - 1`` characters)
    and an incomplete UTF-8 character are held back until the next token or ``finish``.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.stopped = False
        self.tokens_used = 0  # tokens the returned text is made of (usage.completion_tokens)

    def add(self, new_ids: list[int]) -> str:
        """New tokens; returns the text that can go to the client now."""
        if self.stopped:
            return ""
        self.ids += new_ids
        self.tokens_used = len(self.ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        cut = self._stop_at(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        self.text = text
        return self._release(len(text) - self.hold)

    def finish(self) -> str:
        """The held-back rest, once the sequence has ended."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(len(self.text))

    def _stop_at(self, text: str) -> Optional[int]:
        hits = [i for i in (text.find(s, max(self.sent - len(s), 0)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


class Responder:
    """Builds the bodies of one request's answer (chat or text completion)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, choices: list, stream: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> dict:
        """One server-sent event's body (``text=None``: an empty delta, e.g. the final chunk)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice], stream=True)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([], stream=True), "usage": usage}

    def full(self, text: str, finish_reason: str, usage: dict) -> dict:
        """The whole answer of a non-streamed request."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope([choice], stream=False), "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(stop_reason: str, out: OutputText, cancel_reason: str) -> str:
    """OpenAI's finish_reason for a sequence's stop reason (eos | length | cancelled)."""
    if out.stopped or stop_reason == "eos":
        return "stop"
    if stop_reason == "length":
        return "length"
    return "abort"  # cancelled by shutdown (vLLM's word); client-cancelled ones have no reader
