"""The drafts shipped for the builtin model: picked automatically, small, complete, loadable."""

from __future__ import annotations

import json

import pytest
import torch
from multiproc import run_distributed
from safetensors import safe_open

from spd_megatron.config import ParallelConfig, load_config
from spd_megatron.draft.pdm import PDM_WEIGHTS, PipelineDraftModule, load_pdm_weights, read_pdm_config
from spd_megatron.engine import SHIPPED_DRAFTS, draft_path, pdm_config, stage_split
from spd_megatron.errors import SPDError
from spd_megatron.parallel.layout import split_layers
from spd_megatron.target.arch import ArchSpec

BUILTIN = "smollm2-135m-instruct"
STAGES = (2, 4)


@pytest.mark.parametrize("n", STAGES)
def test_a_draft_ships_for_the_default_split_and_is_picked(n):
    folder = SHIPPED_DRAFTS / BUILTIN / f"n{n}"
    cfg = read_pdm_config(folder)
    arch = ArchSpec.from_dict(cfg.target)
    spd = load_config("default", ["schedule.name=spd"])
    split = stage_split(spd, arch, n)  # no layers_per_stage: the split the shipped draft was trained for
    assert split == cfg.split and sum(split) == arch.num_layers
    assert draft_path(spd, split) == str(folder)
    other = [split[0] + 1, split[1] - 1, *split[2:]]
    assert draft_path(spd, other) == ""  # another layout: not this draft
    assert draft_path(load_config("default", ["draft.path=/x"]), split) == "/x"  # explicit path wins
    assert stage_split(load_config("default", ["schedule.name=autoregressive"]), arch, n) == split_layers(30, n, [])
    explicit = load_config("default", ["schedule.name=spd", f"parallel.layers_per_stage={other}"])
    assert stage_split(explicit, arch, n) == other  # an explicit split wins (and then needs its own draft)


def test_a_draft_path_brings_its_split(tmp_path):
    arch = ArchSpec.from_dict(read_pdm_config(SHIPPED_DRAFTS / BUILTIN / "n2").target)
    (tmp_path / "pdm_config.json").write_text(json.dumps({"split": [20, 10], "anchors": [0, 20, 29, 30]}))
    cfg = load_config("default", ["schedule.name=spd", f"draft.path={tmp_path}"])
    assert stage_split(cfg, arch, 2) == [20, 10]
    assert stage_split(cfg, arch, 3) == [10, 10, 10]  # trained for 2 stages: 3 get the balanced split


def test_spd_without_a_trained_draft_is_refused_unless_random_is_allowed():
    """3 stages: no shipped draft. One line naming the shipped layouts, the training command and
    draft.allow_random; with allow_random the random PDM's config is built."""
    arch = ArchSpec.from_dict(read_pdm_config(SHIPPED_DRAFTS / BUILTIN / "n2").target)
    cfg = load_config("default", ["schedule.name=spd"])
    with pytest.raises(SPDError, match=r"no trained draft for 3 stages, layers_per_stage=\[10,10,10\]: drafts "
                       r"ship for .* n=2 \(layers_per_stage=\[15,15\].* and n=4 .*python tools/train_draft.py "
                       r"train.num_stages=3 parallel.layers_per_stage=\[10,10,10\].*draft.allow_random=true"):
        pdm_config(cfg, arch, [10, 10, 10])
    cfg.draft.allow_random = True
    assert pdm_config(cfg, arch, [10, 10, 10]).split == [10, 10, 10]


@pytest.mark.distributed
@pytest.mark.parametrize("n", STAGES)
def test_shipped_draft_is_small_documented_and_loads(n):
    folder = SHIPPED_DRAFTS / BUILTIN / f"n{n}"
    assert (folder / PDM_WEIGHTS).stat().st_size <= 25_000_000
    card = (folder / "MODEL_CARD.md").read_text()
    assert "tools/train_draft.py" in card and "agreement" in card
    record = json.loads((folder / "training.json").read_text())
    assert record["tokens_seen"] > 0 and record["history"]
    run_distributed(_load_worker, 1, str(folder), timeout_s=120)


def _load_worker(rank, world_size, folder):
    from spd_megatron.parallel.init import init_parallel

    init_parallel(ParallelConfig())
    cfg = read_pdm_config(folder)
    module = PipelineDraftModule(cfg, ArchSpec.from_dict(cfg.target), max_seq_len=64)
    with torch.no_grad():
        load_pdm_weights(module, folder)
    with safe_open(f"{folder}/{PDM_WEIGHTS}", framework="pt") as f:
        head = f.get_tensor("head.weight")
    assert torch.equal(module.head.weight, head.float())
    assert module.head.weight.abs().sum() > 0
