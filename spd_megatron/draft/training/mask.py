"""The block layout and structured attention mask that simulate every partial depth at once.

Rows are ``m`` blocks of the whole sequence, deepest aggregation type first:
``[g_{m-1}(0..S-1) | ... | g_0(0..S-1)]``. Query (type aq, time t) with representative depth
``dq = mindepth(aq)`` sees key (type ak, time T) iff ``T <= t`` and ``ak == req(t - T)`` where
``req(d) = a(min(n, dq + d))`` (the staircase), except that with ``fill < n`` every key at
``d >= fill`` must be the deepest type (older tokens are complete). The g_0 query at t then sees
token t - d exactly as the draft sees it at inference (docs/SPD.md 3.3, 3.4). Pure torch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from spd_megatron.draft.features import aggregation_type


def depth_types(num_stages: int, anchors: Sequence[int], split: Sequence[int]) -> list[int]:
    """a(d) for d = 0..n."""
    return [aggregation_type(d, anchors, split) for d in range(num_stages + 1)]


def block_types(num_stages: int, anchors: Sequence[int], split: Sequence[int]) -> list[int]:
    """The aggregation types that get a block, deepest first (unreachable types get none)."""
    return sorted(set(depth_types(num_stages, anchors, split)), reverse=True)


def required_type(delta: int, query_depth: int, fill: int, types: list[int]) -> int:
    """req(d): the type a key d positions back must have for a query of representative depth dq."""
    n = len(types) - 1
    if fill < n and delta >= fill:
        return types[n]
    return types[min(n, query_depth + delta)]


def visible(types: list[int], blocks: list[int], seq_len: int, fill: int) -> Tensor:
    """Boolean [m S, m S]: True where the query row may attend to the key row."""
    mindepth = {t: types.index(t) for t in blocks}  # smallest depth mapped to each type
    m = len(blocks)
    t = torch.arange(seq_len)
    delta = t.view(-1, 1) - t.view(1, -1)  # [S, S] query time - key time
    allowed = torch.zeros(m * seq_len, m * seq_len, dtype=torch.bool)
    for qi, qtype in enumerate(blocks):
        req = _required_types(delta.clamp(min=0), mindepth[qtype], fill, types)  # [S, S]
        for ki, ktype in enumerate(blocks):
            ok = (delta >= 0) & (req == ktype)
            allowed[qi * seq_len:(qi + 1) * seq_len, ki * seq_len:(ki + 1) * seq_len] = ok
    return allowed


def _required_types(delta: Tensor, query_depth: int, fill: int, types: list[int]) -> Tensor:
    n = len(types) - 1
    table = torch.tensor(types)  # [n + 1]
    req = table[(query_depth + delta).clamp(max=n)]
    if fill < n:
        req = torch.where(delta >= fill, torch.tensor(types[n]), req)
    return req


def attention_mask(types: list[int], blocks: list[int], seq_len: int, fill: int) -> Tensor:
    """Megatron's convention: [1, 1, m S, m S] bool with True = masked."""
    return (~visible(types, blocks, seq_len, fill)).view(1, 1, len(blocks) * seq_len, -1)


def block_positions(num_blocks: int, seq_len: int) -> Tensor:
    """RoPE position of every row: t, repeated per block. [m S]."""
    return torch.arange(seq_len).repeat(num_blocks)
