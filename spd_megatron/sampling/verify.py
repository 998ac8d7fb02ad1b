"""Verification of one draft token against the target: pure functions, lossless by construction.

Greedy: accept iff the draft equals the target's argmax, else emit the argmax (the *recovered*
token). Sampling: single-draft speculative sampling: accept with probability min(1, p(x)/q(x)),
else draw from norm(max(0, p - q)); the committed token is then distributed exactly as p.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from spd_megatron.sampling.logits import SamplingParams, target_probs


def verify_greedy(draft_token: int, target_logits: Tensor) -> tuple[bool, int]:
    """Returns (accepted, committed token). target_logits: [V]."""
    best = int(torch.argmax(target_logits))
    return best == draft_token, best


def verify_stochastic(draft_token: int, draft_probs: Tensor, target_logits: Tensor,
                      params: SamplingParams, generator: torch.Generator) -> tuple[bool, int]:
    """Speculative sampling with one draft ``x ~ q``.

    Args:
        draft_token: the draft x.
        draft_probs: q over the full vocabulary [V] (zeros outside a draft vocabulary).
        target_logits: raw target logits [V]; the same warpers as q are applied.
    Returns:
        (accepted, committed token).

    Runs on the host (the generator is a CPU generator); device tensors are moved once.
    """
    draft_probs = draft_probs.cpu()
    p = target_probs(target_logits.float().cpu(), params)  # [V]
    q_x = float(draft_probs[draft_token])
    u = float(torch.rand((), generator=generator))
    if q_x > 0 and u * q_x <= float(p[draft_token]):
        return True, draft_token
    residual = torch.clamp(p - draft_probs, min=0)
    total = float(residual.sum())
    dist = residual / total if total > 1e-12 else p
    return False, int(torch.multinomial(dist, 1, generator=generator))


def verify(draft_token: int, draft_probs: Optional[Tensor], target_logits: Tensor,
           params: SamplingParams, generator: torch.Generator) -> tuple[bool, int]:
    """Greedy or stochastic verification, as ``params`` says."""
    if params.is_greedy:
        return verify_greedy(draft_token, target_logits)
    return verify_stochastic(draft_token, draft_probs, target_logits, params, generator)
