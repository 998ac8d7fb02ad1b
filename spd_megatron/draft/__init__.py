"""Drafts: what proposes the next token each SPD cycle (no communication in here)."""

from spd_megatron.draft.base import (  # noqa: F401
    AdversarialDraft,
    Draft,
    DraftContext,
    DraftProposal,
    OracleDraft,
    RandomDraft,
)
