"""The contract between schedule hooks: what is in flight, what is committed, what was decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification, identical on every rank that needs it.

    accepted: True if the draft at ``position`` matched the target (always False for the
        autoregressive schedule, which has no draft: its token is a *bonus* token).
    position: absolute position of the token that was decided.
    token_id: the committed token (the draft if accepted, else the target's own token).
    is_final: the sequence ends with this token (EOS or max_new_tokens reached).
    """

    accepted: bool
    position: int
    token_id: int
    is_final: bool = False


@dataclass
class DecodeState:
    """Per-sequence state of one rank.

    tokens: committed ids, prompt included (all stages keep the same list).
    cycle: decode cycles run so far (prefill excluded).
    """

    tokens: list[int]
    prompt_len: int
    max_new_tokens: int
    eos_token_ids: frozenset[int]
    cycle: int = 0
    finished: bool = False
    stop_reason: Optional[str] = None  # "eos" | "length"
    in_flight: list[int] = field(default_factory=list)  # ids in the pipeline, oldest first

    @property
    def new_tokens(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def next_position(self) -> int:
        """Position of the next token to be committed."""
        return len(self.tokens)

    def is_last_token(self, token_id: int) -> bool:
        """Would committing ``token_id`` end the sequence?"""
        return token_id in self.eos_token_ids or len(self.new_tokens) + 1 >= self.max_new_tokens

    def commit(self, verdict: Verdict) -> None:
        self.tokens.append(verdict.token_id)
        if verdict.is_final:
            self.finished = True
            self.stop_reason = "eos" if verdict.token_id in self.eos_token_ids else "length"
