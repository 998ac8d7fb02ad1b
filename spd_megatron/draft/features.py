"""Anchors and depths: which hidden states the draft aggregates, and which a token has by now.

Hidden-state index k: h^0 = embedding output, h^k = residual stream after k layers (pre-final-norm).
A token at depth d (stages done) has every h^k with k <= avail(d) = layers of stages [0, d).
Anchor set B = [b_0 = 0 < b_1 < ...]; aggregation type i concatenates h^{b_0..b_i}; a token at
depth d uses type a(d) = the largest i with b_i <= avail(d). Pure functions, no torch.
"""

from __future__ import annotations

from typing import Sequence

from spd_megatron.errors import SPDError


def available_index(depth: int, split: Sequence[int]) -> int:
    """avail(d): hidden-state indices a token has after ``depth`` stages."""
    return sum(split[:depth])


def default_anchors(split: Sequence[int]) -> list[int]:
    """The spec's auto rule {0, lps, 3 lps, 6 lps, L-1} clamped to [0, L], with ``k lps`` read as
    the end of stage k: the same anchors for stages of equal size, and otherwise the newest
    token's features are the deepest it has (e.g. [18, 12] -> [0, 18, 29, 30], not layer 15)."""
    num_layers = sum(split)
    ends = [sum(split[:k]) if k <= len(split) else num_layers for k in (1, 3, 6)]
    return sorted({min(max(b, 0), num_layers) for b in (0, *ends, num_layers - 1)})


def check_anchors(anchors: Sequence[int], num_layers: int) -> list[int]:
    anchors = [int(b) for b in anchors]
    if not anchors or anchors[0] != 0 or sorted(set(anchors)) != anchors or anchors[-1] > num_layers:
        raise SPDError(f"draft anchors {anchors} must be strictly increasing, start at 0 and end "
                       f"at most at the layer count {num_layers}")
    return anchors


def aggregation_type(depth: int, anchors: Sequence[int], split: Sequence[int]) -> int:
    """a(d): index of the largest anchor a token at ``depth`` has produced."""
    avail = available_index(depth, split)
    return max(i for i, b in enumerate(anchors) if b <= avail)


def producing_stage(index: int, split: Sequence[int]) -> int:
    """The stage whose forward produces h^index (h^0: the embedding on stage 0)."""
    if index == 0:
        return 0
    end = 0
    for stage, count in enumerate(split):
        end += count
        if index <= end:
            return stage
    raise ValueError(f"hidden-state index {index} beyond {end} layers")


def stage_anchors(stage: int, anchors: Sequence[int], split: Sequence[int]) -> list[int]:
    """Anchors that ``stage`` produces (and reports to the draft rank), ascending."""
    return [b for b in anchors if producing_stage(b, split) == stage]
