"""The draft interface the SPD schedule calls on the draft-owning rank, and simple drafts.

A draft sees a DraftContext (the ids so far, the rows the PDM would use with their depths and
anchor hidden states) and returns a DraftProposal (token, and its distribution q when sampling).
The Oracle/Adversarial/Random drafts need no features; they exist to test the schedule's
losslessness and its accept/reject paths, and as baselines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from spd_megatron.sampling.logits import SamplingParams, target_probs


@dataclass
class DraftRow:
    """One token as the draft sees it: position, id, depth (stages done) and anchors h^k [h]."""

    position: int
    token: int
    depth: int
    anchors: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class DraftContext:
    """Everything a draft may use to predict the token at ``position``.

    tokens: ids at positions [0, position) (verified prefix + unverified in-flight drafts).
    rows: the pending completed token (depth n, if any) then the in-flight tokens, oldest first,
        newest (depth 0) last; positions are contiguous and end at ``position - 1``.
    committed: number of verified positions (the draft cache may keep rows below it).
    """

    position: int
    tokens: list[int]
    rows: list[DraftRow]
    committed: int


@dataclass(frozen=True)
class DraftProposal:
    token: int
    probs: Optional[Tensor] = None  # q over the full vocabulary [V] (sampling only)


class Draft(ABC):
    """Proposes one token per cycle. Subclasses set ``anchor_indices`` if they need features."""

    anchor_indices: tuple[int, ...] = ()

    def start(self, prompt_rows: list[DraftRow]) -> None:
        """A new sequence: the prompt's rows (completed, with anchors if requested)."""

    def truncate(self, length: int) -> None:
        """Forget everything at positions >= length (after a reject)."""

    @abstractmethod
    def propose(self, ctx: DraftContext, params: SamplingParams, generator: torch.Generator) -> DraftProposal:
        """The draft token for ``ctx.position``."""


class ReferenceDraft(Draft):
    """Base of drafts that read a known continuation (full sequence incl. prompt)."""

    def __init__(self, reference: Sequence[int], vocab_size: int) -> None:
        self.reference, self.vocab_size = list(reference), vocab_size

    def reference_token(self, position: int) -> int:
        return self.reference[position] if position < len(self.reference) else 0


class OracleDraft(ReferenceDraft):
    """Always right under greedy decoding when ``reference`` is the target's greedy output."""

    def propose(self, ctx, params, generator):
        return DraftProposal(self.reference_token(ctx.position), _one_hot(self.reference_token(ctx.position), self.vocab_size))


class AdversarialDraft(ReferenceDraft):
    """Always wrong under greedy decoding: the reference token plus one."""

    def propose(self, ctx, params, generator):
        token = (self.reference_token(ctx.position) + 1) % self.vocab_size
        return DraftProposal(token, _one_hot(token, self.vocab_size))


class RandomDraft(Draft):
    """Samples from fixed random logits (a deliberately poor, seeded draft)."""

    def __init__(self, vocab_size: int, seed: int = 0, scale: float = 2.0) -> None:
        self.vocab_size, self.seed, self.scale = vocab_size, seed, scale

    def propose(self, ctx, params, generator):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.position)
        logits = torch.randn(self.vocab_size, generator=gen) * self.scale  # [V], fixed per position
        if params.is_greedy:
            return DraftProposal(int(torch.argmax(logits)))
        q = target_probs(logits, params)
        return DraftProposal(int(torch.multinomial(q, 1, generator=generator)), q)


def _one_hot(token: int, vocab_size: int) -> Tensor:
    q = torch.zeros(vocab_size)
    q[token] = 1.0
    return q
