"""Pipelined autoregressive decoding: one token in flight, the baseline and the test oracle.

Each cycle the newest token enters stage 0, passes every stage, and the last stage picks the
next token from its logits and sends it back to stage 0 (the feedback edge of the ring). A final
token makes stage 0 send STOP down the pipeline, so every rank leaves the loop together.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from spd_megatron.parallel.link import Header, Op
from spd_megatron.sampling.logits import sample_token
from spd_megatron.schedule.base import SpeculativeSchedule, register_schedule
from spd_megatron.schedule.state import DecodeState, Verdict


@register_schedule("autoregressive")
class AutoregressiveSchedule(SpeculativeSchedule):
    """Plain pipelined decoding (no draft); ``propose`` always returns None."""

    prefill_chunk_size = 256

    # ---- stage compute, timed ---------------------------------------------------------------
    def run_stage(self, position: int, token_ids: Optional[Tensor] = None,
                  hidden: Optional[Tensor] = None) -> Tensor:
        start = time.perf_counter()
        out = self.stage.forward(position, token_ids=token_ids, hidden=hidden)
        self.stats.stage_compute_seconds += time.perf_counter() - start
        return out

    def forward_and_pass(self, header: Header, token_ids=None, hidden=None) -> Tensor:
        """Run this stage on a message and pass the result on (unless this is the last stage)."""
        out = self.run_stage(header.position, token_ids=token_ids, hidden=hidden)
        if not self.is_last:
            self.link.send_next(header, out)
        return out

    # ---- hooks ------------------------------------------------------------------------------
    def prefill(self, state: DecodeState) -> None:
        """Chunked prefill: stage s works on chunk i while stage s+1 works on chunk i-1."""
        logits = self._prefill_first(state) if self.is_first else self._prefill_rest()
        verdict = self._decide(state, logits[0, -1]) if self.is_last else None
        verdict = self.deliver(state, verdict)
        if verdict is not None:
            self.commit(state, None, verdict)

    def _prefill_first(self, state: DecodeState) -> Tensor:
        ids = torch.tensor([state.tokens], dtype=torch.long, device=self.device)  # [1, prompt_len]
        chunk = self.prefill_chunk_size or state.prompt_len
        for pos in range(0, state.prompt_len, chunk):
            count = min(chunk, state.prompt_len - pos)
            header = Header(Op.PREFILL, pos, count, state.prompt_len)
            out = self.forward_and_pass(header, token_ids=ids[:, pos:pos + count])
        return out

    def _prefill_rest(self) -> Tensor:
        while True:
            header = self.link.recv_prev()
            out = self.forward_and_pass(header, hidden=self.link.recv_hidden(header.count))
            if header.position + header.count == header.token:  # token = prompt length
                return out

    def propose(self, state: DecodeState):
        return None

    def advance(self, state: DecodeState, proposal) -> Optional[Tensor]:
        if self.is_first:
            position = state.next_position - 1
            token_ids = torch.tensor([[state.tokens[-1]]], dtype=torch.long, device=self.device)  # [1, 1]
            return self.forward_and_pass(Header(Op.STEP, position, 1), token_ids=token_ids)
        header = self.link.recv_prev()
        if header.op == Op.STOP:
            self._pass_stop()
            state.finished = True
            if self.is_last:  # it takes a normal STOP in finish: this one means stage 0 cancelled
                state.stop_reason = "cancelled"
            return None
        return self.forward_and_pass(header, hidden=self.link.recv_hidden(header.count))

    def verify(self, state: DecodeState, out, proposal) -> Optional[Verdict]:
        verdict = None
        if self.is_last and out is not None:
            verdict = self._decide(state, out[0, -1])
        return self.deliver(state, verdict)

    def commit(self, state: DecodeState, proposal, verdict: Optional[Verdict]) -> None:
        if verdict is None:  # a middle stage, or the last stage after STOP
            return
        state.commit(verdict)
        if self.is_first:
            self.emit(state)
            if verdict.is_final:
                self._pass_stop()

    # ---- helpers ----------------------------------------------------------------------------
    def _decide(self, state: DecodeState, logits: Tensor) -> Verdict:
        """Pick the next token from [V] logits (last stage)."""
        token = sample_token(logits, self.sampling, self.generator)
        return Verdict(False, state.next_position, token, state.is_last_token(token))

    def deliver(self, state: DecodeState, verdict: Optional[Verdict]) -> Optional[Verdict]:
        """Send the last stage's verdict back to stage 0; returns it where it is known."""
        if self.link is None:
            return verdict
        if self.is_last and verdict is not None:
            self.link.send_to_first(Header(Op.TOKEN, verdict.position, int(verdict.is_final),
                                           verdict.token_id))
            return verdict
        if self.is_first and not state.finished:
            header = self.link.recv_from_last()
            return Verdict(False, header.position, header.token, bool(header.count))
        return None

    def _pass_stop(self) -> None:
        """Forward STOP down the ring. The last stage knows from its own verdict and takes the STOP
        in ``finish``: every ring edge ends a sequence with STOP (parallel/link.py relies on it)."""
        if not self.is_last:
            self.link.send_next(Header(Op.STOP))

    def finish(self, state: DecodeState) -> None:
        cancelled = state.stop_reason == "cancelled"  # no final token: STOP goes out (or came) here
        if self.is_first and cancelled and self.link is not None:
            self._pass_stop()
        if self.is_last and not self.is_first and not cancelled:
            header = self.link.recv_prev()
            if header.op != Op.STOP:
                raise RuntimeError(f"autoregressive protocol: expected STOP after the final token, got {header.op.name}")
        super().finish(state)
