"""Sampling warpers against Hugging Face's own, and the attention masks (pure, no processes)."""

from __future__ import annotations

import pytest
import torch

from spd_megatron.sampling.logits import SamplingParams, sample_token, target_probs, warp_logits
from spd_megatron.target.kv_cache import causal_mask


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)])
def test_warp_matches_hf_processors(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = warp_logits(logits, SamplingParams(temperature, top_k, top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1), rtol=1e-5, atol=1e-6)


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    assert sample_token(logits, SamplingParams(), torch.Generator()) == 1
    params = SamplingParams(temperature=1.0)
    draws = [sample_token(logits, params, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_token(logits, params, gen) for _ in range(4000)]), minlength=4)
    expected = target_probs(logits, params) * 4000
    assert torch.all((counts - expected).abs() < 5 * expected.sqrt() + 1)  # ~5 sigma


def test_causal_mask_shapes_and_window():
    assert causal_mask(5, 1) is None  # one query over the cache: nothing to mask
    m = causal_mask(2, 3)  # queries at 2, 3, 4 over keys 0..4
    assert m.shape == (1, 1, 3, 5)
    assert m[0, 0].tolist() == [[False, False, False, True, True],
                                [False, False, False, False, True],
                                [False, False, False, False, False]]
    w = causal_mask(3, 1, sliding_window=2)  # query 3 sees keys 2, 3 only
    assert w[0, 0, 0].tolist() == [True, True, False, False]
    assert causal_mask(0, 1, sliding_window=4) is None
