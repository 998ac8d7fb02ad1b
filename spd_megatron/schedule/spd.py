"""SPDSchedule: Speculative Pipeline Decoding with n tokens of one sequence in flight.

Every cycle each stage advances its own in-flight token by one stage; the oldest token leaves the
last stage and its logits verify the next in-flight token (docs/SPD.md section 1). Stage 0 is the
controller: it injects one token per cycle, verifies, and owns every decision. The draft runs on
stage 0 (``colocated``) or on a dedicated rank after the model ranks (``dedicated``). Nothing is
broadcast; every message is point-to-point with a fixed shape:

- ring, stage s -> s+1: [header(STEP, position, 1, token, epoch), hidden [1, 1, h]];
- verdict material, last stage -> stage 0, per processed token: [header(VERDICT, ..., argmax),
  logits [V] when sampling];
- anchors, stage s -> draft host, per processed token: [header(REPORT), anchors [count, A_s, h]];
- dedicated only: stage 0 -> draft rank [header(ROWS), rows [n+1, 3], h^0 [h]] and back
  [header(PROPOSAL, ..., token), q [V] when sampling].

A reject bumps the epoch. The corrected token's ring message carries the new epoch, and a stage
that sees it truncates its KV cache to that position before processing it: the rollback rides
on the refill. Flushed tokens still in the pipeline are processed and their messages discarded,
so a refill costs the spec's n-1 cycles and the message pattern never changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from spd_megatron.draft.base import Draft, DraftProposal
from spd_megatron.draft.features import stage_anchors
from spd_megatron.errors import SPDError
from spd_megatron.parallel.link import Header, Op
from spd_megatron.sampling.logits import sample_token
from spd_megatron.sampling.verify import verify
from spd_megatron.schedule.base import GenerationResult, SpeculativeSchedule, register_schedule
from spd_megatron.schedule.draft_host import DraftHost
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
        draft: the Draft, on the rank that hosts it (stage 0 when co-located), else None.
        anchors: hidden-state indices the draft aggregates (the same list on every rank).
        draft_rank: global rank of a dedicated draft rank, or None for a co-located draft.
    """

    has_draft = True
    prefill_chunk_size = 256
    plan = staticmethod(build_plan)  # the cycle table this schedule follows (offline)

    def __init__(self, stage, link, sampling, seed: int = 0, draft: Optional[Draft] = None,
                 anchors: Sequence[int] = (), draft_rank: Optional[int] = None) -> None:
        super().__init__(stage, link, sampling, seed)
        if link is None or self.placement.pp_size < 2:
            raise SPDError("schedule.name=spd needs at least 2 pipeline stages; launch more "
                           "processes or use schedule.name=autoregressive")
        self.n = self.placement.pp_size
        self.anchors = list(anchors)
        self.draft_rank = draft_rank
        self.vocab_size = stage.arch.vocab_size
        self.report_anchors = [stage_anchors(s, self.anchors, self.placement.layers_per_stage)
                               for s in range(self.n)]
        self.host = None
        if draft is not None:  # co-located on stage 0: anchors of stages 1.. arrive by message
            remote = {s: link.stage_ranks[s] for s in range(1, self.n) if self.report_anchors[s]}
            self.host = DraftHost(draft, link, self.report_anchors, remote, self.n,
                                  stage.arch.hidden_size, link.dtype)

    @property
    def draft(self) -> Optional[Draft]:
        return self.host.draft if self.host else None

    @property
    def anchor_dest(self) -> Optional[int]:
        """Where this rank's anchor reports go (None: nowhere, or kept locally on stage 0)."""
        if not self.report_anchors[self.placement.pp_rank]:
            return None
        if self.draft_rank is not None:
            return self.draft_rank if self.placement.tp_rank == 0 else None
        return None if self.is_first else self.link.first_rank

    # ================================ hooks ====================================================
    def prefill(self, state: DecodeState) -> None:
        """Chunked prompt prefill; stages report anchors; stage 0 picks the first token."""
        self.stats.pipeline_depth = self.n
        self.epoch = 0
        self.stage.set_taps(self.report_anchors[self.placement.pp_rank])  # the stage may be shared
        if not self.is_first:
            return self._prefill_and_report()
        if self.host is not None:
            self.host.begin(state.tokens)
        self._announce_sequence(state)
        chunk = self.prefill_chunk_size or state.prompt_len
        ids = torch.tensor([state.tokens], dtype=torch.long, device=self.device)  # [1, prompt_len]
        for pos in range(0, state.prompt_len, chunk):
            count = min(chunk, state.prompt_len - pos)
            out = self.stage.forward(pos, token_ids=ids[:, pos:pos + count])  # [count, 1, h]
            self._share_local_anchors(Header(Op.PREFILL, pos, count, state.prompt_len))
            self.link.send_next(Header(Op.PREFILL, pos, count, state.prompt_len), out)
        shared = self._last_stage_shares_channel()
        for _ in range(0, state.prompt_len, chunk):  # the last stage sends verdict, then anchors
            header, logits = self._recv_verdict_material()
            if shared:
                self.host.receive_one(self.n - 1)
        if self.host is not None:
            self.host.collect_prefill(state.prompt_len, frozenset({self.n - 1} if shared else ()))
        greedy = self.sampling.is_greedy  # greedy needs only the last stage's argmax
        self._start_controller(state, header.token if greedy else sample_token(logits, self.sampling, self.generator))

    def propose(self, state: DecodeState):
        """Stage 0: the draft predicts the token after the one injected this cycle."""
        if not self.is_first or self.next_input is None:
            return None
        rows = self._rows(state)
        h0 = self._embedding(self.next_input.token) if 0 in self.anchors else None
        if self.host is None:
            self._send_rows(rows, h0)
            return None  # the dedicated draft rank answers; commit/rollback receive it
        proposal = self.host.propose(rows, h0, self.sampling, self.generator)
        self.stats.draft_seconds = self.host.draft_seconds
        return proposal

    def advance(self, state: DecodeState, proposal) -> None:
        """Every stage processes the token it holds and reports what the others need."""
        if self.is_first:
            return self._inject()
        header = self.link.recv_prev()
        if header.op == Op.STOP:
            if not self.is_last:
                self.link.send_next(header)
            state.finished = True
            return None
        self._process_and_report(header)
        return None

    def verify(self, state: DecodeState, out, proposal) -> Optional[Verdict]:
        """Stage 0: when a token leaves the last stage, its logits decide the next in-flight token."""
        if not self.is_first or len(self.in_flight) < self.n:
            return None
        exiting = self.in_flight.pop(0)
        header, logits = self._recv_verdict_material()
        if header.position != exiting.position:
            raise RuntimeError(f"SPD protocol: verdict for {header.position}, expected {exiting.position}")
        if exiting.epoch != self.epoch or not self.in_flight:
            return None  # a flushed token: nothing to verify (refill)
        start = time.perf_counter()
        draft = self.in_flight[0]
        self.pending = exiting.position
        if self.sampling.is_greedy:  # header.token is the target's argmax
            accepted, token = draft.token == header.token, header.token
        else:
            accepted, token = verify(draft.token, draft.probs, logits, self.sampling, self.generator)
        self.stats.observe_verdict(accepted, draft.fill)
        self.stats.verify_seconds += time.perf_counter() - start
        return Verdict(accepted, draft.position, token, state.is_last_token(token))

    def commit(self, state: DecodeState, proposal, verdict: Optional[Verdict]) -> None:
        """Stage 0: commit an accepted draft; admit the proposal as the next token to inject."""
        if not self.is_first:
            return
        proposal = proposal or self._recv_proposal()
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
        if self.host is None:
            self._recv_proposal()  # this cycle's draft is flushed with the rest
        state.commit(verdict)
        self.emit(state)
        self.epoch += 1
        if self.host is not None:
            self.host.rollback(verdict.position, self.epoch)
        self.rollback_to = verdict.position
        if not state.finished:
            self.next_input = InFlight(self.injected, verdict.position, verdict.token_id, self.epoch)

    def finish(self, state: DecodeState) -> None:
        """Stage 0 sends STOP down the ring (and to a dedicated draft) and drains what is in flight."""
        if self.is_first:
            self.link.send_next(Header(Op.STOP))
            if self.draft_rank is not None and self.placement.tp_rank == 0:
                self.link.send_to(self.draft_rank, Header(Op.STOP))
            self._drain_last_stage()
            if self.host is not None:
                self.host.finish()
        super().finish(state)

    def _last_stage_shares_channel(self) -> bool:
        """Co-located draft with last-stage anchors: verdict and anchor messages alternate."""
        return self.host is not None and (self.n - 1) in self.host.remote

    def _drain_last_stage(self) -> None:
        """Take every remaining message of the last stage, in the order it sent them."""
        shared = self._last_stage_shares_channel()
        while True:
            if shared and self.host.reports_from[self.n - 1] < self.verdicts_received:
                self.host.receive_one(self.n - 1)  # anchors lag the verdicts by one token
            elif self.verdicts_received < self.injected:
                self._recv_verdict_material()
            else:
                return

    # ============================ stage 0: controller ==========================================
    def _start_controller(self, state: DecodeState, first: int) -> None:
        self.in_flight: list[InFlight] = []
        self.injected = self.verdicts_received = 0
        self.pending, self.rollback_to = state.prompt_len - 1, -1
        state.commit(Verdict(False, state.prompt_len, first, state.is_last_token(first)))
        self.emit(state)
        self.next_input = None if state.finished else InFlight(0, state.prompt_len, first, 0)

    def _inject(self) -> None:
        tok = self.next_input
        start = time.perf_counter()
        ids = torch.tensor([[tok.token]], dtype=torch.long, device=self.device)  # [1, 1]
        out = self.stage.forward(tok.position, token_ids=ids)  # [1, 1, h]
        self.stats.stage_compute_seconds += time.perf_counter() - start
        header = Header(Op.STEP, tok.position, 1, tok.token, tok.epoch)
        self._share_local_anchors(Header(Op.REPORT, tok.position, 1, -1, tok.epoch))
        self.link.send_next(header, out)
        self.in_flight.append(tok)
        self.injected += 1
        self.next_input = None

    def _rows(self, state: DecodeState) -> list[tuple[int, int, int]]:
        """(position, token, depth): the pending completed token, in-flight tokens, the newest."""
        newest = self.next_input
        live = [t for t in self.in_flight if t.epoch == self.epoch]
        rows = []
        if not live or self.pending == live[0].position - 1:
            rows.append((self.pending, state.tokens[self.pending], self.n))
        rows += [(t.position, t.token, self.injected - t.index) for t in live]
        return rows + [(newest.position, newest.token, 0)]

    def _embedding(self, token: int) -> Tensor:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)  # [1, 1]
        return self.stage.model.embedding(ids, None)[0, 0]  # [h]

    def _share_local_anchors(self, header: Header) -> None:
        """Stage 0's taps: into the co-located host, or to the dedicated draft rank."""
        if not self.report_anchors[0]:
            return
        if self.host is not None:
            self.host.add_local(header.position, self.stage.taps, header.count)
        elif self.anchor_dest is not None:
            self._send_anchors(header)

    def _recv_verdict_material(self) -> tuple[Header, Optional[Tensor]]:
        last = self.link.last_rank
        header = self.link.recv_header(last)
        logits = None if self.sampling.is_greedy else \
            self.link.recv_tensor(last, (self.vocab_size,), torch.float32).cpu()  # verified on the host
        if header.op == Op.VERDICT:
            self.verdicts_received += 1
        return header, logits

    # ---- dedicated draft rank: the controller's side --------------------------------------------
    def _announce_sequence(self, state: DecodeState) -> None:
        if self.draft_rank is not None and self.placement.tp_rank == 0:
            self.link.send_to(self.draft_rank, Header(Op.SEQUENCE, 0, state.prompt_len),
                              torch.tensor(state.tokens, dtype=torch.long))

    def _send_rows(self, rows, h0: Optional[Tensor]) -> None:
        if self.placement.tp_rank != 0:
            return
        table = torch.full((self.n + 1, 3), -1, dtype=torch.long)  # [n + 1, (position, token, depth)]
        table[: len(rows)] = torch.tensor(rows, dtype=torch.long)
        payload = [table] + ([h0] if h0 is not None else [])
        header = Header(Op.ROWS, rows[-1][0], len(rows), self.rollback_to, self.epoch)
        self.link.send_to(self.draft_rank, header, *payload)
        self.rollback_to = -1

    def _recv_proposal(self) -> DraftProposal:
        start = time.perf_counter()
        header = self.link.recv_header(self.draft_rank)
        probs = None if self.sampling.is_greedy else \
            self.link.recv_tensor(self.draft_rank, (self.vocab_size,), torch.float32).cpu()
        self.stats.draft_seconds += time.perf_counter() - start  # waiting on the draft rank
        return DraftProposal(header.token, probs)

    # ============================ stages > 0 ===================================================
    def _prefill_and_report(self) -> None:
        while True:
            header = self.link.recv_prev()
            self._process_and_report(header)
            if header.position + header.count == header.token:  # token = prompt length
                return

    def _process_and_report(self, header: Header) -> None:
        """Run a ring message (a newer epoch truncates the cache to its position: prepare_write)."""
        hidden = self.link.recv_hidden(header.count)
        start = time.perf_counter()
        out = self.stage.forward(header.position, hidden=hidden)
        self.stats.stage_compute_seconds += time.perf_counter() - start
        if not self.is_last:
            self.link.send_next(header, out)
        else:
            self._send_verdict_material(header, out)
        if self.anchor_dest is not None:
            op = Op.PREFILL if header.op == Op.PREFILL else Op.REPORT
            self._send_anchors(Header(op, header.position, header.count, -1, header.epoch))

    def _send_verdict_material(self, header: Header, out: Tensor) -> None:
        last = out[0, -1].float()  # [V] logits of the newest row
        op = Op.PREFILL if header.op == Op.PREFILL else Op.VERDICT
        tensors = [] if self.sampling.is_greedy else [last]
        reply = Header(op, header.position, header.count, int(torch.argmax(last)), header.epoch)
        self.link.send_to_first(reply, *tensors)

    def _send_anchors(self, header: Header) -> None:
        taps = [self.stage.taps[k][:, 0] for k in self.report_anchors[self.placement.pp_rank]]
        self.link.send_to(self.anchor_dest, header, torch.stack(taps, dim=1))  # [count, A_s, h]


class DraftServer:
    """The dedicated draft rank: one ``generate`` per sequence, driven by stage 0's messages.

    Args:
        host: a DraftHost whose remote stages are every stage with anchors.
        link: reaches stage 0 (TP slot 0) and every stage-0 TP rank.
        stage0_ranks: global ranks of stage 0's TP ranks (each gets every proposal).
    """

    has_draft = True

    def __init__(self, host: DraftHost, link, stage0_ranks: list[int], sampling, seed: int = 0,
                 vocab_size: int = 0, use_h0: bool = True) -> None:
        self.host, self.link, self.stage0_ranks = host, link, stage0_ranks
        self.sampling = sampling
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size, self.use_h0 = vocab_size, use_h0
        self.prefill_chunk_size = 0

    @property
    def draft(self) -> Draft:
        return self.host.draft

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens, eos_token_ids=(), on_token=None) -> GenerationResult:
        from spd_megatron.metrics import DecodeStats

        controller = self.stage0_ranks[0]
        header = self.link.recv_header(controller)
        prompt = self.link.recv_tensor(controller, (header.count,), torch.long).tolist()
        self.host.begin(prompt)
        self.host.collect_prefill(len(prompt))
        while True:  # stage 0's channel carries ROWS(c), stage 0's anchors of cycle c, ..., STOP
            header = self.link.recv_header(controller)
            if header.op == Op.STOP:
                self.host.finish()
                self.link.flush()
                return GenerationResult([], DecodeStats(draft_seconds=self.host.draft_seconds))
            if header.op == Op.REPORT:
                self.host.receive_one(0, header)
            else:
                self._answer(controller, header)

    def _answer(self, controller: int, header: Header) -> None:
        table = self.link.recv_tensor(controller, (self.host.n + 1, 3), torch.long)
        h0 = self.link.recv_tensor(controller, (self.host.hidden_size,), self.host.dtype) if self.use_h0 else None
        if header.token >= 0:  # token field = rollback position
            self.host.rollback(header.token, header.epoch)
        rows = [tuple(r) for r in table[: header.count].tolist()]
        proposal = self.host.propose(rows, h0, self.sampling, self.generator)
        reply = Header(Op.PROPOSAL, header.position + 1, 0, proposal.token, header.epoch)
        tensors = [] if self.sampling.is_greedy else [proposal.probs]
        for rank in self.stage0_ranks:
            self.link.send_to(rank, reply, *tensors)
