"""The draft vocabulary: the most frequent assistant tokens, and the id mappings."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass
class DraftVocab:
    token_ids: list[int]  # draft index -> target id
    coverage: float  # share of assistant-token occurrences inside the vocabulary

    def to_draft(self, vocab_size: int) -> torch.Tensor:
        """target id -> draft index, -1 outside the vocabulary. [V]."""
        return draft_index(torch.tensor(self.token_ids), vocab_size)


def draft_index(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V_d] target ids -> [V] table of draft indices, -1 outside the draft vocabulary."""
    table = torch.full((vocab_size,), -1, dtype=torch.long)
    table[token_ids] = torch.arange(len(token_ids))
    return table


def build_draft_vocab(examples, size: int, always: tuple[int, ...] = ()) -> DraftVocab:
    """The ``size`` most frequent assistant tokens (plus ``always``, e.g. EOS), sorted by id."""
    counts = _assistant_counts(examples)
    chosen = set(always) | {t for t, _ in counts.most_common(max(size - len(always), 0))}
    return DraftVocab(sorted(chosen), _coverage(counts, chosen))


def existing_draft_vocab(examples, token_ids: list[int]) -> DraftVocab:
    """A given vocabulary (a draft being continued) with its coverage of ``examples``."""
    return DraftVocab(list(token_ids), _coverage(_assistant_counts(examples), set(token_ids)))


def _assistant_counts(examples) -> Counter:
    counts = Counter()
    for ex in examples:
        counts.update(t for t, a in zip(ex.ids, ex.assistant) if a)
    return counts


def _coverage(counts: Counter, chosen: set[int]) -> float:
    total = sum(counts.values())
    return sum(counts[t] for t in chosen) / total if total else 0.0
