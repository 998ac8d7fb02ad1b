"""SPDSchedule: Speculative Pipeline Decoding with n tokens of one sequence in flight.

Every cycle each stage advances its own in-flight token by one stage; the oldest token leaves the
last stage and its logits verify the next in-flight token (docs/SPD.md section 1). The draft is
co-located with stage 0, which is also the controller: it injects one token per cycle, runs the
draft, verifies, and owns every decision. Nothing is broadcast:

- ring, stage s -> s+1: [header(STEP, position, 1, token, epoch), hidden [1, 1, h]];
- report, stage s>0 -> stage 0, one per processed token: [header(REPORT, position, count,
  argmax, epoch), anchors [count, A_s, h] if the draft uses anchors, logits [V] from the last
  stage when sampling].

A reject bumps the epoch. The corrected token's ring message carries the new epoch, and a stage
that sees a newer epoch truncates its KV cache to that message's position before processing it:
the rollback rides on the refill. Stale tokens still in the pipeline are processed and their
reports discarded by stage 0, so the refill costs exactly the spec's n-1 cycles, and every stage
keeps a fixed message pattern (no pairing by luck, no per-cycle collective, no barrier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from spd_megatron.draft.base import Draft, DraftContext, DraftProposal, DraftRow
from spd_megatron.draft.features import stage_anchors
from spd_megatron.errors import SPDError
from spd_megatron.parallel.link import Header, Op
from spd_megatron.sampling.logits import sample_token
from spd_megatron.sampling.verify import verify
from spd_megatron.schedule.base import SpeculativeSchedule, register_schedule
from spd_megatron.schedule.plan import build_plan
from spd_megatron.schedule.state import DecodeState, Verdict


@dataclass
class InFlight:
    """A token stage 0 has injected and not yet seen leave the last stage."""

    index: int  # injection counter since prefill (cycle of injection)
    position: int
    token: int
    epoch: int
    probs: Optional[Tensor] = None  # q of the draft at this position (sampling)
    fill: int = 0  # in-flight tokens ahead of it when it was proposed (its look-ahead)


@register_schedule("spd")
class SPDSchedule(SpeculativeSchedule):
    """Speculative Pipeline Decoding (needs pipeline_parallel_size >= 2).

    Args:
        draft: the Draft on stage 0 (None on the other stages).
        anchors: hidden-state indices the draft aggregates (the same list on every rank).
    """

    has_draft = True
    prefill_chunk_size = 256
    plan = staticmethod(build_plan)  # the cycle table this schedule follows (offline)

    def __init__(self, stage, link, sampling, seed: int = 0, draft: Optional[Draft] = None,
                 anchors: Sequence[int] = ()) -> None:
        super().__init__(stage, link, sampling, seed)
        if link is None or self.placement.pp_size < 2:
            raise SPDError("schedule.name=spd needs at least 2 pipeline stages; launch more "
                           "processes or use schedule.name=autoregressive")
        self.n = self.placement.pp_size
        self.split = self.placement.layers_per_stage
        self.anchors = list(anchors)
        self.draft = draft
        self.vocab_size = stage.arch.vocab_size
        self.report_anchors = [stage_anchors(s, self.anchors, self.split) for s in range(self.n)]
        self.epoch = 0

    # ================================ hooks ====================================================
    def prefill(self, state: DecodeState) -> None:
        """Chunked prompt prefill; every stage reports its anchors; stage 0 picks the first token."""
        self.stats.pipeline_depth = self.n
        self.epoch = 0
        self.stage.set_taps(self.report_anchors[self.placement.pp_rank])  # the stage may be shared
        if not self.is_first:
            return self._prefill_and_report()
        ids = torch.tensor([state.tokens], dtype=torch.long)  # [1, prompt_len]
        chunk = self.prefill_chunk_size or state.prompt_len
        spans = [(p, min(chunk, state.prompt_len - p)) for p in range(0, state.prompt_len, chunk)]
        features: dict[int, dict[int, Tensor]] = {}
        for pos, count in spans:
            out = self.stage.forward(pos, token_ids=ids[:, pos:pos + count])  # [count, 1, h]
            self._keep_local_taps(features, pos, count)
            self.link.send_next(Header(Op.PREFILL, pos, count, state.prompt_len), out)
        for _ in spans:
            last_logits = self._collect_reports(features)
        first = sample_token(last_logits, self.sampling, self.generator)
        self._start_controller(state, features, first)

    def propose(self, state: DecodeState) -> Optional[DraftProposal]:
        """Stage 0: gather last cycle's anchors, then the draft predicts the next position."""
        if not self.is_first or self.next_input is None:
            return None
        self._receive_cycle_reports()
        start = time.perf_counter()
        ctx = self._draft_context(state)
        proposal = self.draft.propose(ctx, self.sampling, self.generator)
        self.stats.draft_seconds += time.perf_counter() - start
        return proposal

    def advance(self, state: DecodeState, proposal) -> Optional[Tensor]:
        """Every stage processes the token it holds; stages > 0 report to stage 0."""
        if self.is_first:
            return self._inject(state)
        header = self.link.recv_prev()
        if header.op == Op.STOP:
            if not self.is_last:
                self.link.send_next(header)
            state.finished = True
            return None
        out = self._run_message(header)
        self._report(header, out)
        return None

    def verify(self, state: DecodeState, out, proposal) -> Optional[Verdict]:
        """Stage 0: when a token leaves the last stage, its logits decide the next in-flight token."""
        if not self.is_first or len(self.in_flight) < self.n:
            return None
        exiting = self.in_flight.pop(0)
        header, logits = self._recv_last_report(exiting)
        if exiting.epoch != self.epoch or not self.in_flight:
            return None  # a flushed token: nothing to verify (refill)
        start = time.perf_counter()
        draft = self.in_flight[0]
        self.pending = exiting.position
        self.features = {p: f for p, f in self.features.items() if p >= self.pending}
        target = logits if logits is not None else _argmax_logits(header.token, self.vocab_size)
        accepted, token = verify(draft.token, draft.probs, target, self.sampling, self.generator)
        self.stats.observe_verdict(accepted, draft.fill)
        self.stats.verify_seconds += time.perf_counter() - start
        return Verdict(accepted, draft.position, token, state.is_last_token(token))

    def commit(self, state: DecodeState, proposal, verdict: Optional[Verdict]) -> None:
        """Stage 0: commit an accepted draft; admit the proposal as the next token to inject."""
        if not self.is_first or state.finished:
            return
        if verdict is not None:
            state.commit(verdict)
            self.emit(state)
            if state.finished:
                return
        position = self.in_flight[-1].position + 1  # after the token injected this cycle
        fill = sum(1 for t in self.in_flight if t.epoch == self.epoch)
        self.next_input = InFlight(self.injected, position, proposal.token, self.epoch, proposal.probs, fill)

    def rollback(self, state: DecodeState, verdict: Verdict) -> None:
        """Stage 0: commit the recovered token; everything younger is stale; refill from it."""
        state.commit(verdict)
        self.emit(state)
        self.epoch += 1
        self.features = {p: f for p, f in self.features.items() if p < verdict.position}
        self.draft.truncate(verdict.position)
        if not state.finished:
            self.next_input = InFlight(self.injected, verdict.position, verdict.token_id, self.epoch)

    def finish(self, state: DecodeState) -> None:
        """Stage 0 sends STOP down the ring and drains the reports still on their way."""
        if self.is_first:
            self.link.send_next(Header(Op.STOP))
            for src in range(1, self.n):
                while self.reports_from[src] < self.injected:
                    self._recv_report(src, None)
        super().finish(state)

    # ============================ stage 0: controller ==========================================
    def _start_controller(self, state: DecodeState, features, first: int) -> None:
        self.features = features
        self.in_flight: list[InFlight] = []
        self.injected = 0
        self.reports_from = {s: 0 for s in range(1, self.n)}
        self.pending = state.prompt_len - 1
        rows = [DraftRow(p, state.tokens[p], self.n, features.get(p, {})) for p in range(state.prompt_len)]
        self.draft.start(rows)
        verdict = Verdict(False, state.prompt_len, first, state.is_last_token(first))
        state.commit(verdict)
        self.emit(state)
        self.next_input = None if state.finished else InFlight(0, state.prompt_len, first, 0)

    def _inject(self, state: DecodeState) -> None:
        tok = self.next_input
        start = time.perf_counter()
        out = self.stage.forward(tok.position, token_ids=torch.tensor([[tok.token]]))  # [1, 1, h]
        self.stats.stage_compute_seconds += time.perf_counter() - start
        self._keep_local_taps(self.features, tok.position, 1)
        self.link.send_next(Header(Op.STEP, tok.position, 1, tok.token, tok.epoch), out)
        self.in_flight.append(tok)
        self.injected += 1
        self.next_input = None
        return None

    def _draft_context(self, state: DecodeState) -> DraftContext:
        """Rows: the pending completed token (depth n), in-flight tokens, the newest (depth 0)."""
        newest = self.next_input
        live = [t for t in self.in_flight if t.epoch == self.epoch]
        rows = []
        if self.pending is not None and (not live or self.pending == live[0].position - 1):
            rows.append(self._row(self.pending, state.tokens[self.pending], self.n))
        for t in live:
            rows.append(self._row(t.position, t.token, self.injected - t.index))
        rows.append(DraftRow(newest.position, newest.token, 0, self._embedding_anchor(newest.token)))
        tokens = state.tokens[:rows[0].position] + [r.token for r in rows]
        return DraftContext(newest.position + 1, tokens, rows, len(state.tokens))

    def _row(self, position: int, token: int, depth: int) -> DraftRow:
        return DraftRow(position, token, depth, self.features.get(position, {}))

    def _embedding_anchor(self, token: int) -> dict[int, Tensor]:
        if 0 not in self.anchors:
            return {}
        emb = self.stage.model.embedding(torch.tensor([[token]]), None)  # [1, 1, h]
        return {0: emb[0, 0]}

    def _keep_local_taps(self, features, position: int, count: int) -> None:
        for k in self.report_anchors[0]:
            hidden = self.stage.taps[k]  # [count, 1, h]
            for i in range(count):
                features.setdefault(position + i, {})[k] = hidden[i, 0].clone()

    def _receive_cycle_reports(self) -> None:
        """Reports of the tokens stages 1..n-2 processed last cycle (stage s: injected - s)."""
        for src in range(1, self.n - 1):
            while self.reports_from[src] < self.injected - src:
                self._recv_report(src, self.features)

    def _recv_last_report(self, exiting: InFlight) -> tuple[Header, Optional[Tensor]]:
        keep = self.features if exiting.epoch == self.epoch else None
        header, logits = self._recv_report(self.n - 1, keep)
        if header.position != exiting.position:
            raise RuntimeError(f"SPD protocol: expected a report for position {exiting.position}, "
                               f"got {header.position}")
        return header, logits

    def _recv_report(self, src: int, features) -> tuple[Header, Optional[Tensor]]:
        """One report from stage ``src``; anchors kept in ``features`` if current, else dropped."""
        rank = self.link.stage_ranks[src]
        header = self.link.recv_header(rank)
        anchors = self.report_anchors[src]
        payload = None
        if anchors:
            shape = (header.count, len(anchors), self.stage.arch.hidden_size)  # [count, A_s, h]
            payload = self.link.recv_tensor(rank, shape, self.link.dtype)
        logits = None
        if src == self.n - 1 and not self.sampling.is_greedy:
            logits = self.link.recv_tensor(rank, (self.vocab_size,), torch.float32)
        if features is not None and payload is not None and header.epoch == self.epoch:
            for i in range(header.count):
                slot = features.setdefault(header.position + i, {})
                slot.update({k: payload[i, j] for j, k in enumerate(anchors)})
        if header.op == Op.REPORT:
            self.reports_from[src] = self.reports_from.get(src, 0) + 1
        return header, logits

    def _collect_reports(self, features) -> Tensor:
        """Prefill: the reports of one chunk from every stage; returns the last stage's logits [V]."""
        for src in range(1, self.n):
            header, logits = self._recv_report(src, features)
        if logits is None:
            logits = _argmax_logits(header.token, self.vocab_size)
        return logits

    # ============================ stages > 0 ===================================================
    def _prefill_and_report(self) -> None:
        while True:
            header = self.link.recv_prev()
            out = self._run_message(header)
            self._report(header, out)
            if header.position + header.count == header.token:  # token = prompt length
                return

    def _run_message(self, header: Header) -> Tensor:
        """Process a ring message; a newer epoch means: truncate to its position first."""
        hidden = self.link.recv_hidden(header.count)
        start = time.perf_counter()
        out = self.stage.forward(header.position, hidden=hidden)
        self.stats.stage_compute_seconds += time.perf_counter() - start
        if not self.is_last:
            self.link.send_next(header, out)
        return out

    def _report(self, header: Header, out: Tensor) -> None:
        """Anchors (and the last stage's verdict material) to stage 0."""
        op = Op.PREFILL if header.op == Op.PREFILL else Op.REPORT
        tensors = []
        if self.report_anchors[self.placement.pp_rank]:
            taps = [self.stage.taps[k][:, 0] for k in self.report_anchors[self.placement.pp_rank]]
            tensors.append(torch.stack(taps, dim=1))  # [count, A_s, h]
        token = -1
        if self.is_last:
            last = out[0, -1].float()  # [V] logits of the newest row
            token = int(torch.argmax(last))
            if not self.sampling.is_greedy:
                tensors.append(last)
        self.link.send_to_first(Header(op, header.position, header.count, token, header.epoch), *tensors)


def _argmax_logits(token: int, vocab_size: int) -> Tensor:
    """Greedy verification needs only the argmax: a one-hot stand-in for the logits."""
    logits = torch.zeros(vocab_size)
    logits[token] = 1.0
    return logits
