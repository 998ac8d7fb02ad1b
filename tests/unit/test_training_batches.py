"""Token-sized global batches: independent of the world size, shards cover each batch exactly once."""

from __future__ import annotations

import itertools
import random

import pytest

from spd_megatron.draft.training.batches import batch_stream, check_batch_tokens, shard
from spd_megatron.errors import SPDError


def test_batches_respect_the_token_budget_and_cover_every_conversation_per_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(10, 100) for _ in range(600)]
    batches = list(itertools.islice(batch_stream(lengths, 400, seed=3), 200))
    assert all(sum(lengths[i] for i in b) <= 400 for b in batches)
    assert all(sum(lengths[i] for i in b) > 300 for b in batches)  # filled until the next would overflow
    seen = [i for b in batches for i in b]
    assert sorted(set(seen[:550])) == sorted(seen[:550])  # no repeats inside the first epoch
    assert set(seen) == set(range(600))
    again = list(itertools.islice(batch_stream(lengths, 400, seed=3), 200))
    assert again == batches


def test_one_conversation_per_batch_without_a_token_budget():
    batches = list(itertools.islice(batch_stream([5] * 10, 0, seed=1), 20))
    assert all(len(b) == 1 for b in batches) and sorted(b[0] for b in batches[:10]) == list(range(10))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_partition_the_batch_and_balance_tokens(world):
    lengths = [50, 40, 30, 30, 20, 10, 5]
    batch = list(range(7))
    parts = [shard(batch, lengths, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == batch
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)


def test_a_budget_the_world_cannot_split_fails_in_one_line():
    check_batch_tokens(1024, 256, 2)
    with pytest.raises(SPDError, match="not divisible by the 3 data-parallel ranks"):
        check_batch_tokens(1024, 256, 3)
    with pytest.raises(SPDError, match="a rank could get no conversation"):
        check_batch_tokens(256, 256, 2)
