"""The PDM step that ``draft.cuda_graphs`` captures, run eagerly on CPU, equals the ordinary step.

``PDMGraphs._static_forward`` writes the cycle's R rows at a position tensor and attends over the
whole static cache; this checks it against the eager PDM over a filling pipeline (R = 1, 2, 3) and
a rollback. The capture itself needs a GPU (tests/gpu/test_cuda_graphs.py).
"""

from __future__ import annotations

import pytest
import torch
from helpers import pdm_cycles
from multiproc import run_distributed

from spd_megatron.config import ParallelConfig
from spd_megatron.convert.checkpoint import read_arch
from spd_megatron.draft.cuda_graphs import PDMGraphs, make_pdm_graphs
from spd_megatron.draft.pdm import PDMConfig, PDMDraft, PipelineDraftModule
from spd_megatron.parallel.cpu_compat import seed_megatron_rng
from spd_megatron.parallel.init import init_parallel


def _worker(rank, world_size, ckpt):
    init_parallel(ParallelConfig())
    seed_megatron_rng(0)
    arch = read_arch(ckpt)
    cfg = PDMConfig([2, 2], [0, 2, 4], num_layers=2, target=arch.to_dict())
    torch.manual_seed(1)
    module = PipelineDraftModule(cfg, arch, max_seq_len=48).eval()
    assert make_pdm_graphs(module, 1, "gloo") is None  # declines a CPU PDM
    eager = pdm_cycles(PDMDraft(module), arch.hidden_size)
    graphs = PDMGraphs(module, capture=False)
    calls = []
    original = graphs._static_forward
    graphs._static_forward = lambda count: calls.append(count) or original(count)
    static = pdm_cycles(PDMDraft(module, graphs), arch.hidden_size)
    assert sorted(set(calls)) == [1, 2, 3], calls  # every row count of a filling pipeline
    assert len(calls) == eager.shape[0] == 9
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(static[0], static[1])  # the cycles really differ


@pytest.mark.distributed
def test_static_pdm_step_equals_eager_step(tiny_models):
    run_distributed(_worker, 1, tiny_models["llama"][1], timeout_s=120)
