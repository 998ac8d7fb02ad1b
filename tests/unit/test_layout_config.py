"""Rank/layer arithmetic and the config tree: pure, no processes."""

from __future__ import annotations

import pytest

from spd_megatron.config import load_config
from spd_megatron.errors import SPDError
from spd_megatron.parallel.init import read_launch_env
from spd_megatron.parallel.layout import RankLayout, layer_ranges, resolve_layout, split_layers


def test_rank_layout_tp_fastest():
    layout = RankLayout(tensor_parallel_size=2, pipeline_parallel_size=4)
    assert layout.world_size == 8
    assert [(layout.pp_rank(r), layout.tp_rank(r)) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(layout.rank_of(layout.pp_rank(r), layout.tp_rank(r)) == r for r in range(8))


def test_resolve_layout_defaults_pp_to_world_over_tp():
    assert resolve_layout(8, 2, 0) == RankLayout(2, 4)
    assert resolve_layout(1, 1, 0) == RankLayout(1, 1)


@pytest.mark.parametrize("world,tp,pp", [(2, 2, 2), (3, 2, 0), (4, 1, 2)])
def test_resolve_layout_rejects_wrong_process_count(world, tp, pp):
    with pytest.raises(SPDError, match="nproc-per-node|processes"):
        resolve_layout(world, tp, pp)


def test_split_layers_balanced_and_uneven():
    assert split_layers(30, 4) == [8, 8, 7, 7]
    assert split_layers(4, 3) == [2, 1, 1]
    assert split_layers(30, 4, [10, 10, 5, 5]) == [10, 10, 5, 5]
    assert layer_ranges([8, 8, 7, 7]) == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_split_layers_errors():
    with pytest.raises(SPDError, match="larger than the model's 4 layers"):
        split_layers(4, 5)
    with pytest.raises(SPDError, match="summing to 30"):
        split_layers(30, 2, [10, 10])


def test_launch_env_torchrun_mpi_and_single():
    assert read_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}).rank == 3
    ompi = read_launch_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                            "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (ompi.rank, ompi.world_size, ompi.launcher) == (1, 2, "mpi")
    assert read_launch_env({"PMI_RANK": "0", "PMI_SIZE": "2"}).world_size == 2
    assert read_launch_env({}).launcher == "single"


def test_config_presets_and_overrides():
    cfg = load_config("default", ["parallel.tensor_parallel_size=2", "sampling.temperature=0.5",
                                  "prompt=hi", "max_new_tokens=7"])
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.sampling.temperature == 0.5
    assert cfg.prompt == "hi" and cfg.max_new_tokens == 7
    assert load_config("tiny").model.max_seq_len == 256


@pytest.mark.parametrize("overrides,match", [
    (["parallel.tensor_paralel_size=2"], "Did you mean"),
    (["max_new_tokens=abc"], "max_new_tokens"),
    (["model.dtype=float16"], "model.dtype"),
    (["sampling.top_p=0"], "top_p"),
    (["prompt=a", "prompts_file=b.jsonl"], "not both"),
    (["model.fp8=true", "model.layer_spec=local"], "fp8"),
])
def test_config_errors_are_one_line(overrides, match):
    with pytest.raises(SPDError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(SPDError, match="unknown config preset 'nope'"):
        load_config("nope")
