"""SpeculativeSchedule: the fixed decode loop, and the hooks a schedule implements.

Every rank runs ``generate`` (SPMD). Each hook does this rank's share of the work and talks to
other ranks only through ``self.link`` (a StageLink); model math goes through ``self.stage`` and
token choice through ``spd_megatron.sampling``. A schedule is picked by name
(``schedule.name=...``) from the registry::

    @register_schedule("my_schedule")
    class MySchedule(AutoregressiveSchedule):
        def commit(self, state, verdict):
            log.info("token %d at %d", verdict.token_id, verdict.position)
            super().commit(state, verdict)

The loop (do not override ``generate``; override hooks)::

    state = prefill(prompt)                 # KV caches filled, first token committed
    while not state.finished:
        proposal = propose(state)           # draft for the next position, or None
        out = advance(state, proposal)      # every stage moves its in-flight token one stage
        verdict = verify(state, out)        # decided on the last stage, known where needed
        commit(state, proposal, verdict) if verdict is None or verdict.accepted else rollback(state, verdict)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from spd_megatron.errors import SPDError
from spd_megatron.metrics import DecodeStats
from spd_megatron.sampling.logits import SamplingParams
from spd_megatron.schedule.state import DecodeState, Verdict

_REGISTRY: dict[str, type["SpeculativeSchedule"]] = {}


def register_schedule(name: str):
    """Class decorator: make a schedule selectable as ``schedule.name=<name>``."""

    def decorate(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorate


def schedule_names() -> list[str]:
    return sorted(_REGISTRY)


def get_schedule_class(name: str) -> type["SpeculativeSchedule"]:
    if name not in _REGISTRY:
        raise SPDError(f"unknown schedule.name={name}; registered: {', '.join(schedule_names())}")
    return _REGISTRY[name]


@dataclass
class GenerationResult:
    """What ``generate`` returns on every rank (stats are meaningful on stage 0)."""

    output_ids: list[int]  # new tokens only, EOS included when it ended the sequence
    stats: DecodeStats


TokenCallback = Callable[[list[int]], None]


class SpeculativeSchedule(ABC):
    """Pipeline-parallel decoding of one sequence: one prefill, then decode cycles.

    Args:
        stage: this rank's TargetStage (its layers and KV cache).
        link: the StageLink to the neighbouring stages, or None when there is one stage.
        sampling: temperature / top-k / top-p (temperature 0 = greedy).
        seed: seed of the sampling generator; the same seed gives the same output.
    """

    name = "base"

    def __init__(self, stage, link, sampling: SamplingParams, seed: int = 0) -> None:
        self.stage = stage
        self.link = link
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.placement = stage.placement
        self.device = getattr(stage, "device", torch.device("cpu"))  # where token ids are built
        self.stats = DecodeStats()
        self.on_token: Optional[TokenCallback] = None

    @property
    def is_first(self) -> bool:
        return self.placement.is_first

    @property
    def is_last(self) -> bool:
        return self.placement.is_last

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_ids=(),
                 on_token: Optional[TokenCallback] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> GenerationResult:
        """Decode up to ``max_new_tokens`` tokens after ``prompt_ids`` (call on every rank).

        ``should_stop``: stage 0 only (TP = 1: stage 0's TP peers would not see it), asked before
        every cycle; True ends the sequence there (stop reason "cancelled"), and ``finish`` tells
        the other ranks the way a normal end does.
        """
        self._check_fits(len(prompt_ids), max_new_tokens)
        self.stats, self.on_token = DecodeStats(prompt_tokens=len(prompt_ids)), on_token
        self.stats.compile_seconds = getattr(self.stage.compiled, "compile_seconds", 0.0)
        self.stats.start()
        state = DecodeState(list(prompt_ids), len(prompt_ids), max_new_tokens, frozenset(eos_token_ids))
        self.prefill(state)
        self.stats.mark_first_token()
        self.stats.stage_compute_seconds = 0.0  # decode only, like every other timer
        wait_start = self.link.wait_seconds if self.link is not None else 0.0
        while not state.finished:
            if should_stop is not None and should_stop():
                state.finished, state.stop_reason = True, "cancelled"
                break
            proposal = self.propose(state)
            out = self.advance(state, proposal)
            verdict = self.verify(state, out, proposal)
            if verdict is not None and not verdict.accepted and self.has_draft:
                self.rollback(state, verdict)
            else:
                self.commit(state, proposal, verdict)
            state.cycle += 1
        self.finish(state)
        self.stats.finish()
        self.stats.new_tokens, self.stats.cycles = len(state.new_tokens), state.cycle
        self.stats.stop_reason = state.stop_reason or ""
        if self.link is not None:
            self.stats.comm_wait_seconds = self.link.wait_seconds - wait_start
        return GenerationResult(state.new_tokens, self.stats)

    has_draft = False
    """Schedules whose verdicts can reject a draft set this; rejects then go to ``rollback``."""

    def _check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.stage.cache.max_seq_len
        if prompt_len == 0:
            raise SPDError("empty prompt: give at least one token")
        if prompt_len + max_new_tokens > limit:
            raise SPDError(
                f"prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} does not fit the "
                f"KV cache of {limit} positions; raise model.max_seq_len or shorten the prompt"
            )

    def emit(self, state: DecodeState) -> None:
        """Report committed tokens to the streaming callback (rank 0 prints them)."""
        if self.on_token is not None:
            self.on_token(state.new_tokens)

    # ---- hooks ------------------------------------------------------------------------------
    @abstractmethod
    def prefill(self, state: DecodeState) -> None:
        """Fill every stage's KV cache with the prompt and commit the first new token.

        The first token comes from the real prefill logits of the last prompt position.
        """

    @abstractmethod
    def propose(self, state: DecodeState):
        """Return this cycle's draft proposal (a draft-owning rank), or None."""

    @abstractmethod
    def advance(self, state: DecodeState, proposal):
        """Move every in-flight token one stage; the last stage returns the exiting logits."""

    @abstractmethod
    def verify(self, state: DecodeState, out, proposal) -> Optional[Verdict]:
        """Decide the next token from the exiting logits; None where nothing is decided."""

    @abstractmethod
    def commit(self, state: DecodeState, proposal, verdict: Optional[Verdict]) -> None:
        """Record an accepted (or bonus) token if any, and admit the proposal as the next input."""

    def rollback(self, state: DecodeState, verdict: Verdict) -> None:
        """Drop in-flight tokens after ``verdict.position``, truncate caches, admit the recovered token."""
        raise NotImplementedError(f"{type(self).__name__} has no draft to roll back")

    def finish(self, state: DecodeState) -> None:
        """After the last cycle: wait for outstanding sends."""
        if self.link is not None:
            self.link.flush()
