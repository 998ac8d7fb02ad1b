"""DraftHost: runs the draft where it is placed (stage 0, or a dedicated draft rank).

It keeps the anchor states that stages report, per position and epoch, mirrors the token ids the
draft may look at, and turns the controller's row list into a DraftContext. Anchor reports come
through the StageLink (from every stage whose anchors are remote) or, for a draft co-located with
stage 0, straight from stage 0's taps. The draft itself never communicates.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import Tensor

from spd_megatron.draft.base import Draft, DraftContext, DraftProposal, DraftRow
from spd_megatron.parallel.link import Header, Op, StageLink


class DraftHost:
    """Feature store + draft calls for one sequence at a time.

    Args:
        draft: the Draft.
        link: receives anchor reports.
        report_anchors: report_anchors[s] = anchors stage s produces.
        remote: {stage: global rank} of the stages whose anchors arrive as messages.
        num_stages, hidden_size, dtype: shapes of the reports.
    """

    def __init__(self, draft: Draft, link: StageLink, report_anchors: list[list[int]],
                 remote: dict[int, int], num_stages: int, hidden_size: int, dtype: torch.dtype) -> None:
        self.draft, self.link = draft, link
        self.report_anchors, self.remote = report_anchors, remote
        self.n, self.hidden_size, self.dtype = num_stages, hidden_size, dtype
        self.draft_seconds = 0.0

    # ---- sequence lifecycle --------------------------------------------------------------------
    def begin(self, prompt: list[int]) -> None:
        self.tokens = list(prompt)
        self.features: dict[int, dict[int, Tensor]] = {}
        self.epoch, self.injected = 0, 0
        self.draft_seconds = 0.0  # per sequence, like every other timer
        self.cut: dict[int, int] = {}  # ended epoch -> its reject position (earlier rows stay valid)
        self.reports_from = {s: 0 for s in self.remote}

    def collect_prefill(self, prompt_len: int, received: frozenset = frozenset()) -> None:
        """Anchor reports of every prompt chunk from every remote stage, then the draft's prefill.

        ``received``: stages whose prefill reports the caller already took with ``receive_one``.
        """
        for stage in self.remote:
            covered = 0 if stage not in received else prompt_len
            while covered < prompt_len:
                header = self._recv(stage)
                covered = header.position + header.count
        rows = [DraftRow(p, self.tokens[p], self.n, self.features.get(p, {})) for p in range(prompt_len)]
        self.draft.start(rows)

    def add_local(self, position: int, taps: dict[int, Tensor], count: int) -> None:
        """Stage 0's own taps ([count, 1, h] each) when the draft shares its process."""
        for k, hidden in taps.items():
            for i in range(count):
                self.features.setdefault(position + i, {})[k] = hidden[i, 0].clone()

    def rollback(self, position: int, epoch: int) -> None:
        """A reject at ``position``: newer features and draft rows are gone; a new epoch starts."""
        self.cut[self.epoch] = position
        self.epoch = epoch
        self.features = {p: f for p, f in self.features.items() if p < position}
        del self.tokens[position:]
        self.draft.truncate(position)

    def finish(self) -> None:
        """Drain the anchor reports still on their way (one per injected token per stage)."""
        for stage in self.remote:
            while self.reports_from[stage] < self.injected:
                self._recv(stage)

    # ---- one cycle -----------------------------------------------------------------------------
    def propose(self, rows: list[tuple[int, int, int]], h0: Optional[Tensor], sampling,
                generator) -> DraftProposal:
        """rows: (position, token, depth) oldest first, the newest (depth 0) last; h0 its embedding."""
        for stage in self.remote:  # stage s reported tokens injected <= injected - 1 - s by now
            while self.reports_from[stage] < self.injected - stage:
                self._recv(stage)
        start = time.perf_counter()
        proposal = self.draft.propose(self._context(rows, h0), sampling, generator)
        self.draft_seconds += time.perf_counter() - start
        self.injected += 1
        pending = rows[0][0]
        self.features = {p: f for p, f in self.features.items() if p >= pending}
        return proposal

    def _context(self, rows, h0: Optional[Tensor]) -> DraftContext:
        draft_rows = []
        for position, token, depth in rows:
            if position < len(self.tokens):
                self.tokens[position] = token
            else:
                self.tokens.append(token)
            draft_rows.append(DraftRow(position, token, depth, self.features.get(position, {})))
        if h0 is not None:
            draft_rows[-1].anchors = {**draft_rows[-1].anchors, 0: h0}
        newest = rows[-1][0]
        del self.tokens[newest + 1:]
        first_pos, _, first_depth = rows[0]
        committed = first_pos + 1 if first_depth >= self.n else first_pos
        return DraftContext(newest + 1, list(self.tokens), draft_rows, committed)

    def receive_one(self, stage: int, header: Optional[Header] = None) -> Header:
        """One anchor report from ``stage`` (for channels shared with other messages).

        ``header``: the report's header when the caller already read it off the channel.
        """
        return self._recv(stage, header)

    def _recv(self, stage: int, header: Optional[Header] = None) -> Header:
        rank = self.remote[stage]
        header = header or self.link.recv_header(rank)
        anchors = self.report_anchors[stage]
        shape = (header.count, len(anchors), self.hidden_size)  # [count, A_s, h]
        payload = self.link.recv_tensor(rank, shape, self.dtype)
        limit = None if header.epoch == self.epoch else self.cut.get(header.epoch, -1)
        for i in range(header.count):
            position = header.position + i
            if limit is None or position < limit:  # a late report of a token that was verified
                self.features.setdefault(position, {}).update({k: payload[i, j] for j, k in enumerate(anchors)})
        if header.op == Op.REPORT:
            self.reports_from[stage] += 1
        return header
