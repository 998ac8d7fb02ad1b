"""Turning target logits into the next token: greedy, or temperature -> top-k -> top-p sampling.

Pure functions (no communication). The warper order matches Hugging Face's, so a sampled run
draws from the same distribution as ``generate(do_sample=True, ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def warp_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p; removed entries become -inf.

    Args:
        logits: [..., V].
    Returns:
        [..., V] float32 warped logits.
    """
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # ascending, as HF TopPLogitsWarper
        remove_sorted = cum <= (1 - params.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def target_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution a sampled token is drawn from. [..., V] -> [..., V]."""
    return warp_logits(logits, params).softmax(dim=-1)


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from a [V] logit vector (argmax when greedy).

    Greedy runs where the logits are; sampling runs on the host, where the seeded CPU generator
    is (a [V] row is moved once; a no-op for CPU logits).
    """
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = target_probs(logits.float().cpu(), params)
    return int(torch.multinomial(probs, 1, generator=generator))
