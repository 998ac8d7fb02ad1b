#!/usr/bin/env python
"""A custom SPD schedule: prompt-lookup drafting in front of the PDM, and a verdict log.

    torchrun --nproc-per-node 2 examples/custom_schedule.py schedule.name=spd_lookup [key=value ...]

Shows the extension points another project uses: a Draft subclass (the draft policy), a
SpeculativeSchedule subclass that overrides hooks (never ``generate``), and the registry that
makes it selectable from the command line. Output stays lossless: verification is untouched.
"""

from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spd_megatron.draft.base import Draft, DraftContext, DraftProposal  # noqa: E402
from spd_megatron.schedule import register_schedule  # noqa: E402
from spd_megatron.schedule.spd import SPDSchedule  # noqa: E402

log = logging.getLogger("spd_lookup")


class PromptLookupDraft(Draft):
    """Propose the token that followed the last occurrence of the current n-gram, else ask the PDM."""

    def __init__(self, fallback: Draft, ngram: int = 3) -> None:
        self.fallback, self.ngram = fallback, ngram
        self.anchor_indices = fallback.anchor_indices
        self.hits = self.calls = 0

    def start(self, prompt_rows):
        self.fallback.start(prompt_rows)

    def truncate(self, length):
        self.fallback.truncate(length)

    def propose(self, ctx: DraftContext, params, generator) -> DraftProposal:
        self.calls += 1
        fallback = self.fallback.propose(ctx, params, generator)  # keeps the PDM cache in step
        if not params.is_greedy:  # a lookup draft has no q: keep sampling lossless via the PDM
            return fallback
        tail = ctx.tokens[-self.ngram:]
        for start in range(len(ctx.tokens) - self.ngram - 1, -1, -1):
            if ctx.tokens[start:start + self.ngram] == tail:
                self.hits += 1
                return DraftProposal(ctx.tokens[start + self.ngram])
        return fallback


@register_schedule("spd_lookup")
class LookupSPDSchedule(SPDSchedule):
    """SPD whose stage-0 draft is PromptLookupDraft(PDM); logs every verdict."""

    def __init__(self, *args, draft=None, **kwargs) -> None:
        super().__init__(*args, draft=PromptLookupDraft(draft) if draft is not None else None, **kwargs)
        self.verdicts: list[str] = []

    def commit(self, state, proposal, verdict):
        if verdict is not None:
            self.verdicts.append("A")
            log.info("cycle %d: accepted %d at %d", state.cycle, verdict.token_id, verdict.position)
        super().commit(state, proposal, verdict)

    def rollback(self, state, verdict):
        self.verdicts.append("R")
        log.info("cycle %d: rejected at %d, recovered %d", state.cycle, verdict.position, verdict.token_id)
        super().rollback(state, verdict)


if __name__ == "__main__":
    from spd_megatron.runner import main

    sys.exit(main(sys.argv[1:] if any(a.startswith("schedule.name=") for a in sys.argv[1:])
                  else ["schedule.name=spd_lookup", *sys.argv[1:]]))
