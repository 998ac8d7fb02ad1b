"""The PDM checkpoint: save -> load gives identical logits; a mismatched layout is refused."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_distributed

from spd_megatron.draft.base import DraftRow
from spd_megatron.draft.pdm import (
    PDMConfig,
    PipelineDraftModule,
    check_pdm_matches,
    load_pdm_weights,
    read_pdm_config,
    save_pdm,
)
from spd_megatron.errors import SPDError
from spd_megatron.parallel.cpu_compat import seed_megatron_rng
from spd_megatron.parallel.init import init_parallel
from spd_megatron.config import ParallelConfig
from spd_megatron.convert.checkpoint import read_arch


def _worker(rank, world_size, ckpt, out_dir):
    init_parallel(ParallelConfig())
    seed_megatron_rng(0)
    arch = read_arch(ckpt)
    cfg = PDMConfig([2, 2], [0, 2, 4], num_layers=2, draft_vocab=list(range(0, 260, 2)), target=arch.to_dict())
    torch.manual_seed(1)
    a = PipelineDraftModule(cfg, arch, max_seq_len=32).eval()
    save_pdm(a, out_dir, dtype="float32")
    loaded_cfg = read_pdm_config(out_dir)
    assert loaded_cfg == cfg
    torch.manual_seed(2)  # different random init, then the saved weights
    b = PipelineDraftModule(loaded_cfg, arch, max_seq_len=32).eval()
    load_pdm_weights(b, out_dir)
    gen = torch.Generator().manual_seed(3)
    rows = [DraftRow(p, 0, d, {k: torch.randn(64, generator=gen) for k in (0, 2, 4)})
            for p, d in ((0, 2), (1, 1), (2, 0))]
    with torch.inference_mode():
        outs = []
        for module in (a, b):
            x = torch.stack([module.row_input(r, r.depth) for r in rows]).unsqueeze(1)  # [3, 1, h]
            outs.append(module.logits(module(x, 0)[-1, 0]))
    assert outs[0].shape == (130,) and torch.equal(outs[0], outs[1])
    with pytest.raises(SPDError, match="stage layout"):
        check_pdm_matches(loaded_cfg, arch, [1, 3])


@pytest.mark.distributed
def test_pdm_save_load_roundtrip(tiny_models, tmp_path):
    run_distributed(_worker, 1, tiny_models["llama"][1], str(tmp_path / "pdm"), timeout_s=120)
