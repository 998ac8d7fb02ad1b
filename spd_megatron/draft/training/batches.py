"""Which conversations make up each training batch, and which rank runs which of them.

A global micro-batch is a list of conversation indices whose lengths sum to at most
``batch_tokens``. The stream of micro-batches depends only on the lengths, the seed and
``batch_tokens``, never on the world size: every rank computes the whole stream, then runs its
shard (``shard``), so DP=2 and one process see the same global batches (issue 12).
Each epoch is a seeded shuffle; inside windows of ``GROUP`` conversations the lengths are sorted
so that a padded batch wastes little, and the order of the window's batches is shuffled again.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

from spd_megatron.errors import SPDError

GROUP = 256  # conversations sorted by length together


def check_batch_tokens(batch_tokens: int, max_len: int, world: int) -> None:
    """Every rank must get at least one conversation of every global micro-batch."""
    if batch_tokens % world:
        raise SPDError(f"train.batch_tokens={batch_tokens} is not divisible by the {world} data-parallel "
                       f"ranks; use a multiple of {world} (or launch a world size that divides it)")
    if batch_tokens < world * max_len:
        raise SPDError(f"train.batch_tokens={batch_tokens} is less than {world} ranks x train.max_len="
                       f"{max_len}, so a rank could get no conversation; use at least {world * max_len}")


def batch_stream(lengths: Sequence[int], batch_tokens: int, seed: int) -> Iterator[list[int]]:
    """Global micro-batches forever (epoch after epoch). ``batch_tokens=0``: one conversation each."""
    epoch = 0
    pending: list[int] = []
    while True:
        order = list(range(len(lengths)))
        random.Random(seed + epoch).shuffle(order)
        if not batch_tokens:
            yield from ([i] for i in order)
        for start in range(0, len(order) if batch_tokens else 0, GROUP):
            window = pending + sorted(order[start:start + GROUP], key=lambda i: -lengths[i])
            batches, pending = _greedy(window, lengths, batch_tokens)
            random.Random(seed * 7919 + epoch * 104729 + start).shuffle(batches)
            yield from batches
        epoch += 1


def _greedy(window: list[int], lengths: Sequence[int], batch_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Cut ``window`` into batches that overflow ``batch_tokens`` if one more were added; the rest carries over."""
    batches, current, tokens = [], [], 0
    for i in window:
        if current and tokens + lengths[i] > batch_tokens:
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return batches, current


def shard(batch: list[int], lengths: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's conversations: longest first, each to the rank with the fewest tokens so far."""
    load = [0] * world
    owner = {}
    for i in sorted(batch, key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[r] = r, load[r] + lengths[i]
    return [i for i in batch if owner[i] == rank]


def step_batches(stream: Iterator[list[int]], accumulate: int) -> list[list[int]]:
    """The next optimizer step's global micro-batches."""
    return [next(stream) for _ in range(accumulate)]
