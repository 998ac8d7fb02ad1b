"""Verification rules on hand-built distributions (pure)."""

from __future__ import annotations

import torch

from spd_megatron.sampling.logits import SamplingParams, target_probs
from spd_megatron.sampling.verify import verify, verify_greedy, verify_stochastic


def test_greedy_accepts_the_argmax_and_recovers_it_otherwise():
    logits = torch.tensor([0.0, 3.0, 1.0])
    assert verify_greedy(1, logits) == (True, 1)
    assert verify_greedy(2, logits) == (False, 1)


def test_stochastic_output_follows_p_whatever_q():
    """The committed token's law equals p for a q that is very unlike p (5-sigma bounds)."""
    params = SamplingParams(temperature=1.0)
    target_logits = torch.tensor([2.0, 0.5, 0.0, -1.0])
    p = target_probs(target_logits, params)
    q = torch.tensor([0.05, 0.05, 0.1, 0.8])  # a poor draft
    gen = torch.Generator().manual_seed(0)
    n, counts, accepted = 20000, torch.zeros(4), 0
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=gen))
        ok, token = verify_stochastic(draft, q, target_logits, params, gen)
        counts[token] += 1
        accepted += ok
    assert torch.all((counts - n * p).abs() < 5 * (n * p * (1 - p)).sqrt())
    expected_accept = float(torch.minimum(p, q).sum())  # P(accept) = sum min(p, q)
    assert abs(accepted / n - expected_accept) < 5 * (expected_accept * (1 - expected_accept) / n) ** 0.5


def test_draft_outside_q_support_is_rejected_and_warpers_apply():
    params = SamplingParams(temperature=1.0, top_k=1)
    q = torch.tensor([0.0, 1.0, 0.0])
    ok, token = verify(0, q, torch.tensor([5.0, 1.0, 0.0]), params, torch.Generator().manual_seed(1))
    assert not ok and token == 0  # top-k 1: p is one-hot on 0; the residual p - q is too
