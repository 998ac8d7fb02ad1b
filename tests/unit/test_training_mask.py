"""The structured mask equals a brute-force construction of the spec's visible sets."""

from __future__ import annotations

import itertools

import pytest

from spd_megatron.draft.training.mask import block_types, depth_types, required_type, visible


def brute_force(types, blocks, seq_len, fill):
    """Straight from docs/SPD.md 3.3 / 3.4, one (query, key) pair at a time."""
    n = len(types) - 1
    mindepth = {t: min(d for d in range(n + 1) if types[d] == t) for t in blocks}
    rows = [(b, t) for b in blocks for t in range(seq_len)]
    out = set()
    for qi, (aq, t) in enumerate(rows):
        for ki, (ak, T) in enumerate(rows):
            if T > t:
                continue
            delta = t - T
            req = types[min(n, mindepth[aq] + delta)]
            if fill < n and delta >= fill:
                req = types[n]
            if ak == req:
                out.add((qi, ki))
    return out


CASES = [  # split (n = len), anchors
    ((2, 2), [0, 2, 3, 4]),
    ((1, 1, 1, 1), [0, 1, 2, 3, 4]),
    ((3, 2, 3), [0, 3, 7]),
    ((8, 8, 8, 8), [0, 8, 16, 24, 31]),
]


@pytest.mark.parametrize("split,anchors", CASES)
def test_mask_equals_brute_force_for_every_fill(split, anchors):
    n = len(split)
    types = depth_types(n, anchors, split)
    blocks = block_types(n, anchors, split)
    for fill in range(1, n + 1):
        got = visible(types, blocks, 7, fill).nonzero().tolist()
        assert {tuple(x) for x in got} == brute_force(types, blocks, 7, fill), fill


def test_g0_query_sees_each_earlier_token_at_its_inference_depth():
    split, anchors = (1, 1, 1, 1), [0, 1, 2, 3, 4]  # a(d) = d: one type per depth
    types, blocks = depth_types(4, anchors, split), block_types(4, anchors, split)
    seq_len, t = 9, 8
    allowed = visible(types, blocks, seq_len, fill=4)
    g0 = blocks.index(0)
    row = allowed[g0 * seq_len + t]
    seen = {T: blocks[k // seq_len] for k in row.nonzero().flatten().tolist() for T in [k % seq_len]}
    assert seen == {8: 0, 7: 1, 6: 2, 5: 3, 4: 4, 3: 4, 2: 4, 1: 4, 0: 4}
    refill = visible(types, blocks, seq_len, fill=2)[g0 * seq_len + t]
    seen = {k % seq_len: blocks[k // seq_len] for k in refill.nonzero().flatten().tolist()}
    assert seen == {8: 0, 7: 1, **{T: 4 for T in range(7)}}  # only 2 in flight, the rest complete
    assert required_type(3, 0, 4, types) == 3
