"""parallel.threads_per_rank: the node's cores shared evenly by its ranks, unless told otherwise."""

from __future__ import annotations

import pytest

from spd_megatron.config import load_config
from spd_megatron.errors import SPDError
from spd_megatron.parallel.threads import threads_per_rank


def test_rule_shares_the_cores_and_keeps_explicit_settings():
    assert threads_per_rank(0, local_procs=1, cores=2, environ={}) == 2  # one process: every core
    assert threads_per_rank(0, local_procs=2, cores=2, environ={}) == 1  # one rank per core
    assert threads_per_rank(0, local_procs=3, cores=2, environ={}) == 1  # never 0
    assert threads_per_rank(0, local_procs=0, cores=8, environ={}) == 8  # launcher did not say: 1 process
    assert threads_per_rank(0, local_procs=2, cores=2, environ={"OMP_NUM_THREADS": "2"}) is None  # kept
    assert threads_per_rank(3, local_procs=2, cores=2, environ={"OMP_NUM_THREADS": "1"}) == 3  # config wins


def test_negative_threads_per_rank_is_refused():
    with pytest.raises(SPDError, match="threads_per_rank"):
        load_config(None, ["parallel.threads_per_rank=-1"])


def test_model_compile_accepts_on_and_off_although_yaml_reads_them_as_booleans():
    assert load_config(None, ["model.compile=on"]).model.compile == "on"
    assert load_config(None, ["model.compile=off"]).model.compile == "off"
    assert load_config(None, []).model.compile == "auto"
    with pytest.raises(SPDError, match="model.compile=sometimes must be auto, on or off"):
        load_config(None, ["model.compile=sometimes"])
